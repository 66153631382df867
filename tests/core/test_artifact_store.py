"""The artifact store's removers (service/core/artifacts.py, service/core/repo/blobs.py) on SQLite
and PostgreSQL databases made by the migrations: the collector (a task of its own, not the
sweeper's) removes the blobs no row references once untouched for the grace, and old staging
files; pruning and the collector never remove a blob that a writer of the same bytes stored
meanwhile. The interleavings of a writer and a remover are played step by step: the remover's
``keep`` runs once per group, while it holds every blob of the group aside."""

from __future__ import annotations

import io
import os
import time
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from sqlalchemy import delete, event, select

from service.core.artifacts import LEASE_S, LocalArtifactStore, Staged
from service.core.celery_app import COLLECT_ARTIFACTS, SWEEP, make_celery
from service.core.models import Dataset, Tenant
from service.core.repo import blobs
from service.core.settings import Settings

DAY = 24 * 3600.0


def age(store: LocalArtifactStore, sha256: str, seconds: float) -> None:
    """The blob was last written (or its lease ran out) ``seconds`` ago."""
    t = time.time() - seconds
    os.utime(store.path(sha256), (t, t))


@pytest.fixture
def db(migrated_db):
    return migrated_db


@pytest.fixture
def store(tmp_path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


def reference(db, sha256: str) -> int:
    """A committed row that references the blob (a dataset's file); returns its id."""
    with db.transaction() as s:
        tenant = s.scalar(select(Tenant).where(Tenant.name == "acme")) or Tenant(name="acme")
        s.add(tenant)
        s.flush()
        row = Dataset(tenant_id=tenant.id, name=sha256[:8], sha256=sha256, size_bytes=1, num_classes=2,
                      input_shape=[2], dtype="float32", n_train=1, n_test=1)
        s.add(row)
        s.flush()
        return row.id


def unreference(db, dataset_id: int) -> None:
    with db.transaction() as s:
        s.execute(delete(Dataset).where(Dataset.id == dataset_id))


def staged(store: LocalArtifactStore, data: bytes) -> Staged:
    """An upload of ``data``, streamed to the staging directory, not committed yet."""
    return store.stage(io.BytesIO(data), max_bytes=1 << 20)


def test_the_collector_removes_old_orphans_and_staging_files_and_keeps_the_rest(db, store):
    used, orphan, young = (store.put_bytes(b) for b in (b"referenced", b"orphan", b"young orphan"))
    reference(db, used)
    for sha in (used, orphan):
        age(store, sha, DAY + 60)
    age(store, young, DAY - 60)
    assert oct(store.path(orphan).stat().st_mode & 0o777) == "0o444"  # read-only blobs go all the same
    crashed = store.tmp / "upload-crashed"
    crashed.write_bytes(b"half an upload")
    os.utime(crashed, (time.time() - DAY - 60,) * 2)
    writing = store.tmp / "upload-now"
    writing.write_bytes(b"an upload under way")

    assert blobs.collect(db, store, grace_s=DAY) == ([orphan], 1)
    assert not store.exists(orphan) and store.exists(used) and store.exists(young)
    assert not crashed.exists() and writing.exists()
    assert list(store.trash.iterdir()) == []
    assert blobs.collect(db, store, grace_s=DAY) == ([], 0)
    assert blobs.collect(db, store, grace_s=30) == ([young], 0)  # a shorter grace (the setting)


def test_nothing_to_collect_costs_one_walk_and_one_query_per_column_per_chunk(db, store, monkeypatch):
    digests = [store.put_bytes(f"referenced {i}".encode()) for i in range(5)]
    for sha in digests:
        reference(db, sha)
        age(store, sha, DAY + 60)
    monkeypatch.setattr(blobs, "CHUNK", 2)
    statements = []
    event.listen(db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    assert blobs.collect(db, store, grace_s=DAY) == ([], 0)
    selects = [q for q in statements if q.lstrip().upper().startswith("SELECT")]
    assert 0 < len(selects) <= 3 * len(blobs.REFERENCES)  # 3 chunks of 2 digests, never one per blob


def test_orphans_are_checked_again_together_in_one_session_not_one_by_one(db, store, monkeypatch):
    """Each orphan is set aside before its references are checked again, but the check is one
    query per column for a group of them (ASIDE), in one session, whatever their number."""
    orphans = sorted(store.put_bytes(f"orphan {i}".encode()) for i in range(10))
    for sha in orphans:
        age(store, sha, DAY + 60)
    monkeypatch.setattr(blobs, "CHUNK", 5)
    statements, checkouts = [], []
    event.listen(db.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    event.listen(db.engine, "checkout", lambda *a: checkouts.append(a))
    assert blobs.collect(db, store, grace_s=DAY) == (orphans, 0)
    assert not any(store.exists(sha) for sha in orphans) and list(store.trash.iterdir()) == []
    selects = [q for q in statements if q.lstrip().upper().startswith("SELECT")]
    # 2 chunks of 5: one look and one check again per chunk (one by one: 2 looks and 10 checks)
    assert 0 < len(selects) <= 2 * 2 * len(blobs.REFERENCES)
    assert len(checkouts) == 2 * 2  # the session's connection, a transaction each (one by one: 12)


def test_a_group_set_aside_together_keeps_each_leased_young_or_referenced_blob(db, store, monkeypatch):
    """Groups of three (ASIDE): a blob the remover finds leased (its ``keep`` is not asked), one
    written within the grace meanwhile, and one whose row committed while the group was being set
    aside each stay; the orphans around them go; nothing is left aside."""
    shas = sorted(store.put_bytes(f"blob {i}".encode()) for i in range(7))
    for sha in shas:
        age(store, sha, DAY + 60)
    leased, young, referenced = shas[1], shas[2], shas[4]
    monkeypatch.setattr(blobs, "ASIDE", 3)
    real, held, groups = store.remove, [], []
    real_rename = os.rename

    def rename(src, dst):
        """Just before the remover sets each blob aside, a writer acts."""
        digest = os.path.basename(src)
        if digest == leased:
            assert store.commit(staged(store, store.open(leased).read())) is False  # stored already: leased
        if digest == young:
            age(store, young, 60)
        if digest == referenced:
            reference(db, referenced)
        return real_rename(src, dst)

    def racing(digests, keep):
        groups.append(list(digests))

        def holding(mtimes):
            held.extend(mtimes)
            assert not any(store.exists(d) for d in mtimes)
            return keep(mtimes)
        return real(digests, holding)

    monkeypatch.setattr(os, "rename", rename)
    store.remove = racing
    removed, _ = blobs.collect(db, store, grace_s=DAY)
    assert removed == [s for s in shas if s not in (leased, young, referenced)]
    assert all(store.exists(s) for s in (leased, young, referenced)) and list(store.trash.iterdir()) == []
    assert leased not in held and young in held and referenced in held
    assert groups == [shas[0:3], shas[3:6], shas[6:]]


def test_a_failed_check_puts_the_whole_group_back(db, store, monkeypatch):
    orphans = sorted(store.put_bytes(f"orphan {i}".encode()) for i in range(3))
    for sha in orphans:
        age(store, sha, DAY + 60)
    real, calls = blobs.unreferenced, []

    def unreferenced(session, digests):
        calls.append(list(digests))
        if len(calls) == 2:  # the check with the blobs set aside
            assert not any(store.exists(sha) for sha in orphans)
            raise ConnectionError("the database is down")
        return real(session, digests)

    monkeypatch.setattr(blobs, "unreferenced", unreferenced)
    with pytest.raises(ConnectionError):
        blobs.collect(db, store, grace_s=DAY)
    assert all(store.exists(sha) for sha in orphans) and list(store.trash.iterdir()) == []


def test_a_blob_set_aside_by_a_stopped_remover_is_put_back_then_judged(db, store):
    used, orphan = store.put_bytes(b"referenced"), store.put_bytes(b"orphan")
    reference(db, used)
    stopped = int(time.time() - DAY - 60)
    for sha in (used, orphan):
        age(store, sha, DAY + 60)
        os.rename(store.path(sha), store.trash / f"{sha}.{stopped}.0000")
    just_now = store.put_bytes(b"being removed right now")
    os.rename(store.path(just_now), store.trash / f"{just_now}.{int(time.time())}.0000")

    assert blobs.collect(db, store, grace_s=DAY) == ([orphan], 0)
    assert store.exists(used) and not store.exists(orphan)
    assert [p.name.split(".")[0] for p in store.trash.iterdir()] == [just_now]  # its remover decides


def test_prune_leaves_a_blob_a_writer_just_stored_again_until_its_lease_is_over(db, store):
    sha = store.put_bytes(b"weights")
    row = reference(db, sha)
    unreference(db, row)
    assert store.put_bytes(b"weights") == sha  # an upload of the same bytes, its row not committed yet
    assert store.path(sha).stat().st_mtime > time.time() + LEASE_S - 60  # leased
    assert blobs.prune(db, store, [sha]) == [] and store.exists(sha)
    assert blobs.collect(db, store, grace_s=DAY) == ([], 0) and store.exists(sha)

    reference(db, sha)  # the upload's row committed: the blob stays for it, lease or not
    age(store, sha, DAY + 60)
    assert blobs.prune(db, store, [sha]) == [] and store.exists(sha)

    fresh = store.put_bytes(b"just uploaded, then deleted")  # written, never leased: pruned at once
    assert blobs.prune(db, store, [fresh, sha]) == [fresh] and not store.exists(fresh)
    assert list(store.trash.iterdir()) == []


@pytest.mark.parametrize("remover", ["prune", "collect"])
def test_a_writer_that_finds_the_blob_set_aside_writes_it_anew(db, store, remover):
    """Remover: blob set aside, then (in ``keep``) a writer stores the same bytes: its lease finds
    no file, so it writes the blob anew; the remover, whatever it decides, leaves that one."""
    sha = store.put_bytes(b"weights")
    age(store, sha, DAY + 60)
    committed = []

    def keep(held: dict[str, float]) -> set[str]:
        assert list(held) == [sha] and not store.exists(sha) and held[sha] < time.time() - DAY
        upload = staged(store, b"weights")
        committed.append(store.commit(upload))
        return set()  # no reference committed yet: the remover deletes what it holds

    assert store.remove([sha], keep) == [sha]
    assert committed == [True] and store.exists(sha) and store.open(sha).read() == b"weights"
    assert list(store.trash.iterdir()) == []
    # and through the repo functions, with the writer's row committed before the remover looks again
    real = store.remove

    def racing(digests, keep):
        def writer_then_keep(held):
            for digest in held:
                upload = staged(store, b"weights")
                assert store.commit(upload) is True
                reference(db, digest)
            return keep(held)
        return real(digests, writer_then_keep)

    age(store, sha, DAY + 60)
    store.remove = racing
    removed = blobs.prune(db, store, [sha]) if remover == "prune" else blobs.collect(db, store, grace_s=DAY)[0]
    assert removed == [] and store.exists(sha) and list(store.trash.iterdir()) == []


def test_a_lease_taken_before_the_blob_was_set_aside_puts_it_back(db, store):
    sha = store.put_bytes(b"weights")
    age(store, sha, DAY + 60)
    upload = staged(store, b"weights")
    assert store.commit(upload) is False  # stored already: leased
    asked = []
    assert store.remove([sha], asked.append) == []  # the lease is seen on the blob set aside
    assert asked == []  # and its remover's keep is not asked
    assert store.exists(sha) and list(store.trash.iterdir()) == []
    store.delete(sha)  # a failed upload's rollback leaves another writer's lease alone too
    assert store.exists(sha)


def test_a_blob_put_back_between_a_writers_two_steps_is_leased(store, monkeypatch):
    """The writer's lease finds no file (set aside), and the remover puts it back before the writer
    writes its own: the write fails rather than overwrite, and the writer leases the one put back."""
    sha = store.put_bytes(b"weights")
    age(store, sha, 60)
    real, calls = os.utime, []

    def utime(path, times=None, **kw):
        calls.append(path)
        if len(calls) == 1:
            raise FileNotFoundError(path)
        return real(path, times, **kw)

    monkeypatch.setattr(os, "utime", utime)
    upload = staged(store, b"weights")
    assert store.commit(upload) is False and len(calls) == 2
    monkeypatch.undo()
    assert store.path(sha).stat().st_mtime > time.time() + LEASE_S - 60


def test_a_remover_whose_check_fails_puts_the_blob_back(store):
    sha = store.put_bytes(b"weights")

    def keep(held: dict[str, float]) -> set[str]:
        raise ConnectionError("the database is down")

    with pytest.raises(ConnectionError):
        store.remove([sha], keep)
    assert store.exists(sha) and list(store.trash.iterdir()) == []


def test_a_group_is_asked_once_with_every_blob_set_aside_and_removed_or_put_back_each(store):
    """One call removes a group: every blob is set aside (one not stored is skipped, one leased is
    put back unasked), then ``keep`` is asked once for all the others; those it keeps go back."""
    shas = [store.put_bytes(f"blob {i}".encode()) for i in range(4)]
    for sha in shas:
        age(store, sha, 60)
    kept, leased = shas[1], shas[3]
    assert store.lease(leased)
    missing = "0" * 64
    calls = []

    def keep(held: dict[str, float]) -> set[str]:
        calls.append(dict(held))
        assert not any(store.exists(sha) for sha in held)  # the whole group is aside at once
        assert len(list(store.trash.iterdir())) == len(held)
        return {kept}

    assert store.remove([shas[2], missing, *shas], keep) == [shas[2], shas[0]]  # in the order given
    assert len(calls) == 1 and sorted(calls[0]) == sorted([shas[0], kept, shas[2]])
    assert all(time.time() - 120 < mtime < time.time() for mtime in calls[0].values())
    assert store.exists(kept) and store.exists(leased) and not store.exists(shas[0]) and not store.exists(shas[2])
    assert list(store.trash.iterdir()) == []
    assert store.remove([missing], keep) == [] and len(calls) == 1  # nothing set aside: nothing to ask


def test_a_failure_puts_every_blob_of_the_group_back(store):
    """An exception in ``keep`` (the database is down), or while the group is being set aside (a bad
    digest), puts back every blob set aside so far; none is removed."""
    shas = [store.put_bytes(f"blob {i}".encode()) for i in range(3)]
    for sha in shas:
        age(store, sha, 60)
    calls = []

    def keep(held: dict[str, float]) -> set[str]:
        calls.append(sorted(held))
        raise ConnectionError("the database is down")

    with pytest.raises(ConnectionError):
        store.remove(shas, keep)
    assert calls == [sorted(shas)]
    assert all(store.exists(sha) for sha in shas) and list(store.trash.iterdir()) == []

    with pytest.raises(ValueError, match="not a sha256"):
        store.remove([*shas, "not a digest"], keep)
    assert len(calls) == 1  # never asked
    assert all(store.exists(sha) for sha in shas) and list(store.trash.iterdir()) == []


def test_the_collector_is_a_task_of_its_own_and_the_sweeper_leaves_the_store_alone(db, store, monkeypatch):
    from worker import tasks

    orphan = store.put_bytes(b"a crashed job's checkpoint")
    age(store, orphan, 2 * 3600)
    ctx = SimpleNamespace(db=db, store=store, settings=Settings(artifact_grace_s=3600), dispatcher=None)
    monkeypatch.setattr(tasks, "worker_context", lambda: ctx)
    out = tasks.sweep()
    assert "blobs_collected" not in out and "staging_files_removed" not in out and store.exists(orphan)
    collect = tasks.app.tasks[COLLECT_ARTIFACTS]  # what beat sends, by name
    assert collect() == {"blobs_collected": 1, "staging_files_removed": 0}
    assert not store.exists(orphan)
    assert tasks.collect_artifacts() == {"blobs_collected": 0, "staging_files_removed": 0}


def test_beat_runs_the_collector_every_artifact_collect_interval_s_on_the_default_queue(monkeypatch):
    def entry(settings: Settings) -> dict:
        conf = make_celery(settings).conf
        assert conf.task_routes[COLLECT_ARTIFACTS] == conf.task_routes[SWEEP] == {"queue": "default"}
        return conf.beat_schedule["collect"]

    monkeypatch.delenv("UNLEARND_ARTIFACT_COLLECT_INTERVAL_S", raising=False)
    assert Settings().artifact_collect_interval_s == 3600
    # a run that waited longer than the interval is dropped: a backlog of store walks does not pile up
    assert entry(Settings()) == {"task": COLLECT_ARTIFACTS, "schedule": 3600, "options": {"expires": 3600}}
    assert entry(Settings(artifact_collect_interval_s=600))["schedule"] == 600
    monkeypatch.setenv("UNLEARND_ARTIFACT_COLLECT_INTERVAL_S", "120")
    assert entry(Settings()) == {"task": COLLECT_ARTIFACTS, "schedule": 120, "options": {"expires": 120}}
    settings = Settings(sweep_interval_s=30)
    assert make_celery(settings).conf.beat_schedule["sweep"] == {"task": SWEEP, "schedule": 30}  # its own interval
    for bad in (0, -1):
        with pytest.raises(ValidationError):
            Settings(artifact_collect_interval_s=bad)
