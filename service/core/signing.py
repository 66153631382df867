"""The deployment's Ed25519 signing key: tree heads and erasure certificates are signed with it.

The key is a PKCS#8 PEM file: ``UNLEARND_SIGNING_KEY`` names it; without that setting the embedded
default keeps it at ``<data dir>/signing-key.pem``, created (mode 0600) by the first process that
needs it. Only the sequencer (in a worker) reads the private key; the API serves the public key
from the database (``signing_keys``, registered by the sequencer), so an API process never holds
it. The key is never logged: only its id, the sha256 of the raw 32-byte public key, is.

Signed documents are JSON objects; the signature covers the canonical JSON (keys sorted, no
spaces, ASCII) of the object without its ``signature`` member, so anyone can check it with a few
lines of code (docs/transparency.md).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.core.settings import Settings

KEY_FILE = "signing-key.pem"


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def unsigned(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "signature"}


def key_id(public: Ed25519PublicKey) -> str:
    return hashlib.sha256(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()


def public_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """A PEM public key (or a private key, whose public half is taken); ValueError if it is not Ed25519."""
    data = pem.encode() if isinstance(pem, str) else pem
    if b"PRIVATE KEY" in data:
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("not an Ed25519 key")
        return key.public_key()
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def check(public: Ed25519PublicKey, doc: dict) -> bool:
    """Is ``doc['signature']`` a valid signature of ``doc`` (without it) by ``public``?"""
    try:
        public.verify(base64.b64decode(doc["signature"], validate=True), canonical(unsigned(doc)))
        return True
    except (InvalidSignature, KeyError, TypeError, ValueError):
        return False


@dataclass(frozen=True)
class Signer:
    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    @property
    def key_id(self) -> str:
        return key_id(self.public)

    @property
    def public_pem(self) -> str:
        return public_pem(self.public)

    def sign(self, doc: dict) -> dict:
        """``doc`` with its ``key_id`` and a ``signature`` over everything else."""
        body = {**unsigned(doc), "key_id": self.key_id}
        return {**body, "signature": base64.b64encode(self.private.sign(canonical(body))).decode()}

    def __repr__(self) -> str:  # never print the key
        return f"Signer(key_id={self.key_id})"


class SigningKeyMissing(RuntimeError):
    pass


def key_path(settings: Settings) -> Path:
    return (settings.signing_key or settings.data_dir / KEY_FILE).resolve()


def load_signer(settings: Settings) -> Signer:
    """The deployment's key; created at the embedded default's path on first use. A configured
    ``UNLEARND_SIGNING_KEY`` that does not exist is an error, never replaced by a new key."""
    path = key_path(settings)
    if not path.exists():
        if settings.signing_key is not None:
            raise SigningKeyMissing(f"UNLEARND_SIGNING_KEY names {path}, which does not exist")
        pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption())
        create_key_file(path, pem)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyMissing(f"{path} is not an Ed25519 private key")
    return Signer(key)


def create_key_file(path: Path, data: bytes) -> None:
    """Write a new key file (mode 0600) without ever replacing one: a temporary file, then a hard
    link that fails if another process created the key meanwhile (theirs wins). Used for the
    signing key and the webhook key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
