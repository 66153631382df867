"""A purge rewriting a model's files does not hold up requests for the model (PostgreSQL: the purge
locks the model row ``FOR NO KEY UPDATE``, which the accept path's foreign-key checks pass;
service/core/repo/retention.py ``lock_model``). SQLite serializes every writer on the database
lock, so only PostgreSQL can show it."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from service.core.models import utcnow
from service.core.repo import redaction, retention
from tests.api.test_delete_resources import _register
from tests.api.test_retention import ID, _publish
from tests.servicekit import register_dataset


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # the row locks are the point
def test_requests_are_accepted_while_a_purge_rewrites_the_dataset_file(service, user_files, monkeypatch):
    with service.client() as c:
        ds = register_dataset(c, user_files)
        mid = _register(service, c, user_files, ds["id"], "a", ok=True)
        # version 2 forgot rows 3 and 5 long ago: version 1 is due, and after it nothing holds them
        _publish(service, mid, [3, 5], at=utcnow() - dt.timedelta(days=400))

        inside, release = threading.Event(), threading.Event()
        real = redaction.blank_train_rows

        def held_open(f, rows):  # the rewrite, paused while the purge holds its locks
            inside.set()
            if not release.wait(20):
                raise TimeoutError("the test never released the rewrite")
            return real(f, rows)

        monkeypatch.setattr(redaction, "blank_train_rows", held_open)
        done: list = []
        purge = threading.Thread(target=lambda: done.append(retention.purge_due(service.db, service.store, mid)))
        purge.start()
        try:
            assert inside.wait(30), "the purge never reached the dataset file"
            r = c.post(f"/v1/models/{mid}/deletion-requests", json={"sample_ids": [ID[7]], "reason": "erasure"})
            assert r.status_code == 202, r.text
            assert purge.is_alive()  # accepted while the rewrite was still open
        finally:
            release.set()
            purge.join(30)
        assert [t["version"] for t in done[0]] == [1]
        assert c.get(f"/v1/models/{mid}/samples/{ID[3]}").json()["dataset_file"]["redacted_at"] is not None
        assert c.get(f"/v1/deletion-requests/{r.json()['id']}").json()["status"] == "received"
