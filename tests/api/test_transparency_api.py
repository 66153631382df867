"""The transparency log over HTTP: tree heads, inclusion and consistency proofs, the public key and
erasure certificates (problem+json naming the field, 404 for another tenant's entries, 409 while a
certificate cannot be given), and ``unlearnd verify`` on what the API hands out (exit codes)."""

from __future__ import annotations

import json
import subprocess
import sys

from sqlalchemy import select

from service.core.models import Tenant
from service.core.repo import transparency
from service.core.signing import load_signer
from tests.core.test_transparency import complete, completed_request


def assert_problem(r, status: int, field: str | None = None, kind: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    if field:
        assert [e["field"] for e in body["errors"]] == [field], body
    if kind:
        assert body["type"] == f"urn:unlearnd:problem:{kind}", body
    return body


def verify_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", "verify", *args], capture_output=True, text=True,
                          timeout=120)


def test_proofs_certificates_and_verify(service, tmp_path):
    with service.client("acme") as acme, service.client("globex") as globex, service.client(None) as anonymous:
        with service.db.session() as s:
            acme_id, globex_id = (s.scalar(select(Tenant.id).where(Tenant.name == n)) for n in ("acme", "globex"))
        request_id, _ = completed_request(service.db, acme_id)
        waiting, _ = completed_request(service.db, acme_id, name="m2")  # never completed
        complete(service.db, request_id)

        # before the sequencer ran: no key, no head, no certificate yet
        assert_problem(anonymous.get("/v1/public-key"), 404, kind="signing-key-not-found")
        assert_problem(acme.get("/v1/audit-log/tree-head"), 404, kind="tree-head-not-found")
        assert_problem(acme.get(f"/v1/deletion-requests/{request_id}/certificate"), 409, kind="certificate-pending")
        assert_problem(acme.get(f"/v1/deletion-requests/{waiting}/certificate"), 409, kind="request-not-completed")

        signer = load_signer(service.settings)
        transparency.sequence(service.db, signer)
        with service.db.transaction() as s:  # globex gets a log of its own
            from service.core.repo import audit

            audit.record(s, globex_id, "tester", "thing.done", "thing:1", {})
        transparency.sequence(service.db, signer)

        key = anonymous.get("/v1/public-key").json()
        assert key["algorithm"] == "Ed25519" and key["key_id"] == signer.key_id
        pem = tmp_path / "public.pem"
        pem.write_text(key["public_key_pem"])

        head = acme.get("/v1/audit-log/tree-head").json()
        assert head["tree_size"] == 1 and head["tenant_id"] == acme_id
        assert acme.get("/v1/audit-log/tree-head", params={"tree_size": 1}).json() == head
        assert_problem(acme.get("/v1/audit-log/tree-head", params={"tree_size": 7}), 404, "tree_size")
        assert_problem(acme.get("/v1/audit-log/tree-head", params={"tree_size": 0}), 422, "tree_size")
        log = acme.get("/v1/audit-log").json()
        assert log["tree_head"] == head and [e["leaf_index"] for e in log["items"]] == [0]
        entry_id = log["items"][0]["id"]

        proof = acme.get(f"/v1/audit-log/{entry_id}/inclusion-proof").json()
        assert proof["entry"]["action"] == "deletion_request.completed" and proof["tree_head"] == head
        assert_problem(globex.get(f"/v1/audit-log/{entry_id}/inclusion-proof"), 404)
        assert_problem(acme.get(f"/v1/audit-log/{entry_id}/inclusion-proof", params={"tree_size": "x"}), 422,
                       "tree_size")
        assert_problem(acme.get("/v1/audit-log/consistency-proof"), 422, "first")
        assert_problem(acme.get("/v1/audit-log/consistency-proof", params={"first": 0}), 422, "first")
        assert_problem(acme.get("/v1/audit-log/consistency-proof", params={"first": 2}), 422, "first")
        consistency = acme.get("/v1/audit-log/consistency-proof", params={"first": 1}).json()
        assert (consistency["first"], consistency["second"], consistency["proof"]) == (1, 1, [])
        assert globex.get("/v1/audit-log").json()["tree_head"]["tenant_id"] == globex_id

        cert = acme.get(f"/v1/deletion-requests/{request_id}/certificate").json()
        assert cert["request_id"] == request_id and cert["log_entry"]["id"] == entry_id
        assert_problem(globex.get(f"/v1/deletion-requests/{request_id}/certificate"), 404)
        assert_problem(anonymous.get(f"/v1/deletion-requests/{request_id}/certificate"), 401)

        # unlearnd verify, offline with the key file, or fetching the key from the service
        files = {}
        for name, doc in (("cert", cert), ("proof", proof), ("head", head), ("consistency", consistency)):
            files[name] = tmp_path / f"{name}.json"
            files[name].write_text(json.dumps(doc))
            out = verify_cli(str(files[name]), "--public-key", str(pem))
            assert out.returncode == 0 and out.stdout.startswith("OK"), out.stdout + out.stderr
        out = verify_cli(str(files["cert"]), "--url", service.url)
        assert out.returncode == 0 and f"deletion request {request_id}" in out.stdout, out.stderr

        tampered = tmp_path / "tampered.json"
        cert["erasure"]["version_after"] = 3
        tampered.write_text(json.dumps(cert))
        out = verify_cli(str(tampered), "--public-key", str(pem))
        assert out.returncode == 1 and "FAILED" in out.stderr
        head["root_hash"] = "0" * 64
        tampered.write_text(json.dumps(head))
        assert verify_cli(str(tampered), "--public-key", str(pem)).returncode == 1
        tampered.write_text("{not json")
        assert verify_cli(str(tampered), "--public-key", str(pem)).returncode == 1

        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from service.core.signing import public_pem

        other = tmp_path / "other.pem"
        other.write_text(public_pem(Ed25519PrivateKey.generate().public_key()))
        out = verify_cli(str(files["cert"]), "--public-key", str(other))
        assert out.returncode == 1 and "not by the key given" in out.stderr
        assert verify_cli(str(tmp_path / "missing.json"), "--public-key", str(pem)).returncode == 2
        assert verify_cli(str(files["cert"]), "--url", "http://127.0.0.1:9").returncode == 2
