"""Webhook messages as the Standard Webhooks specification defines them (standardwebhooks.com).

A message is a JSON body ``{"type", "timestamp", "data"}`` sent by POST with three headers:
``webhook-id`` (the message's id: the same on every retry of it), ``webhook-timestamp`` (the
attempt's time, integer Unix seconds) and ``webhook-signature`` (``v1,`` then the base64 of the
HMAC-SHA256 of ``"{id}.{timestamp}.{body}"``, keyed with the endpoint's secret). A secret is
written ``whsec_`` followed by the base64 of its bytes (24 to 64 of them); the key is those bytes.
The receiver recomputes the signature over the raw body and compares it in constant time
(docs/api.md#webhooks has a verifier in a few lines).

Destinations (server-side request forgery): an endpoint may not reach the service's own network
unless ``webhook_allow_private`` says so. :func:`address_refusal` is the one rule, for every address
the service would send to: the API refuses a URL whose host is such an address written out
(:func:`check_url`, no DNS lookup on the request path), and the worker resolves the host before
each attempt, refuses the message for good if any address it resolves to is one, and connects to
the address it checked, so that a name that resolves elsewhere a moment later changes nothing.

The outbox, the endpoints and the delivery log are in service/core/repo/webhooks.py; the worker
sends the messages (worker/webhooks.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import re
import secrets
import socket
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


__all__ = ["EVENT_TYPES", "TEST_EVENT", "address_refusal", "check_url", "literal_address",
           "new_message_id", "new_secret", "secret_key", "sign"]
