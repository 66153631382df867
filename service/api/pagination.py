"""Cursor pagination: ``?max_results=N&page_token=T`` → ``{"items": [...], "next_page_token": T|null}``.

The token is opaque to clients (base64 of the last id seen); lists are ordered by id, so a page
is stable while rows are added.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from sqlalchemy import Select
from sqlalchemy.orm import Session

from service.api.problems import bad_field, invalid

MAX_KEY = 2**31 - 1  # ids and version numbers are INTEGER columns


@dataclass(frozen=True)
class Page:
    after: int
    size: int


def parse_page(page_token: str | None, max_results: int | None, default: int, cap: int) -> Page:
    size = default if max_results is None else max_results
    if not 1 <= size <= cap:
        raise invalid("max_results", f"must be between 1 and {cap}")
    after = 0
    if page_token:
        try:
            after = int(json.loads(base64.urlsafe_b64decode(page_token.encode() + b"==="))["after"])
        except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError):
            raise bad_field("page_token", "not a token this API returned", status=400) from None
        if not 0 <= after <= MAX_KEY:
            raise bad_field("page_token", "not a token this API returned", status=400)
    return Page(after, size)


def token(after: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode().rstrip("=")


def paginate(session: Session, query: Select, key_column, page: Page, render=None, *, render_page=None) -> dict:
    """One page of ``query`` ordered by the integer ``key_column`` (an id, or a version number),
    shown by ``render`` (one row) or ``render_page`` (the page's rows at once: what a row shows
    from other tables is read in one query for the page, not one per row)."""
    rows = list(session.scalars(query.where(key_column > page.after).order_by(key_column).limit(page.size + 1)))
    more = len(rows) > page.size
    rows = rows[: page.size]
    last = getattr(rows[-1], key_column.key) if more else None
    items = render_page(rows) if render_page is not None else [render(r) for r in rows]
    return {"items": items, "next_page_token": token(last) if more else None}
