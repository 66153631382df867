"""Offline checks of what the transparency log hands out: a signed tree head, an inclusion proof,
a consistency proof or an erasure certificate, with nothing but the deployment's public key
(``unlearnd verify``; docs/transparency.md). Every check recomputes from the document itself:
the leaf hash from the entry, the root from the audit path, each signature over canonical JSON.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from service.core import merkle
from service.core.signing import canonical, check, key_id

TREE_HEAD = "unlearnd/tree-head/1"
INCLUSION = "unlearnd/inclusion-proof/1"
CONSISTENCY = "unlearnd/consistency-proof/1"
CERTIFICATE = "unlearnd/erasure-certificate/1"
COMPLETED = "deletion_request.completed"


class Altered(Exception):
    """The document does not verify: something in it was changed, or it was never ours."""


def verify(doc: object, public: Ed25519PublicKey) -> str:
    """Check ``doc``; returns a one-line summary of what it proves, raises :class:`Altered`."""
    if not isinstance(doc, dict):
        raise Altered("not a JSON object")
    kind = doc.get("type")
    try:
        if kind == TREE_HEAD:
            return _head(doc, public)
        if kind == INCLUSION:
            return _inclusion(doc, public)
        if kind == CONSISTENCY:
            return _consistency(doc, public)
        if kind == CERTIFICATE:
            return _certificate(doc, public)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise Altered(f"malformed {kind}: {type(exc).__name__}: {exc}") from None
    raise Altered(f"unknown document type {kind!r}")


def _signed(doc: dict, public: Ed25519PublicKey, what: str) -> None:
    if doc.get("key_id") != key_id(public):
        raise Altered(f"{what}: signed by key {doc.get('key_id')!r}, not by the key given ({key_id(public)})")
    if not check(public, doc):
        raise Altered(f"{what}: the signature does not match its content")


def _head(head: dict, public: Ed25519PublicKey, what: str = "tree head") -> str:
    if head.get("type") != TREE_HEAD:
        raise Altered(f"{what}: not a tree head")
    _signed(head, public, what)
    return f"tree head of tenant {head['tenant_id']}: {head['tree_size']} entries, root {head['root_hash']}"


def _included(entry: dict, leaf_hash: str, index: int, size: int, path: list[str], head: dict) -> None:
    if merkle.leaf_hash(canonical(entry)).hex() != leaf_hash:
        raise Altered("the entry does not hash to its leaf hash: the entry was altered")
    if size != head["tree_size"]:
        raise Altered(f"the proof is for tree size {size}, the tree head has {head['tree_size']}")
    if entry["tenant_id"] != head["tenant_id"]:
        raise Altered("the entry and the tree head belong to different tenants")
    root = merkle.root_from_inclusion(index, size, bytes.fromhex(leaf_hash), [bytes.fromhex(p) for p in path])
    if root is None or root.hex() != head["root_hash"]:
        raise Altered(f"the audit path does not lead from leaf {index} to the tree head's root")


def _inclusion(doc: dict, public: Ed25519PublicKey) -> str:
    _head(doc["tree_head"], public)
    _included(doc["entry"], doc["leaf_hash"], doc["leaf_index"], doc["tree_size"], doc["audit_path"],
              doc["tree_head"])
    return (f"entry {doc['entry']['id']} ({doc['entry']['action']}) is leaf {doc['leaf_index']} of the signed "
            f"tree of {doc['tree_size']} entries of tenant {doc['tree_head']['tenant_id']}")


def _consistency(doc: dict, public: Ed25519PublicKey) -> str:
    old, new = doc["first_tree_head"], doc["second_tree_head"]
    _head(old, public, "first tree head")
    _head(new, public, "second tree head")
    if old["tenant_id"] != new["tenant_id"]:
        raise Altered("the two tree heads belong to different tenants")
    if (old["tree_size"], new["tree_size"]) != (doc["first"], doc["second"]):
        raise Altered("the sizes do not match the tree heads")
    if not merkle.verify_consistency(doc["first"], doc["second"], bytes.fromhex(old["root_hash"]),
                                     bytes.fromhex(new["root_hash"]), [bytes.fromhex(p) for p in doc["proof"]]):
        raise Altered(f"the proof does not show that the tree of {doc['second']} entries extends the tree of "
                      f"{doc['first']}: the log was rewritten, or the proof altered")
    return (f"the tree of {doc['second']} entries of tenant {new['tenant_id']} extends the tree of "
            f"{doc['first']} entries (append-only between the two signed heads)")


def _certificate(doc: dict, public: Ed25519PublicKey) -> str:
    _signed(doc, public, "certificate")
    head, entry, proof = doc["tree_head"], doc["log_entry"], doc["inclusion_proof"]
    _head(head, public)
    if entry["action"] != COMPLETED or entry["resource"] != f"deletion_request:{doc['request_id']}":
        raise Altered("the log entry is not this request's completion")
    if entry["details"] != doc["erasure"] or doc["erasure"]["request_id"] != doc["request_id"]:
        raise Altered("the erasure facts differ from the log entry")
    if entry["tenant_id"] != doc["tenant_id"]:
        raise Altered("the log entry belongs to another tenant")
    _included(entry, proof["leaf_hash"], proof["leaf_index"], proof["tree_size"], proof["audit_path"], head)
    e = doc["erasure"]
    return (f"deletion request {doc['request_id']}: {e['n_samples']} sample(s) erased from model {e['model_id']} "
            f"(version {e['version_before']} -> {e['version_after']}); log entry {entry['id']} is leaf "
            f"{proof['leaf_index']} of the signed tree of {proof['tree_size']} entries")
