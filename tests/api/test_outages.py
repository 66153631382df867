"""An unavailable database is a 503 with ``Retry-After``, never a 500, and writes nothing in half;
the service answers again as soon as the database is back. PostgreSQL is made unavailable for real:
it refuses new connections and its open ones are terminated."""

from __future__ import annotations

import contextlib

import psycopg
import pytest
from sqlalchemy import func, select

from service.core.models import DeletionRequest
from tests.servicekit import fresh_postgres, make_settings, running_service

PROBLEM = "application/problem+json"


@contextlib.contextmanager
def database_down(admin: str, url: str):
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                     "AND pid <> pg_backend_pid()", (name,))
    try:
        yield
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


@pytest.mark.parametrize("call", [
    ("GET", "/v1/datasets", None),
    ("GET", "/v1/models/1", None),
    ("GET", "/v1/audit-log", None),
    ("POST", "/v1/models/1/deletion-requests", {"sample_ids": ["1", "2"], "reason": "erasure"}),
    ("POST", "/v1/jobs/1/cancel", None),
])
def test_database_down_is_a_503_with_retry_after(tmp_path, postgres_admin, call):
    method, path, body = call
    with fresh_postgres(postgres_admin) as url, running_service(make_settings(tmp_path, url)) as service:
        with service.client() as c:
            assert c.get("/v1/datasets").status_code == 200  # the key exists and the pool is warm
            with database_down(postgres_admin, url):
                r = c.request(method, path, json=body)
                assert r.status_code == 503, r.text
                assert r.headers["content-type"].startswith(PROBLEM)
                assert int(r.headers["Retry-After"]) > 0
                assert r.json()["type"].endswith(":unavailable") and "nothing was changed" in r.json()["detail"]
                assert c.get("/readyz").status_code == 503
            # back: the same call answers as it would have (404 here: nothing of that id exists),
            # and the refused write left no row
            again = c.request(method, path, json=body)
            assert again.status_code in (200, 404), again.text
        with service.db.session() as s:
            assert s.scalar(select(func.count()).select_from(DeletionRequest)) == 0
