"""Domain errors: what went wrong, in the words of the domain, without HTTP.

The core (repositories, policy, keys) raises these; the API layer alone maps them to
``application/problem+json`` answers (``service/api/problems.py``), and the worker and the CLI can
catch them without loading a web framework. Each carries a stable ``kind`` (the problem type's
suffix), a human ``title``, a ``detail`` that starts with the offending field when there is one,
and optional ``errors`` (one ``{"field", "message"}`` per bad field) and extensions.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    title = "Error"
    kind = "error"

    def __init__(self, detail: str, *, field: str | None = None, errors: list[dict] | None = None,
                 title: str | None = None, kind: str | None = None, retry_after: int | None = None,
                 **extensions: Any):
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.errors = errors if errors is not None else ([{"field": field, "message": detail}] if field else None)
        if title:
            self.title = title
        if kind:
            self.kind = kind
        self.retry_after = retry_after
        self.extensions = extensions


class Invalid(DomainError):
    """The input is malformed or breaks a rule (the API answers 422)."""
    title = "Invalid input"
    kind = "invalid-input"


class NotFound(DomainError):
    """No such resource for this caller (404): another tenant's resource is not found either."""
    title = "Not found"
    kind = "not-found"


class Conflict(DomainError):
    """The resource's state does not allow the operation now (409)."""
    title = "Conflict"
    kind = "conflict"


class Gone(DomainError):
    """The resource existed and was removed on purpose; only its tombstone is left (410)."""
    title = "Gone"
    kind = "gone"


class Unauthorized(DomainError):
    """No valid API key (401)."""
    title = "Unauthorized"
    kind = "unauthorized"


def invalid(field: str, message: str) -> Invalid:
    """Bad input in one field."""
    return Invalid(f"{field}: {message}", field=field)


def not_found(what: str) -> NotFound:
    return NotFound(f"{what} not found")


def conflict(detail: str, field: str | None = None) -> Conflict:
    return Conflict(detail, field=field)
