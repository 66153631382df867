"""Errors as ``application/problem+json`` (RFC 9457), each naming the offending field.

The core raises domain errors (``service/core/errors.py``); routes raise :class:`Problem` for what
only HTTP knows (a bad header, a range, a body too large). The handlers installed by :func:`install`
turn both, FastAPI's validation errors and plain HTTP errors into problem documents: this module is
the one place where a domain error gets its status code.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.artifacts import TooLarge
from service.core.errors import Conflict, DomainError, Gone, Invalid, NotFound, Unauthorized
from service.core.errors import invalid as invalid  # re-exported: a 422 naming a field

MEDIA_TYPE = "application/problem+json"
DB_RETRY_AFTER_S = 5
TYPE_PREFIX = "urn:unlearnd:problem:"
log = logging.getLogger("unlearnd.api")


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str | None = None, *, kind: str | None = None,
                 field: str | None = None, errors: list[dict] | None = None, headers: dict | None = None,
                 **extensions: Any):
        super().__init__(detail or title)
        self.status, self.title, self.detail, self.kind = status, title, detail, kind
        self.errors = errors if errors is not None else ([{"field": field, "message": detail}] if field else None)
        self.headers = headers or {}
        self.extensions = extensions

    def body(self, instance: str | None = None) -> dict:
        out: dict[str, Any] = {"type": TYPE_PREFIX + self.kind if self.kind else "about:blank",
                               "title": self.title, "status": self.status}
        if self.detail:
            out["detail"] = self.detail
        if instance:
            out["instance"] = instance
        if self.errors:
            out["errors"] = self.errors
        out.update(self.extensions)
        return out


STATUS: dict[type[DomainError], int] = {Invalid: 422, NotFound: 404, Conflict: 409, Gone: 410, Unauthorized: 401}


def bad_field(field: str, message: str, status: int = 400, kind: str = "invalid-input") -> Problem:
    """Bad input in one field, with a status other than the domain's 422 (a header, a token, a range)."""
    return Problem(status, "Invalid input", f"{field}: {message}", kind=kind, field=field)


def unsupported(field: str, message: str) -> Problem:
    return bad_field(field, message, status=415, kind="unsupported-media-type")


def from_domain(error: DomainError) -> Problem:
    status = next((code for cls, code in STATUS.items() if isinstance(error, cls)), 400)
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer realm="unlearnd"'
    return Problem(status, error.title, error.detail, kind=error.kind, errors=error.errors, headers=headers,
                   **error.extensions)


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    return JSONResponse(problem.body(str(request.url.path) if request else None), status_code=problem.status,
                        media_type=MEDIA_TYPE, headers=problem.headers)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "form"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem):
        return problem_response(exc, request)

    @app.exception_handler(DomainError)
    async def _domain(request: Request, exc: DomainError):
        return problem_response(from_domain(exc), request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [{"field": _field(e.get("loc", ())), "message": e.get("msg", "invalid")} for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem_response(Problem(422, "Invalid input", detail, kind="invalid-input", errors=errors), request)

    @app.exception_handler(TooLarge)
    async def _too_large(request: Request, exc: TooLarge):
        return problem_response(Problem(413, "Content too large", f"the request body is {exc}",
                                        kind="too-large", field="body"), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, TooLarge):  # FastAPI turns an error while reading a form body into a 400
            return await _too_large(request, exc.__cause__)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method the path takes, not only those of the first route matched
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return problem_response(Problem(exc.status_code, _reason(exc.status_code), str(exc.detail),
                                        headers=headers), request)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    async def _unavailable(request: Request, exc: Exception):
        # The database is down, refusing connections, locked (SQLite) or out of pooled connections.
        # The transaction was rolled back, so nothing was written: the client may retry as is.
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return problem_response(Problem(503, "Service unavailable", "the database is unavailable; nothing was "
                                        "changed, retry after the delay in Retry-After", kind="unavailable",
                                        headers={"Retry-After": str(DB_RETRY_AFTER_S)}), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # pragma: no cover - defensive
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(Problem(500, "Internal server error", "an unexpected error occurred; it was logged",
                                        kind="internal"), request)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(request.scope["path"]):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _reason(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:  # pragma: no cover
        return "Error"
