"""The torch-free catalog the API validates policies against equals the engine's registries."""

from worker.engine import catalog
from worker.engine.proxies import ALIASES, PROXIES
from worker.engine.unlearners import REGISTRY


def test_catalog_matches_the_registries():
    assert set(catalog.METHODS) == set(REGISTRY)
    assert set(catalog.PROXIES) == set(PROXIES)
    assert ALIASES is catalog.PROXY_ALIASES and set(ALIASES.values()) <= set(PROXIES)
    assert set(catalog.NEEDS_EVENTS) == {n for n, p in PROXIES.items() if p.needs_events}
