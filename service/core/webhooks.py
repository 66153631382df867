"""Webhook messages as the Standard Webhooks specification defines them (standardwebhooks.com).

A message is a JSON body ``{"type", "timestamp", "data"}`` sent by POST with three headers:
``webhook-id`` (the message's id: the same on every retry of it), ``webhook-timestamp`` (the
attempt's time, integer Unix seconds) and ``webhook-signature`` (``v1,`` then the base64 of the
HMAC-SHA256 of ``"{id}.{timestamp}.{body}"``, keyed with the endpoint's secret). A secret is
written ``whsec_`` followed by the base64 of its bytes (24 to 64 of them); the key is those bytes.
The receiver recomputes the signature over the raw body and compares it in constant time
(docs/api.md#webhooks has a verifier in a few lines).

The outbox, the endpoints and the delivery log are in service/core/repo/webhooks.py; the worker
sends the messages (worker/webhooks.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from urllib.parse import urlsplit

from service.core.errors import invalid

# The events an endpoint can subscribe to (docs/api.md#webhooks says what each carries).
EVENT_TYPES = ("deletion_request.completed", "deletion_request.failed", "job.finished", "version.published",
               "version.purged")
TEST_EVENT = "webhook.test"  # POST /v1/webhooks/{id}/test: sent to that endpoint only
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # a new secret; one given must decode to 24..64 bytes, as the specification asks
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64
MAX_URL_LENGTH = 2048
SCHEMES = ("http", "https")
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")


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


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(16)


def check_url(url: str) -> str:
    """An endpoint URL: absolute http or https with a host, no user name or password (they would
    be shown in the delivery log), no fragment; Invalid naming ``url`` otherwise."""
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
    return url


__all__ = ["EVENT_TYPES", "TEST_EVENT", "check_url", "new_message_id", "new_secret", "secret_key", "sign"]
