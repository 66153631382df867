"""Webhook destinations (server-side request forgery): one rule, ``address_refusal``, for the URL an
endpoint is registered with (a host written as an address) and for every address its host resolves
to before each attempt; a refused destination is given up at once, and the connection goes to the
address that was checked. ``webhook_allow_private`` lets a deployment send to its own network (and
these tests to a receiver on loopback)."""

from __future__ import annotations

import socket

import pytest

from service.core import webhooks as standard
from service.core.errors import Invalid
from service.core.models import utcnow
from service.core.repo import webhooks
from tests.worker.test_webhooks import (  # noqa: F401 - webhook_key: the autouse fixture of those tests
    endpoint,
    publish,
    receiving,
    rows,
    settings,
    tenant,
    webhook_key,
)
from worker import webhooks as sender
from worker.webhooks import deliver

REFUSED = ["127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.0.10", "169.254.169.254", "100.64.0.1",
           "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fc00::1", "fd12:3456::1",
           "fe80::1", "fe80::1%eth0", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",
           "64:ff9b::a9fe:a9fe", "2002:7f00:1::1"]
ALLOWED = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.fixture
def db(migrated_db):
    return migrated_db


@pytest.mark.parametrize("address", REFUSED)
def test_private_addresses_are_refused(address):
    assert standard.address_refusal(address)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_not(address):
    assert standard.address_refusal(address) is None


def test_the_reason_names_the_address_and_what_it_is():
    assert standard.address_refusal("169.254.169.254") == "169.254.169.254 is a link-local address"
    assert "127.0.0.1" in standard.address_refusal("::ffff:127.0.0.1")
    assert "loopback" in standard.address_refusal("::ffff:127.0.0.1")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "http://169.254.169.254/latest/meta-data/",
                                 "https://[::1]/h", "http://[::ffff:127.0.0.1]/h", "http://[::ffff:a9fe:a9fe]/",
                                 "http://10.0.0.5/h", "http://[fd00::5]/h", "http://0.0.0.0:80/",
                                 "http://127.1/h", "http://2130706433/h", "http://0x7f000001/h", "http://[fe80::1%25eth0]/"])
def test_a_url_that_names_a_private_address_is_refused_unless_allowed(url):
    with pytest.raises(Invalid) as e:
        standard.check_url(url)
    assert e.value.field == "url"
    assert standard.check_url(url, allow_private=True) == url


def test_a_host_name_is_not_resolved_at_registration(monkeypatch):
    def no_dns(*a, **k):
        raise AssertionError("the API looked a name up")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    for url in ("http://localhost:8080/h", "https://hooks.example.com/x", "http://8.8.8.8/", "http://1e100.net/"):
        assert standard.check_url(url) == url


# --------------------------------------------------------------------------- at delivery


def _fake_dns(monkeypatch, answers: dict[str, list[str]]):
    """``resolve`` answers these names with these addresses (in order), and only them."""

    def resolve(host, port):
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                 (a, port, 0, 0) if ":" in a else (a, port)) for a in answers[host]]

    monkeypatch.setattr(sender, "resolve", resolve)


@pytest.fixture
def at_localhost(db):
    """A receiver on loopback, registered by the name ``localhost``, with one message for it."""
    acme = tenant(db, "acme")
    with receiving(standard.new_secret(), []) as receiver:
        endpoint(db, acme, receiver.url.replace("127.0.0.1", "localhost"), secret=receiver.secret)
        publish(db, acme)
        yield receiver


def test_a_name_that_resolves_to_loopback_is_given_up_at_once(db, at_localhost):
    assert deliver(db, settings(webhook_allow_private=False)) == {"sent": 1, "delivered": 0, "failed": 1}
    assert deliver(db, settings(webhook_allow_private=False))["sent"] == 0  # no retries
    assert at_localhost.got == []
    (row,) = rows(db)
    assert (row.status, row.attempts, row.last_status_code, row.next_attempt_at) == ("failed", 1, None, None)
    assert row.last_error.startswith("refused: localhost resolves to ") and "loopback" in row.last_error
    assert "UNLEARND_WEBHOOK_ALLOW_PRIVATE" in row.last_error


def test_the_same_name_is_delivered_when_private_destinations_are_allowed(db, at_localhost):
    assert deliver(db, settings(webhook_allow_private=True)) == {"sent": 1, "delivered": 1, "failed": 0}
    (got,) = at_localhost.got
    assert got["valid"] and got["headers"]["host"] == f"localhost:{at_localhost.server.server_port}"


def test_one_private_address_among_public_ones_is_enough_to_refuse(db, monkeypatch):
    acme = tenant(db, "acme")
    endpoint(db, acme, "https://hooks.example.test/h")
    _fake_dns(monkeypatch, {"hooks.example.test": ["93.184.216.34", "169.254.169.254"]})
    publish(db, acme)
    assert deliver(db, settings(webhook_allow_private=False))["failed"] == 1
    (row,) = rows(db)
    assert row.status == "failed" and "169.254.169.254 is a link-local address" in row.last_error


def test_the_connection_goes_to_the_checked_address_with_the_urls_host(db, monkeypatch):
    """The name is looked up once per attempt and the connection made to what that lookup gave (here
    a name that no real resolver knows), with the URL's Host header: a second lookup that could
    answer differently (DNS rebinding) never happens."""
    acme = tenant(db, "acme")
    lookups = []
    with receiving(standard.new_secret(), []) as receiver:
        port = receiver.server.server_port
        endpoint(db, acme, f"http://rebind.example.test:{port}/hook?x=1", secret=receiver.secret)
        _fake_dns(monkeypatch, {"rebind.example.test": ["127.0.0.1"]})
        checked = sender.resolve
        monkeypatch.setattr(sender, "resolve", lambda h, p: lookups.append(h) or checked(h, p))
        publish(db, acme)
        assert deliver(db, settings(webhook_allow_private=True))["delivered"] == 1
    (got,) = receiver.got
    assert got["valid"] and got["headers"]["host"] == f"rebind.example.test:{port}"
    assert lookups == ["rebind.example.test"]


def test_a_name_that_does_not_resolve_is_retried(db, monkeypatch):
    """Not a refusal: DNS may be down for a while."""
    acme = tenant(db, "acme")
    endpoint(db, acme, "https://hooks.example.test/h")

    def down(host, port):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(sender, "resolve", down)
    publish(db, acme)
    assert deliver(db, settings(webhook_allow_private=False))["failed"] == 0
    (row,) = rows(db)
    assert (row.status, row.attempts) == ("pending", 1) and "name resolution" in row.last_error


def test_record_attempt_gives_up_a_permanent_failure_at_once(db):
    acme = tenant(db, "acme")
    endpoint(db, acme, "http://127.0.0.1:9/a")
    publish(db, acme)
    (attempt,) = webhooks.claim(db, utcnow(), 10, 60.0)
    with db.transaction() as s:
        assert webhooks.record_attempt(s, attempt, None, "refused", utcnow(), max_attempts=12, retry_base_s=1,
                                       retry_max_s=1, permanent=True) == "failed"

