"""Sending webhook messages from the outbox (service/core/repo/webhooks.py).

One run claims the due messages, POSTs each, signed as the Standard Webhooks specification says
(service/core/webhooks.py), from a small thread pool so that a slow endpoint does not hold the
others, and records every result: a 2xx delivers it; anything else (another status, a redirect, a
refused connection, a timeout) schedules the next attempt after an exponential backoff, until
``webhook_max_attempts``. Each attempt has a new timestamp and signature and the same
``webhook-id``. Nothing here raises: an endpoint cannot break the worker.

Before each attempt the host is resolved, and unless ``webhook_allow_private`` the message is
given up at once (no retries) if any address is one ``address_refusal`` refuses (loopback,
private, link-local with the cloud metadata address…). The connection goes to the addresses that
were checked, not to a second lookup of the name, so a name that resolves elsewhere between the
check and the connection (DNS rebinding) cannot reach them; the Host header and, for https, the
server name (SNI) and the certificate check stay those of the URL. No HTTP proxy is used.

The endpoint's secret is decrypted with the deployment's webhook key (service/core/webhooks.py
SecretBox) just before its attempts; during the grace period of a rotation the secret it superseded
is decrypted too and both sign (the new one first, in the same ``webhook-signature`` header). A key
that is missing or unreadable, or a secret that does not decrypt with it (encrypted under another
key, altered), gives the message up at once with ``last_error`` saying why: nothing is sent
unsigned or signed with a wrong key, and the worker goes on. A previous secret that does not
decrypt is left out (logged): the current one signs alone.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from service.core import webhooks as standard
from service.core.db import Database
from service.core.models import utcnow
from service.core.repo import webhooks
from service.core.settings import Settings

log = logging.getLogger("unlearnd.webhooks")
USER_AGENT = "unlearnd-webhooks/1"
MAX_ANSWER_BYTES = 64 << 10  # read (and drop) at most this much of an answer
LEASE_MARGIN_S = 60.0


_TLS = ssl.create_default_context()


@dataclass(frozen=True)
class Outcome:
    status_code: int | None  # the endpoint's answer, None when there was none
    error: str | None  # why the attempt failed; None when it delivered
    permanent: bool = False  # retrying cannot help: the destination is refused


def resolve(host: str, port: int) -> list[tuple]:
    """The addresses ``host`` resolves to, as ``getaddrinfo`` gives them (TCP only)."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def destination(host: str, port: int, allow_private: bool) -> tuple[list[tuple], str | None]:
    """The checked addresses to connect to, or why the host is refused (any address refused is
    enough: which one a connection would take is not ours to choose)."""
    found = resolve(host, port)
    if not allow_private:
        for *_, sockaddr in found:
            why = standard.address_refusal(sockaddr[0])
            if why:
                return [], (f"refused: {host} resolves to {why}; webhooks are not sent into private networks "
                            "unless UNLEARND_WEBHOOK_ALLOW_PRIVATE is set")
    return found, None


def _connector(found: list[tuple]):
    """``socket.create_connection`` for http.client, to the checked addresses only, in order."""

    def connect(_address, timeout, source_address=None):
        last: OSError | None = None
        for family, kind, proto, _, sockaddr in found:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        raise last or OSError("no address to connect to")

    return connect


def post(attempt: webhooks.Attempt, secrets: list[str], timeout: float, allow_private: bool = False) -> Outcome:
    """One POST signed with each of ``secrets`` (in clear: the endpoint's, then the one a rotation
    superseded while its grace period lasts) to the checked addresses of the endpoint's host;
    redirects are not followed."""
    body = attempt.body.encode()
    timestamp = int(time.time())
    conn = None
    try:
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "webhook-id": attempt.message_id,
                   "webhook-timestamp": str(timestamp),
                   "webhook-signature": standard.sign_all(secrets, attempt.message_id, timestamp, body),
                   "Connection": "close"}
        url = urlsplit(attempt.url)
        https = url.scheme.lower() == "https"
        port = url.port or (443 if https else 80)
        found, refused = destination(url.hostname, port, allow_private)
        if refused:
            return Outcome(None, refused, permanent=True)
        conn = (http.client.HTTPSConnection(url.hostname, port, timeout=timeout, context=_TLS) if https
                else http.client.HTTPConnection(url.hostname, port, timeout=timeout))
        conn._create_connection = _connector(found)  # connect() calls it; the Host header and SNI keep the name
        conn.request("POST", (url.path or "/") + (f"?{url.query}" if url.query else ""), body=body, headers=headers)
        answer = conn.getresponse()
        answer.read(MAX_ANSWER_BYTES)
        code = answer.status
        return Outcome(code, None if 200 <= code < 300 else f"HTTP {code}")
    except Exception as exc:  # refused, reset, timed out, a name that does not resolve, bad TLS…
        return Outcome(None, f"{type(exc).__name__}: {exc}"[:500])
    finally:
        if conn is not None:
            conn.close()


def attempt_once(attempt: webhooks.Attempt, box: standard.SecretBox | None, key_error: str | None,
                 settings: Settings) -> Outcome:
    """Decrypt the endpoint's secret (and the previous one, during its grace period) and POST; a
    secret that cannot be had gives the message up. A previous secret that cannot be had is left
    out (the log says why): the current one still signs."""
    try:
        if box is None:
            raise standard.SecretKeyError(key_error or "no webhook key")
        secrets = [box.open(attempt.encrypted_secret, attempt.tenant_id)]
    except standard.SecretKeyError as exc:
        return Outcome(None, f"not sent: {exc}"[:500], permanent=True)
    if attempt.previous_encrypted_secret is not None:
        try:
            secrets.append(box.open(attempt.previous_encrypted_secret, attempt.tenant_id))
        except standard.SecretKeyError as exc:
            log.warning("webhook message %s to %s: signed without the previous secret: %s", attempt.message_id,
                        attempt.url, exc)
    return post(attempt, secrets, settings.webhook_timeout_s, settings.webhook_allow_private)


def deliver(db: Database, settings: Settings) -> dict:
    """One run: claim up to ``webhook_batch`` due messages, send them, record the results."""
    attempts = webhooks.claim(db, utcnow(), settings.webhook_batch, settings.webhook_timeout_s * 3 + LEASE_MARGIN_S)
    if not attempts:
        return {"sent": 0, "delivered": 0, "failed": 0}
    box, key_error = None, None
    try:
        box = standard.load_box(settings)
    except standard.SecretKeyError as exc:
        key_error = f"the webhook key is unavailable: {exc}"
        log.error("webhooks: %s; the %d message(s) claimed are given up", key_error, len(attempts))
    with ThreadPoolExecutor(max_workers=max(1, min(settings.webhook_concurrency, len(attempts))),
                            thread_name_prefix="unlearnd-webhook") as pool:
        results = list(pool.map(lambda a: attempt_once(a, box, key_error, settings), attempts))
    counts = {"sent": len(attempts), "delivered": 0, "failed": 0}
    now = utcnow()
    with db.transaction() as session:
        for attempt, out in zip(attempts, results, strict=True):
            status = webhooks.record_attempt(
                session, attempt, out.status_code, out.error, now, max_attempts=settings.webhook_max_attempts,
                retry_base_s=settings.webhook_retry_base_s, retry_max_s=settings.webhook_retry_max_s,
                permanent=out.permanent)
            if status in counts:
                counts[status] += 1
            if status == "failed":
                log.warning("webhook message %s to %s given up after %d attempt(s): %s", attempt.message_id,
                            attempt.url, attempt.attempt, out.error)
    return counts


__all__ = ["Outcome", "attempt_once", "deliver", "destination", "post", "resolve"]
