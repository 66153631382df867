"""Webhook messages as the Standard Webhooks specification defines them (standardwebhooks.com).

A message is a JSON body ``{"type", "timestamp", "data"}`` sent by POST with three headers:
``webhook-id`` (the message's id: the same on every retry of it), ``webhook-timestamp`` (the
attempt's time, integer Unix seconds) and ``webhook-signature`` (``v1,`` then the base64 of the
HMAC-SHA256 of ``"{id}.{timestamp}.{body}"``, keyed with the endpoint's secret). A secret is
written ``whsec_`` followed by the base64 of its bytes (24 to 64 of them); the key is those bytes.
The receiver recomputes the signature over the raw body and compares it in constant time
(docs/api.md#webhooks has a verifier in a few lines).

Rotation with a grace period: for ``grace_seconds`` after a new secret is set, the superseded one
keeps signing too, so the header carries two signatures, space-separated, the new secret's first
(:func:`sign_all`); the specification lets a header hold several, and a receiver accepts a message
when any of them verifies, so one that has not deployed the new secret yet still accepts it.

Destinations (server-side request forgery): an endpoint may not reach the service's own network
unless ``webhook_allow_private`` says so. :func:`address_refusal` is the one rule, for every address
the service would send to: the API refuses a URL whose host is such an address written out
(:func:`check_url`, no DNS lookup on the request path), and the worker resolves the host before
each attempt, refuses the message for good if any address it resolves to is one, and connects to
the address it checked, so that a name that resolves elsewhere a moment later changes nothing.

Secrets at rest: the database holds an endpoint's secret encrypted (AES-256-GCM, :class:`SecretBox`)
under the deployment's webhook key, a file that ``UNLEARND_WEBHOOK_ENCRYPTION_KEY`` names; without
that setting the embedded default keeps it at ``<data dir>/webhook-key``, created (mode 0600) by the
first process that needs it, as the signing key is (service/core/signing.py). The API encrypts a
secret when it is set and shows it in that answer only; the worker decrypts it to sign each attempt.
A stored secret is ``v1:<key id>:<base64 of nonce and ciphertext>``, bound to its tenant (the
associated data), so a worker with another key, or a value moved to another tenant's endpoint,
fails with an error that says so (:class:`SecretKeyError`) instead of signing with a wrong key.

The outbox, the endpoints and the delivery log are in service/core/repo/webhooks.py; the worker
sends the messages (worker/webhooks.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import socket
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.core.errors import invalid
from service.core.settings import Settings
from service.core.signing import create_key_file

# The events an endpoint can subscribe to (docs/api.md#webhooks says what each carries).
EVENT_TYPES = ("deletion_request.completed", "deletion_request.failed", "job.finished", "version.published",
               "version.purged")
TEST_EVENT = "webhook.test"  # POST /v1/webhooks/{id}/test: sent to that endpoint only
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # a new secret; one given must decode to 24..64 bytes, as the specification asks
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64
MAX_URL_LENGTH = 2048
# rotate-secret: how long the superseded secret keeps signing next to the new one (0: not at all)
DEFAULT_GRACE_S, MAX_GRACE_S = 86_400, 7 * 86_400
SCHEMES = ("http", "https")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
_NUMERIC_HOST = re.compile(r"^[0-9a-fA-FxX.]+$")  # a form inet_aton reads as IPv4: 127.1, 0x7f000001, 2130706433
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 address is the last 32 bits
# Why an address is refused, the first test that holds (after unwrapping an IPv4 address carried in IPv6).
_REFUSED = (("an unspecified address", lambda ip: ip.is_unspecified), ("a loopback address", lambda ip: ip.is_loopback),
            ("a link-local address", lambda ip: ip.is_link_local), ("a multicast address", lambda ip: ip.is_multicast),
            ("a private address", lambda ip: ip.is_private), ("a reserved address", lambda ip: ip.is_reserved),
            ("not a globally routable address", lambda ip: not ip.is_global))


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; Invalid (naming ``secret``) if it is not one."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    if encoded == secret or not _BASE64.match(encoded) or len(encoded) % 4:
        raise invalid("secret", f"must be '{SECRET_PREFIX}' followed by the base64 of {MIN_SECRET_BYTES} to "
                                f"{MAX_SECRET_BYTES} random bytes")
    try:
        key = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise invalid("secret", "is not valid base64 after the prefix") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise invalid("secret", f"decodes to {len(key)} bytes; {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} are accepted")
    return key


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of one attempt."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def sign_all(secrets: list[str], message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header signed with each of ``secrets`` in their order (the current
    secret first, then one still in its grace period), space-separated as the specification allows."""
    if not secrets:
        raise ValueError("a message is never sent unsigned")
    return " ".join(sign(secret, message_id, timestamp, body) for secret in secrets)


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(16)


def address_refusal(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a webhook may not be sent to ``address`` (an IP address), or None if it may: loopback,
    private (RFC 1918, unique-local fc00::/7), link-local (169.254.0.0/16 with the cloud metadata
    address, fe80::/10), multicast, unspecified, reserved and other addresses that are not globally
    routable (100.64.0.0/10, documentation ranges…), also when carried in IPv6 (IPv4-mapped
    ::ffff:a.b.c.d, 6to4, NAT64 64:ff9b::/96). Allowed anyway under ``webhook_allow_private``."""
    ip = ipaddress.ip_address(address.split("%", 1)[0] if isinstance(address, str) else address)
    inner = None
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (
            ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None)
    judged = inner or ip  # a wrapped IPv4 address is judged by itself
    for kind, test in _REFUSED:
        if test(judged):
            return f"{judged}{f' (carried in {ip})' if inner else ''} is {kind}"
    return None


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a URL's host names by itself, without DNS (IPv6 without brackets, also the
    short IPv4 forms a resolver reads as an address: 127.1, 0x7f000001, 2130706433), or None."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if _NUMERIC_HOST.match(host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def check_url(url: str, *, allow_private: bool = False) -> str:
    """An endpoint URL: absolute http or https with a host, no user name or password (they would
    be shown in the delivery log), no fragment, and unless ``allow_private`` no host that is an
    address :func:`address_refusal` refuses; Invalid naming ``url`` otherwise. A host name is not
    resolved here: the worker checks what it resolves to before each attempt."""
    if len(url) > MAX_URL_LENGTH:
        raise invalid("url", f"must be at most {MAX_URL_LENGTH} characters")
    if url != url.strip() or any(c.isspace() for c in url):
        raise invalid("url", "must not contain white space")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise invalid("url", f"is not a URL ({exc})") from None
    if parts.scheme.lower() not in SCHEMES:
        raise invalid("url", "must be an http:// or https:// URL")
    if not parts.hostname:
        raise invalid("url", "must name a host")
    if parts.username is not None or parts.password is not None:
        raise invalid("url", "must not carry a user name or password (the secret signs each message)")
    if parts.fragment or url.endswith("#"):
        raise invalid("url", "must not have a fragment")
    if port == 0:
        raise invalid("url", "port 0 is not a port to send to")
    address = literal_address(parts.hostname)
    why = None if allow_private or address is None else address_refusal(address)
    if why:
        raise invalid("url", f"must not point into a private network: {why} (a deployment whose receivers "
                             "are on its own network sets UNLEARND_WEBHOOK_ALLOW_PRIVATE)")
    return url


# --- secrets at rest ------------------------------------------------------------------------------

KEY_FILE = "webhook-key"
KEY_BYTES = 32  # AES-256
SEALED_VERSION = "v1"
_NONCE_BYTES = 12


class SecretKeyError(RuntimeError):
    """The webhook key is missing or unusable, or a stored secret does not decrypt with it."""


class SecretBox:
    """The deployment's webhook key: encrypts a secret for the database (:meth:`seal`) and decrypts
    it to sign (:meth:`open`). ``source`` says where the key came from, for error messages."""

    def __init__(self, key: bytes, source: str = "the webhook key"):
        if len(key) != KEY_BYTES:
            raise SecretKeyError(f"{source} must be {KEY_BYTES} bytes, not {len(key)}")
        self._aead, self.source = AESGCM(key), source
        # names the key in stored values and messages without saying anything of it
        self.key_id = hashlib.sha256(b"unlearnd webhook key\0" + key).hexdigest()[:16]

    @staticmethod
    def _bound_to(tenant_id: int) -> bytes:
        return f"unlearnd webhook secret, tenant {tenant_id}".encode()

    def seal(self, secret: str, tenant_id: int) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, secret.encode(), self._bound_to(tenant_id))
        return f"{SEALED_VERSION}:{self.key_id}:{base64.b64encode(nonce + sealed).decode()}"

    def open(self, stored: str, tenant_id: int) -> str:
        """The secret ``stored`` holds; SecretKeyError saying why when it cannot be had."""
        if stored.startswith(SECRET_PREFIX):
            raise SecretKeyError("the endpoint's secret is stored in clear (a database not migrated: run "
                                 "`unlearnd migrate`)")
        version, _, rest = stored.partition(":")
        key_id, _, blob = rest.partition(":")
        if version != SEALED_VERSION or not key_id or not blob:
            raise SecretKeyError("the endpoint's secret is not in a form this version reads")
        if key_id != self.key_id:
            raise SecretKeyError(f"the endpoint's secret was encrypted under webhook key {key_id}, and this "
                                 f"process has key {self.key_id} ({self.source}): give the API and every worker "
                                 "the same UNLEARND_WEBHOOK_ENCRYPTION_KEY, or set a new secret "
                                 "(POST /v1/webhooks/{id}/rotate-secret)")
        try:
            raw = base64.b64decode(blob, validate=True)
            return self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], self._bound_to(tenant_id)).decode()
        except (binascii.Error, InvalidTag, ValueError):
            raise SecretKeyError(f"the endpoint's secret does not decrypt with webhook key {self.key_id}: it was "
                                 "altered in the database, or belongs to another tenant's endpoint") from None

    def __repr__(self) -> str:  # never print the key
        return f"SecretBox(key_id={self.key_id})"


def key_path(settings: Settings) -> Path:
    return (settings.webhook_encryption_key or settings.data_dir / KEY_FILE).resolve()


def load_box(settings: Settings) -> SecretBox:
    """The deployment's webhook key (:func:`key_bytes`) as a :class:`SecretBox`."""
    return SecretBox(key_bytes(settings), str(key_path(settings)))


def key_bytes(settings: Settings) -> bytes:
    """The deployment's webhook key; created at the embedded default's path on first use. A
    configured ``UNLEARND_WEBHOOK_ENCRYPTION_KEY`` that does not exist is an error, never replaced by
    a new key (the secrets encrypted under the old one would be lost). SecretKeyError says why."""
    path = key_path(settings)
    try:
        if not path.exists():
            if settings.webhook_encryption_key is not None:
                raise SecretKeyError(f"UNLEARND_WEBHOOK_ENCRYPTION_KEY names {path}, which does not exist")
            create_key_file(path, new_key_text().encode("ascii"))
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretKeyError(f"the webhook key {path} cannot be read: {exc}") from None
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error:
        key = b""
    if len(key) != KEY_BYTES:
        raise SecretKeyError(f"{path} is not a webhook key (the base64 of {KEY_BYTES} random bytes)")
    return key


def new_key_text() -> str:
    """A new webhook key as its file holds it (``UNLEARND_WEBHOOK_ENCRYPTION_KEY``)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n"


__all__ = ["DEFAULT_GRACE_S", "EVENT_TYPES", "MAX_GRACE_S", "TEST_EVENT", "SecretBox", "SecretKeyError",
           "address_refusal", "check_url", "key_bytes", "key_path", "literal_address", "load_box", "new_key_text",
           "new_message_id", "new_secret", "secret_key", "sign", "sign_all"]
