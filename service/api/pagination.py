"""Cursor pagination: ``?max_results=N&page_token=T`` → ``{"items": [...], "next_page_token": T|null}``.

The token is opaque to clients (the last id seen, in base 36); lists are ordered by id, so a page
is stable while rows are added. Every string of TOKEN_PATTERN is a token: a made-up one gives some
page of the caller's own rows (or an empty one), never an error or another tenant's rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Select
from sqlalchemy.orm import Session

from service.api.problems import bad_field, invalid

MAX_KEY = 2**31 - 1  # ids and version numbers are INTEGER columns
TOKEN_PATTERN = "^[0-9a-z]{0,7}$"  # empty: the first page
_TOKEN = re.compile(TOKEN_PATTERN)


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
        if not _TOKEN.match(page_token):
            raise bad_field("page_token", "not a token this API returned", status=400)
        after = min(int(page_token, 36), MAX_KEY)
    return Page(after, size)


def token(after: int) -> str:
    return np.base_repr(after, 36).lower()


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
