"""Accepting a deletion request, the hot path of the service (bench/service.py): authenticated in
the transaction that writes it, on one pooled connection, in a fixed number of SQL statements
whatever the number of samples or links."""

from __future__ import annotations

import contextlib

from sqlalchemy import event
from sqlalchemy.pool import Pool

from tests.api.test_deletions_api import ID, _post, _ready_model
from tests.api.test_list_queries import statements


@contextlib.contextmanager
def checkouts():
    """Counts the connections every pool of this process hands out meanwhile."""
    taken: list[int] = []

    def count(*_args):
        taken.append(1)

    event.listen(Pool, "checkout", count)
    try:
        yield taken
    finally:
        event.remove(Pool, "checkout", count)


def test_an_accepted_request_takes_one_connection_and_a_fixed_number_of_statements(service, user_files):
    with service.client() as c:
        mid = _ready_model(service, user_files, c, policy={"batching": {"max_requests": 1000, "max_wait_s": 3600}})
        assert _post(c, mid, [ID[0]]).status_code == 202  # warm: the key's use is recorded (at most every 5 min)
        seen = []
        for ids in ([ID[1]], ID[2:52], [ID[1], ID[52]]):  # one sample, 50, one of them linked to a pending request
            with statements() as sent, checkouts() as taken:
                r = _post(c, mid, ids)
            assert r.status_code == 202, r.text
            seen.append((len(sent), len(taken)))
        assert r.json()["linked_to"] and r.json()["n_new_samples"] == 1
    # the key; the model with its ready version and what is known of the samples; the request, its
    # samples, its audit-log entry and that entry's place in the sequencer's queue; after the commit,
    # whether a batch is due. SQLite also sends its BEGIN IMMEDIATE for both.
    expected = 9 if service.settings.db_url.startswith("sqlite") else 7
    assert seen == [(expected, 1)] * 3, seen
