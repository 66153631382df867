"""List endpoints read what their items show from other tables with one query per page, never one
per row: the number of SQL statements of a page does not grow with its items. Status filters take
only the statuses of service/core/statuses.py."""

from __future__ import annotations

import contextlib

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import Engine

from tests.api.test_deletions_api import ID, _post, _ready_model
from tests.servicekit import register_dataset, register_model


@contextlib.contextmanager
def statements():
    """Counts the SQL statements every engine of this process sends meanwhile: on SQLite as
    SQLAlchemy sends them, on PostgreSQL as psycopg does (the accept path runs two statements on
    psycopg directly: service/core/db.py ``DriverStatement``)."""
    sent: list[str] = []

    def count(conn, cursor, statement, *args):
        if conn.dialect.name != "postgresql":
            sent.append(statement)

    def counted(method):
        def send(self, query, *args, **kwargs):
            sent.append(query)
            return method(self, query, *args, **kwargs)
        return send

    originals = {name: getattr(psycopg.Cursor, name) for name in ("execute", "executemany")}
    event.listen(Engine, "before_cursor_execute", count)
    for name, method in originals.items():
        setattr(psycopg.Cursor, name, counted(method))
    try:
        yield sent
    finally:
        event.remove(Engine, "before_cursor_execute", count)
        for name, method in originals.items():
            setattr(psycopg.Cursor, name, method)


def _count(c, url: str) -> int:
    c.get(url).raise_for_status()  # warm: the key's first use and the like are not counted
    with statements() as sent:
        r = c.get(url)
    assert r.status_code == 200, r.text
    return len(sent)


def test_model_and_request_lists_take_a_fixed_number_of_queries_per_page(service, user_files):
    with service.client() as c:
        ds = register_dataset(c, user_files)["id"]
        first = _ready_model(service, user_files, c, name="first", dataset_id=ds)
        one_model = _count(c, "/v1/models")
        for name in ("second", "third"):
            assert register_model(c, user_files, ds, name).status_code == 201
        assert len(c.get("/v1/models").json()["items"]) == 3
        assert _count(c, "/v1/models") == one_model

        requests_url = "/v1/models/{}/deletion-requests"
        assert _post(c, first, ID[:3]).status_code == 202
        one_request = _count(c, requests_url.format(first))
        for start in (3, 6):
            assert _post(c, first, ID[start:start + 3]).status_code == 202
        assert _post(c, first, ID[:2]).status_code == 202  # linked to the first request
        items = c.get(requests_url.format(first)).json()["items"]
        assert len(items) == 4 and items[3]["linked_to"] == [items[0]["id"]] and items[3]["n_new_samples"] == 0
        assert [i["n_new_samples"] for i in items[:3]] == [3, 3, 3]
        assert _count(c, requests_url.format(first)) == one_request
        assert items == [c.get(f"/v1/deletion-requests/{i['id']}").json() for i in items]  # one shape


def test_status_filters_take_only_real_statuses(service, user_files):
    with service.client() as c:
        mid = _ready_model(service, user_files, c)
        assert _post(c, mid, ID[:3]).status_code == 202
        assert len(c.get(f"/v1/models/{mid}/deletion-requests?status=received").json()["items"]) == 1
        assert c.get(f"/v1/models/{mid}/deletion-requests?status=completed").json()["items"] == []
        for url in (f"/v1/models/{mid}/deletion-requests?status=rejected", f"/v1/models/{mid}/jobs?status=done"):
            r = c.get(url)
            assert r.status_code == 422, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
        assert c.get(f"/v1/models/{mid}/jobs?status=queued").status_code == 200
