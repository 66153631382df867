"""The transparency log (service/core/repo/transparency.py) on SQLite and PostgreSQL databases made
by the migrations: every tree head, inclusion and consistency proof is checked by a verifier written
here from RFC 9162's definitions (MTH, PATH, PROOF: recursion over the entries themselves), not by
service/core/merkle.py; signatures with the cryptography package directly. Then tampering,
tenancy, appends that take no lock, and erasure certificates."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from service.core.db import Database
from service.core.errors import Conflict, Invalid, NotFound
from service.core.evidence import Altered, verify
from service.core.migrate import upgrade
from service.core.models import (
    AuditEntry,
    Dataset,
    DeletionRequest,
    DeletionRequestSample,
    Job,
    Model,
    ModelVersion,
    Tenant,
)
from service.core.repo import audit, transparency
from service.core.signing import Signer
from tests.servicekit import fresh_postgres

# --------------------------------------------------------------------------- RFC 9162, section 2.1, by the book


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def entry_bytes(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def k_of(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def mth(d: list[bytes]) -> bytes:
    if not d:
        return sha(b"")
    if len(d) == 1:
        return sha(b"\x00" + d[0])
    k = k_of(len(d))
    return sha(b"\x01" + mth(d[:k]) + mth(d[k:]))


def path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = k_of(len(d))
    return path(m, d[:k]) + [mth(d[k:])] if m < k else path(m - k, d[k:]) + [mth(d[:k])]


def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [mth(d)]
    k = k_of(n)
    return subproof(m, d[:k], b) + [mth(d[k:])] if m <= k else subproof(m - k, d[k:], False) + [mth(d[:k])]


def root_from_path(m: int, n: int, leaf: bytes, proof: list[bytes]) -> bytes:
    """Rebuild the root from an audit path, following PATH's recursion backwards."""
    if n == 1:
        assert not proof
        return leaf
    k, rest, top = k_of(n), proof[:-1], proof[-1]
    if m < k:
        return sha(b"\x01" + root_from_path(m, k, leaf, rest) + top)
    return sha(b"\x01" + top + root_from_path(m - k, n - k, leaf, rest))


def roots_from_consistency(m: int, n: int, proof: list[bytes], old_root: bytes, b: bool = True):
    """(MTH(D[0:m]), MTH(D[0:n])) rebuilt from a consistency proof, following SUBPROOF backwards."""
    if m == n:
        if b:
            assert not proof
            return old_root, old_root
        assert len(proof) == 1
        return proof[0], proof[0]
    k, rest, top = k_of(n), proof[:-1], proof[-1]
    if m <= k:
        old, new = roots_from_consistency(m, k, rest, old_root, b)
        return old, sha(b"\x01" + new + top)
    old, new = roots_from_consistency(m - k, n - k, rest, old_root, False)
    return sha(b"\x01" + top + old), sha(b"\x01" + top + new)


def signed_by(key: Ed25519PrivateKey, doc: dict) -> bool:
    body = json.dumps({k: v for k, v in doc.items() if k != "signature"}, sort_keys=True, separators=(",", ":"))
    try:
        key.public_key().verify(base64.b64decode(doc["signature"]), body.encode())
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def db(migrated_db):
    return migrated_db


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def signer(key) -> Signer:
    return Signer(key)


def tenant(db: Database, name: str) -> int:
    with db.transaction() as s:
        t = Tenant(name=name)
        s.add(t)
        s.flush()
        return t.id


def append(db: Database, tenant_id: int, n: int, start: int = 0) -> list[int]:
    ids = []
    for i in range(start, start + n):
        with db.transaction() as s:
            ids.append(audit.record(s, tenant_id, "tester", "thing.done", f"thing:{i}", {"i": i, "é": [1.5, None]}).id)
    return ids


def leaves_of(db: Database, tenant_id: int) -> list[bytes]:
    """The tenant's entries in leaf order, as canonical JSON (what each leaf commits to)."""
    with db.session() as s:
        proofs = [transparency.inclusion_proof(s, tenant_id, e) for e in
                  s.scalars(select(AuditEntry.id).where(AuditEntry.tenant_id == tenant_id))]
    return [entry_bytes(p["entry"]) for p in sorted(proofs, key=lambda p: p["leaf_index"])]


# --------------------------------------------------------------------------- proofs


def test_tree_heads_and_proofs_check_against_rfc_9162(db, signer, key):
    acme = tenant(db, "acme")
    sizes = []
    for batch in (1, 1, 2, 3, 5, 1, 8, 4):  # tree heads of 1, 2, 4, 7, 12, 13, 21, 25 entries
        append(db, acme, batch, start=sum(sizes[-1:]))
        heads = transparency.sequence(db, signer, batch=100).tree_heads
        assert len(heads) == 1
        sizes.append(heads[0]["tree_size"])
    assert sizes == [1, 2, 4, 7, 12, 13, 21, 25]
    d = leaves_of(db, acme)
    assert [json.loads(x)["resource"] for x in d] == [f"thing:{i}" for i in range(25)]  # the order of appending

    with db.session() as s:
        for n in sizes:
            head = transparency.tree_head(s, acme, n)
            assert signed_by(key, head) and head["tree_size"] == n and head["tenant_id"] == acme
            assert bytes.fromhex(head["root_hash"]) == mth(d[:n])
        for m in range(25):
            entry_id = json.loads(d[m])["id"]
            for n in [x for x in sizes if x > m]:
                p = transparency.inclusion_proof(s, acme, entry_id, n)
                assert p["leaf_index"] == m and p["tree_size"] == n and entry_bytes(p["entry"]) == d[m]
                proof = [bytes.fromhex(h) for h in p["audit_path"]]
                assert proof == path(m, d[:n])
                leaf = sha(b"\x00" + entry_bytes(p["entry"]))
                assert leaf.hex() == p["leaf_hash"]
                assert root_from_path(m, n, leaf, proof).hex() == p["tree_head"]["root_hash"]
        for i, m in enumerate(sizes):
            for n in sizes[i:]:
                c = transparency.consistency_proof(s, acme, m, n)
                proof = [bytes.fromhex(h) for h in c["proof"]]
                assert proof == subproof(m, d[:n], True)
                old, new = (bytes.fromhex(c["first_tree_head"]["root_hash"]),
                            bytes.fromhex(c["second_tree_head"]["root_hash"]))
                assert roots_from_consistency(m, n, proof, old) == (old, new)
                assert verify(c, signer.public)
        # the defaults: the newest head
        assert transparency.consistency_proof(s, acme, 4)["second"] == 25
        assert transparency.inclusion_proof(s, acme, json.loads(d[0])["id"])["tree_size"] == 25
        # bad sizes name their field
        with pytest.raises(NotFound) as e:
            transparency.tree_head(s, acme, 5)
        assert e.value.field == "tree_size"
        with pytest.raises(Invalid) as e:
            transparency.consistency_proof(s, acme, 13, 12)
        assert e.value.field == "first"
        with pytest.raises(Invalid) as e:
            transparency.inclusion_proof(s, acme, json.loads(d[20])["id"], 13)
        assert e.value.field == "tree_size"


def test_an_entry_is_provable_only_once_sequenced_and_heads_come_in_batches(db, signer):
    acme = tenant(db, "acme")
    ids = append(db, acme, 5)
    with db.session() as s:
        with pytest.raises(Conflict) as e:
            transparency.inclusion_proof(s, acme, ids[0])
        assert e.value.kind == "entry-not-sequenced"
        with pytest.raises(NotFound):
            transparency.tree_head(s, acme)
        assert [e["leaf_index"] for e in audit.render_page(s, s.scalars(select(AuditEntry)).all())] == [None] * 5
    done = transparency.sequence(db, signer, batch=2)
    assert [h["tree_size"] for h in done.tree_heads] == [2, 4, 5] and done.entries == 5
    assert transparency.sequence(db, signer).tree_heads == []  # nothing new: no new head
    with db.session() as s:
        assert [e["leaf_index"] for e in audit.render_page(s, s.scalars(select(AuditEntry)).all())] == [0, 1, 2, 3, 4]


def test_tampering_is_detected(db, signer):
    acme = tenant(db, "acme")
    ids = append(db, acme, 6)
    transparency.sequence(db, signer)
    append(db, acme, 3, start=6)
    transparency.sequence(db, signer)
    with db.session() as s:
        proof = transparency.inclusion_proof(s, acme, ids[4])
        consistency = transparency.consistency_proof(s, acme, 6, 9)
        head = transparency.tree_head(s, acme)
    for doc in (proof, consistency, head):
        assert verify(doc, signer.public)

    def altered(doc: dict, change) -> dict:
        out = copy.deepcopy(doc)
        change(out)
        return out

    forgeries = [
        altered(proof, lambda d: d["entry"]["details"].update(i=99)),  # the entry says something else
        altered(proof, lambda d: d["entry"].update(actor="mallory")),
        altered(proof, lambda d: d.update(leaf_index=3)),  # another place in the tree
        altered(proof, lambda d: d["audit_path"].reverse()),
        altered(proof, lambda d: d["tree_head"].update(root_hash="00" * 32)),  # a head the key never signed
        altered(proof, lambda d: d["tree_head"].update(tree_size=10)),
        altered(head, lambda d: d.update(timestamp="2020-01-01T00:00:00.000000Z")),
        altered(head, lambda d: d.update(tenant_id=acme + 1)),
        altered(consistency, lambda d: d["proof"].pop()),
        altered(consistency, lambda d: d["first_tree_head"].update(root_hash="11" * 32)),
    ]
    # a rewritten log: the same six first entries but one changed, re-signed by the same key, does not
    # extend the old head (the consistency proof from the honest old head to it fails)
    leaves = [sha(b"\x00" + e) for e in leaves_of(db, acme)]
    leaves[2] = sha(b"\x00" + b"rewritten")
    rewritten = signer.sign({**{k: v for k, v in consistency["second_tree_head"].items() if k != "signature"},
                             "root_hash": _root(leaves).hex()})
    forgeries.append(altered(consistency, lambda d: d.update(second_tree_head=rewritten)))
    for forged in forgeries:
        with pytest.raises(Altered):
            verify(forged, signer.public)
    # signed by another key: refused, even though the signature is valid for that key
    other = Signer(Ed25519PrivateKey.generate())
    with pytest.raises(Altered, match="not by the key given"):
        verify(other.sign(head), signer.public)
    with pytest.raises(Altered, match="not by the key given"):
        verify(head, other.public)


def _root(leaf_hashes: list[bytes]) -> bytes:
    if len(leaf_hashes) == 1:
        return leaf_hashes[0]
    k = k_of(len(leaf_hashes))
    return sha(b"\x01" + _root(leaf_hashes[:k]) + _root(leaf_hashes[k:]))


def test_each_tenant_has_its_own_tree_and_sees_only_its_entries(db, signer):
    acme, globex = tenant(db, "acme"), tenant(db, "globex")
    a = append(db, acme, 3)
    g = append(db, globex, 2)
    done = transparency.sequence(db, signer)
    assert sorted((h["tenant_id"], h["tree_size"]) for h in done.tree_heads) == [(acme, 3), (globex, 2)]
    with db.session() as s:
        assert transparency.inclusion_proof(s, globex, g[0])["leaf_index"] == 0  # its own tree starts at 0
        for entry_id in a:
            with pytest.raises(NotFound):
                transparency.inclusion_proof(s, globex, entry_id)
        with pytest.raises(NotFound):
            transparency.tree_head(s, globex, 3)  # acme's size; globex has no such head
        with pytest.raises(NotFound):
            transparency.certificate(s, globex, 1)


def test_appends_of_one_tenant_do_not_wait_for_each_other(postgres_admin):
    """Two open transactions of the same tenant both append; the second commits while the first is
    still open (the hash chain serialized them on a lock). PostgreSQL only: SQLite has one writer."""
    with fresh_postgres(postgres_admin) as url:
        upgrade(url)
        db = Database(url)
        try:
            _appends_do_not_wait(db)
        finally:
            db.dispose()


def _appends_do_not_wait(db) -> None:
    acme = tenant(db, "acme")
    first = db.transaction()
    s1 = first.__enter__()
    audit.record(s1, acme, "one", "thing.done", "thing:1", {})
    committed = threading.Event()

    def other():
        with db.transaction() as s2:
            audit.record(s2, acme, "two", "thing.done", "thing:2", {})
        committed.set()

    t = threading.Thread(target=other)
    t.start()
    try:
        assert committed.wait(10), "the second append waited for the first transaction"
    finally:
        first.__exit__(None, None, None)
        t.join(10)


def test_the_log_tables_are_append_only(db, signer):
    acme = tenant(db, "acme")
    append(db, acme, 2)
    transparency.sequence(db, signer)
    for stmt in ("UPDATE audit_log SET actor = 'mallory'", "DELETE FROM audit_log", "DELETE FROM log_leaves",
                 "UPDATE log_nodes SET hash = 'x'", "UPDATE tree_heads SET root_hash = 'x'", "DELETE FROM tree_heads",
                 "DELETE FROM signing_keys"):
        with pytest.raises(DBAPIError, match="append-only"), db.transaction() as s:
            s.execute(text(stmt))


# --------------------------------------------------------------------------- erasure certificates


def completed_request(db: Database, tenant_id: int, *, name: str = "m") -> tuple[int, int]:
    """A model whose job published version 2, and a request it completed; returns (request id, job id)."""
    with db.transaction() as s:
        ds = Dataset(tenant_id=tenant_id, name=name, sha256="0" * 64, size_bytes=1, num_classes=2, input_shape=[2],
                     dtype="float32", n_train=10, n_test=2)
        s.add(ds)
        s.flush()
        model = Model(tenant_id=tenant_id, name=name, dataset_id=ds.id, architecture={}, policy={})
        s.add(model)
        s.flush()
        job = Job(tenant_id=tenant_id, model_id=model.id, status="succeeded", policy={}, base_version=1,
                  result_version=2, report_sha256="a" * 64, report_html_sha256="b" * 64)
        s.add(job)
        s.flush()
        s.add_all([ModelVersion(model_id=model.id, version=1, status="ready", checkpoint_sha256="1" * 64,
                                checkpoint_size=1),
                   ModelVersion(model_id=model.id, version=2, status="ready", checkpoint_sha256="2" * 64,
                                checkpoint_size=1, parent_version=1, job_id=job.id)])
        req = DeletionRequest(tenant_id=tenant_id, model_id=model.id, status="received", reason="erasure",
                              subject_hash="c" * 64, n_samples=2)
        s.add(req)
        s.flush()
        s.execute(DeletionRequestSample.__table__.insert(), [
            {"request_id": req.id, "row": r, "sample_id": sid} for r, sid in ((3, "s3"), (1, "s1"))])
        return req.id, job.id


def complete(db: Database, request_id: int) -> None:
    from service.core.repo import requests

    with db.transaction() as s:
        requests.complete(s, [request_id], 2)


def test_a_completed_request_gets_a_certificate_that_verifies_offline(db, signer, key):
    acme = tenant(db, "acme")
    append(db, acme, 3)
    request_id, job_id = completed_request(db, acme)
    with db.session() as s:
        with pytest.raises(Conflict) as e:
            transparency.certificate(s, acme, request_id)
        assert e.value.kind == "request-not-completed"
    complete(db, request_id)
    done = transparency.sequence(db, signer)
    assert (done.completions, done.certificates) == (1, 1)
    assert transparency.sequence(db, signer).completions == 0  # once per request
    with db.session() as s:
        cert = transparency.certificate(s, acme, request_id)
    assert signed_by(key, cert) and signed_by(key, cert["tree_head"])
    assert cert["erasure"] == {
        "request_id": request_id, "reason": "erasure", "subject_hash": "c" * 64, "n_samples": 2,
        "sample_ids_sha256": hashlib.sha256(b"s1\ns3").hexdigest(), "model_id": cert["erasure"]["model_id"],
        "model_name": "m", "version_before": 1, "version_after": 2, "job_id": job_id, "report_sha256": "a" * 64,
        "report_html_sha256": "b" * 64, "received_at": cert["erasure"]["received_at"],
        "completed_at": cert["erasure"]["completed_at"]}
    proof = cert["inclusion_proof"]
    assert proof["leaf_index"] == 3 and proof["tree_size"] == 4
    leaf = sha(b"\x00" + entry_bytes(cert["log_entry"]))
    assert root_from_path(3, 4, leaf, [bytes.fromhex(h) for h in proof["audit_path"]]).hex() == \
        cert["tree_head"]["root_hash"]
    assert "deletion request" in verify(cert, signer.public)

    for change in (lambda c: c["erasure"].update(version_after=1),  # facts changed and signature kept
                   lambda c: c["log_entry"]["details"].update(n_samples=1),
                   lambda c: c["inclusion_proof"].update(leaf_index=2),
                   lambda c: c.update(request_id=request_id + 1)):
        forged = copy.deepcopy(cert)
        change(forged)
        with pytest.raises(Altered):
            verify(forged, signer.public)
    # re-signed after a change of the facts: the certificate's signature holds, the log does not
    resigned = copy.deepcopy(cert)
    resigned["erasure"]["version_after"] = resigned["log_entry"]["details"]["version_after"] = 1
    with pytest.raises(Altered, match="altered"):
        verify(signer.sign(resigned), signer.public)


def test_a_certificate_waits_for_its_entry_to_be_sequenced(db, signer):
    acme = tenant(db, "acme")
    request_id, _ = completed_request(db, acme)
    complete(db, request_id)
    with db.transaction() as s:
        assert transparency.record_completions(s) == 1
    with db.session() as s:
        with pytest.raises(Conflict) as e:
            transparency.certificate(s, acme, request_id)
        assert e.value.kind == "certificate-pending"
    assert transparency.sequence(db, signer).certificates == 1
