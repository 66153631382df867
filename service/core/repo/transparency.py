"""The transparency log: the sequencer, signed tree heads, proofs and erasure certificates.

Each tenant's audit-log entries are the leaves of its own Merkle tree (RFC 9162 hashing,
service/core/merkle.py). Entries are appended without a lock (service/core/repo/audit.py) and
queued in ``log_pending``; ``sequence`` (beat runs it every ``sequence_interval_s``, a worker after
each job) takes a tenant's queue in entry order, stores the new leaves and every perfect subtree
they complete (``log_nodes``), and signs one tree head for the batch. Proofs and roots are folded
from those stored subtrees: O(log n) rows a proof, read in one query.

Certificates: ``sequence`` also records a ``deletion_request.completed`` entry for every newly
completed deletion request (its facts: subject hash, sample-id digest, model, versions, the job's
report digests) and, once that entry is in a tree, signs the request's erasure certificate, which
carries the entry, its inclusion proof and the signed tree head (docs/transparency.md).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from sqlalchemy import func, select, text, tuple_
from sqlalchemy.orm import Session

from service.core import merkle
from service.core.db import Database, is_postgres
from service.core.errors import Conflict, NotFound, invalid, not_found
from service.core.evidence import CERTIFICATE, COMPLETED, CONSISTENCY, INCLUSION, TREE_HEAD
from service.core.models import (
    AuditEntry,
    DeletionRequest,
    DeletionRequestSample,
    ErasureCertificate,
    Job,
    LogLeaf,
    LogNode,
    LogPending,
    Model,
    ModelVersion,
    SigningKey,
    TreeHead,
    utcnow,
)
from service.core.repo import audit
from service.core.repo.common import iso
from service.core.repo.datasets import MAX_ID
from service.core.signing import Signer, canonical
from service.core.statuses import RequestStatus

log = logging.getLogger("unlearnd.transparency")

SEQUENCER_LOCK_BASE = 0x7365716E << 32  # "seqn": one advisory lock per tenant, taken by sequencers only
CERTIFIER_LOCK = SEQUENCER_LOCK_BASE - 1  # the completions and certificates of every tenant
CERTIFICATES_PER_RUN = 1000


def entry_leaf(e: AuditEntry) -> bytes:
    return merkle.leaf_hash(canonical(audit.document(e)))


# --- the sequencer -------------------------------------------------------------------------------

@dataclass
class Sequenced:
    completions: int = 0
    entries: int = 0
    tree_heads: list[dict] = field(default_factory=list)
    certificates: int = 0

    def to_dict(self) -> dict:
        return {"completions": self.completions, "entries": self.entries, "tree_heads": len(self.tree_heads),
                "certificates": self.certificates}


def sequence(db: Database, signer: Signer, batch: int = 10_000) -> Sequenced:
    """One pass: record completions, integrate every tenant's queue (``batch`` entries a tree head),
    issue the certificates now provable. Idempotent and safe to run concurrently."""
    out = Sequenced()
    with db.transaction() as session:
        _lock(session, CERTIFIER_LOCK)
        register_key(session, signer)
        out.completions = record_completions(session)
    with db.session() as session:
        tenants = list(session.scalars(select(LogPending.tenant_id).distinct()))
    for tenant_id in tenants:
        while True:
            with db.transaction() as session:
                head, n = integrate(session, tenant_id, signer, batch)
            if head is None:
                break
            out.entries += n
            out.tree_heads.append(head)
            if n < batch:
                break
    with db.transaction() as session:
        _lock(session, CERTIFIER_LOCK)
        out.certificates = issue_certificates(session, signer)
    return out


def _lock(session: Session, key: int) -> None:
    """Sequencers take turns (PostgreSQL; SQLite's single writer does that already). Writers of
    entries never take these locks."""
    if is_postgres(session):
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def register_key(session: Session, signer: Signer) -> None:
    if session.get(SigningKey, signer.key_id) is None:
        session.add(SigningKey(key_id=signer.key_id, public_key_pem=signer.public_pem, created_at=utcnow()))
        session.flush()
        log.info("signing key %s registered", signer.key_id)


def integrate(session: Session, tenant_id: int, signer: Signer, batch: int) -> tuple[dict | None, int]:
    """Append up to ``batch`` queued entries of the tenant to its tree and sign the new head."""
    _lock(session, SEQUENCER_LOCK_BASE + tenant_id)
    ids = list(session.scalars(select(LogPending.entry_id).where(LogPending.tenant_id == tenant_id)
                               .order_by(LogPending.entry_id).limit(batch)))
    if not ids:
        return None, 0
    entries = list(session.scalars(select(AuditEntry).where(AuditEntry.id.in_(ids)).order_by(AuditEntry.id)))
    size = tree_size(session, tenant_id)
    known = _nodes(session, tenant_id, merkle.perfect(0, size))
    new_leaves, new_nodes = [], []
    for e in entries:
        level, index = 0, size
        known[(0, index)] = entry_leaf(e)
        new_leaves.append({"tenant_id": tenant_id, "leaf_index": index, "entry_id": e.id})
        new_nodes.append((0, index))
        while index & 1:  # this leaf completes a perfect subtree: its left sibling is on the frontier
            known[(level + 1, index >> 1)] = merkle.node_hash(known[(level, index - 1)], known[(level, index)])
            level, index = level + 1, index >> 1
            new_nodes.append((level, index))
        size += 1
    session.execute(LogLeaf.__table__.insert(), new_leaves)
    session.execute(LogNode.__table__.insert(), [{"tenant_id": tenant_id, "level": lv, "idx": ix,
                                                 "hash": known[(lv, ix)].hex()} for lv, ix in new_nodes])
    session.execute(LogPending.__table__.delete().where(LogPending.entry_id.in_(ids)))
    root = merkle.fold([known[n] for n in merkle.perfect(0, size)])
    now = utcnow()
    head = signer.sign({"type": TREE_HEAD, "tenant_id": tenant_id, "tree_size": size, "root_hash": root.hex(),
                        "timestamp": audit.timestamp(now)})
    session.add(TreeHead(tenant_id=tenant_id, tree_size=size, root_hash=root.hex(), key_id=signer.key_id,
                         document=head, created_at=now))
    return head, len(entries)


def tree_size(session: Session, tenant_id: int) -> int:
    return session.scalar(select(func.max(TreeHead.tree_size)).where(TreeHead.tenant_id == tenant_id)) or 0


def _nodes(session: Session, tenant_id: int, keys) -> dict[tuple[int, int], bytes]:
    keys = sorted(set(keys))
    out: dict[tuple[int, int], bytes] = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        for level, index, h in session.execute(select(LogNode.level, LogNode.idx, LogNode.hash).where(
                LogNode.tenant_id == tenant_id, tuple_(LogNode.level, LogNode.idx).in_(chunk))):
            out[(level, index)] = bytes.fromhex(h)
    missing = [k for k in keys if k not in out]
    if missing:
        raise RuntimeError(f"tenant {tenant_id}: the log lacks node(s) {missing[:5]}")
    return out


def _ranges(session: Session, tenant_id: int, ranges: list[tuple[int, int]]) -> list[str]:
    known = _nodes(session, tenant_id, merkle.nodes_for(ranges))
    return [h.hex() for h in merkle.range_hashes(ranges, lambda level, index: known[(level, index)])]


# --- reading: tree heads and proofs ----------------------------------------------------------------

def tree_head(session: Session, tenant_id: int, size: int | None = None) -> dict:
    """The newest signed tree head, or the one of ``size`` leaves."""
    q = select(TreeHead.document).where(TreeHead.tenant_id == tenant_id)
    if size is not None:
        head = session.scalar(q.where(TreeHead.tree_size == size))
        if head is None:
            raise NotFound(f"tree_size: no signed tree head of size {size}", field="tree_size",
                           title="No such tree head", kind="tree-head-not-found")
        return head
    head = session.scalar(q.order_by(TreeHead.tree_size.desc()).limit(1))
    if head is None:
        raise NotFound("the log has no signed tree head yet: the sequencer signs one within seconds of the "
                       "first entry", title="No tree head yet", kind="tree-head-not-found")
    return head


def inclusion_proof(session: Session, tenant_id: int, entry_id: int, size: int | None = None) -> dict:
    """The entry, its leaf and the audit path to a signed tree head (the newest by default)."""
    entry = session.scalar(select(AuditEntry).where(AuditEntry.id == entry_id, AuditEntry.tenant_id == tenant_id)
                           ) if 0 < entry_id <= MAX_ID else None
    if entry is None:
        raise not_found(f"audit-log entry {entry_id}")
    index = session.scalar(select(LogLeaf.leaf_index).where(LogLeaf.entry_id == entry_id))
    if index is None:
        raise Conflict(f"audit-log entry {entry_id} is not in the tree yet: the sequencer adds it within "
                       "seconds", title="Entry not sequenced yet", kind="entry-not-sequenced", retry_after=2)
    head = tree_head(session, tenant_id, size)
    if index >= head["tree_size"]:
        raise invalid("tree_size", f"the tree of size {head['tree_size']} does not contain leaf {index} yet")
    return {"type": INCLUSION, "entry": audit.document(entry), "leaf_index": index,
            "leaf_hash": entry_leaf(entry).hex(), "tree_size": head["tree_size"],
            "audit_path": _ranges(session, tenant_id, merkle.inclusion_ranges(index, head["tree_size"])),
            "tree_head": head}


def consistency_proof(session: Session, tenant_id: int, first: int, second: int | None = None) -> dict:
    """That the tree of ``second`` leaves (the newest by default) extends the tree of ``first``,
    with both signed heads."""
    if first < 1:
        raise invalid("first", "must be at least 1")
    newer = tree_head(session, tenant_id, second)
    if first > newer["tree_size"]:
        raise invalid("first", f"must not exceed second ({newer['tree_size']})")
    older = tree_head(session, tenant_id, first)
    return {"type": CONSISTENCY, "first": first, "second": newer["tree_size"],
            "proof": _ranges(session, tenant_id, merkle.consistency_ranges(first, newer["tree_size"])),
            "first_tree_head": older, "second_tree_head": newer}


def public_key(session: Session) -> dict:
    row = session.scalar(select(SigningKey).order_by(SigningKey.created_at.desc(), SigningKey.key_id).limit(1))
    if row is None:
        raise NotFound("no signing key yet: the worker's sequencer registers it when it first runs",
                       title="No signing key yet", kind="signing-key-not-found")
    return {"algorithm": "Ed25519", "key_id": row.key_id, "public_key_pem": row.public_key_pem,
            "created_at": iso(row.created_at)}


# --- erasure certificates ------------------------------------------------------------------------

def record_completions(session: Session, limit: int = CERTIFICATES_PER_RUN) -> int:
    """A ``deletion_request.completed`` entry for each completed request that has none yet."""
    done = list(session.scalars(select(DeletionRequest).where(
        DeletionRequest.status == RequestStatus.COMPLETED,
        ~select(ErasureCertificate.request_id).where(ErasureCertificate.request_id == DeletionRequest.id).exists())
        .order_by(DeletionRequest.id).limit(limit)))
    for r in done:
        entry = audit.record(session, r.tenant_id, "sequencer", COMPLETED, f"deletion_request:{r.id}",
                             erasure_facts(session, r))
        session.add(ErasureCertificate(request_id=r.id, tenant_id=r.tenant_id, entry_id=entry.id))
    session.flush()
    return len(done)


def erasure_facts(session: Session, r: DeletionRequest) -> dict:
    """What the certificate attests: the request, the subject (as a hash), a digest of the sample
    ids (sha256 of the sorted ids, one a line), the model, and the version that no longer contains
    them with the job that made it and its report's digests."""
    ids = sorted(session.scalars(select(DeletionRequestSample.sample_id)
                                 .where(DeletionRequestSample.request_id == r.id)))
    model_name = session.scalar(select(Model.name).where(Model.id == r.model_id))
    version = session.scalar(select(ModelVersion).where(ModelVersion.model_id == r.model_id,
                                                        ModelVersion.version == r.result_version))
    job = session.get(Job, version.job_id) if version is not None and version.job_id else None
    return {"request_id": r.id, "reason": r.reason, "subject_hash": r.subject_hash, "n_samples": r.n_samples,
            "sample_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
            "model_id": r.model_id, "model_name": model_name,
            "version_before": version.parent_version if version is not None else None,
            "version_after": r.result_version, "job_id": job.id if job else None,
            "report_sha256": job.report_sha256 if job else None,
            "report_html_sha256": job.report_html_sha256 if job else None,
            "received_at": iso(r.created_at), "completed_at": iso(r.completed_at)}


def issue_certificates(session: Session, signer: Signer, limit: int = CERTIFICATES_PER_RUN) -> int:
    """Sign the certificate of every completion entry that is now in its tenant's tree."""
    rows = list(session.execute(select(ErasureCertificate, LogLeaf.leaf_index)
                                .join(LogLeaf, LogLeaf.entry_id == ErasureCertificate.entry_id)
                                .where(ErasureCertificate.issued_at.is_(None))
                                .order_by(ErasureCertificate.request_id).limit(limit)))
    heads: dict[int, dict] = {}
    now = utcnow()
    for cert, index in rows:
        head = heads.get(cert.tenant_id) or heads.setdefault(cert.tenant_id, tree_head(session, cert.tenant_id))
        entry = session.get(AuditEntry, cert.entry_id)
        cert.certificate = signer.sign({
            "type": CERTIFICATE, "tenant_id": cert.tenant_id, "request_id": cert.request_id,
            "issued_at": audit.timestamp(now), "erasure": entry.details, "log_entry": audit.document(entry),
            "inclusion_proof": {"leaf_index": index, "tree_size": head["tree_size"],
                                "leaf_hash": entry_leaf(entry).hex(),
                                "audit_path": _ranges(session, cert.tenant_id,
                                                      merkle.inclusion_ranges(index, head["tree_size"]))},
            "tree_head": head})
        cert.issued_at = now
    session.flush()
    return len(rows)


def certificate(session: Session, tenant_id: int, request_id: int) -> dict:
    r = session.scalar(select(DeletionRequest).where(DeletionRequest.id == request_id,
                                                     DeletionRequest.tenant_id == tenant_id)
                       ) if 0 < request_id <= MAX_ID else None
    if r is None:
        raise not_found(f"deletion request {request_id}")
    if r.status != RequestStatus.COMPLETED:
        raise Conflict(f"deletion request {request_id} is {r.status}: its certificate is issued once it is "
                       "completed", title="Request not completed", kind="request-not-completed")
    doc = session.scalar(select(ErasureCertificate.certificate).where(ErasureCertificate.request_id == request_id))
    if doc is None:
        raise Conflict(f"deletion request {request_id} is completed; its certificate is signed once the "
                       "sequencer has put its log entry in the tree (within seconds)",
                       title="Certificate not issued yet", kind="certificate-pending", retry_after=2)
    return doc
