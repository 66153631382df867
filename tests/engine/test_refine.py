"""Refinement: memorization bins, RUM's forget-set builders, entanglement score (on digits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from worker.engine.errors import ConfigError
from worker.engine.refine import (
    bin_by_cuts,
    build_forget_set,
    embeddings,
    entanglement_score,
    forget_subsets,
    proxy_thresholds,
    refine,
)


@pytest.fixture(scope="module")
def proxy(learning_events) -> np.ndarray:
    """Confidence proxy oriented higher = more memorized (1 − mean p_y over training)."""
    return 1.0 - learning_events.means()["confidence"].astype(np.float64)


def test_bins_partition_the_forget_set_low_to_high(proxy, forget_rows):
    bins = refine(forget_rows, proxy)
    rows = torch.cat([b.rows for b in bins])
    assert sorted(rows.tolist()) == sorted(forget_rows.tolist())  # every row exactly once
    assert [b.index for b in bins] == sorted(b.index for b in bins)
    medians = [b.proxy_median for b in bins]
    assert all(a < b for a, b in zip(medians, medians[1:])), medians
    for b in bins:
        v = proxy[b.rows.numpy()]
        assert (v > b.low).all() and (v <= b.high).all()
        assert b.proxy_min == pytest.approx(v.min()) and b.proxy_max == pytest.approx(v.max())
    # default cut points are the tertiles of the whole training distribution
    assert [bins[0].high, bins[-1].low] == pytest.approx(list(np.quantile(proxy, [1 / 3, 2 / 3])))
    assert [b.level for b in bins] == ["low", "mid", "high"]
    json_ready = bins[0].to_dict()
    assert json_ready["low"] is None and json_ready["n"] == len(bins[0])


def test_thresholds_come_from_the_whole_training_set(proxy):
    # 30 least memorized training rows: within-S tertiles would split them in three;
    # whole-train tertiles put all of them in the low band and skip the two empty bins.
    lowest = torch.from_numpy(np.argsort(proxy)[:30].copy())
    bins = refine(lowest, proxy)
    assert len(bins) == 1 and bins[0].index == 0 and bins[0].level == "low" and len(bins[0]) == 30
    highest = torch.from_numpy(np.argsort(proxy)[-30:].copy())
    (only,) = refine(highest, proxy)
    assert only.index == 2 and only.level == "high"


def test_explicit_quantiles_and_thresholds(proxy, forget_rows):
    med = float(np.median(proxy))
    by_q = refine(forget_rows, proxy, quantiles=[0.5])
    by_t = refine(forget_rows, proxy, thresholds=[med])
    assert [b.level for b in by_q] == ["low", "high"]
    assert [b.rows.tolist() for b in by_q] == [b.rows.tolist() for b in by_t]
    assert len(refine(forget_rows, proxy, bins=5)) <= 5
    assert refine(forget_rows, proxy, bins=1)[0].rows.tolist() == forget_rows.tolist()
    for bad in ([0.5, 0.4], [0.0, 0.5], [1.2]):
        with pytest.raises(ConfigError, match="quantiles"):
            refine(forget_rows, proxy, quantiles=bad)
    with pytest.raises(ConfigError, match="thresholds"):
        refine(forget_rows, proxy, thresholds=[0.3, 0.2])
    with pytest.raises(ConfigError, match="forget_rows"):
        refine(torch.tensor([len(proxy)]), proxy)
    with pytest.raises(ConfigError, match="proxy"):
        refine(forget_rows, np.full(len(proxy), np.nan))


def test_tied_discrete_proxy_gives_equal_cuts_and_skips_the_empty_band():
    values = np.array([0.0] * 50 + [1.0] * 10)  # e.g. 1 − binary accuracy: mostly zeros
    cuts = proxy_thresholds(values)
    assert cuts == [0.0, 0.0]
    bins = bin_by_cuts(np.arange(60), values, cuts)
    # a value on a cut point belongs to the lower band: the tied zeros stay low, the middle band is empty
    assert [(b.index, len(b)) for b in bins] == [(0, 50), (2, 10)]
    bins = refine(np.arange(60), values, thresholds=[0.5])
    assert [(b.level, len(b)) for b in bins] == [("low", 50), ("high", 10)]


def test_mixed_forget_set_is_high_mid_low_deduplicated(proxy):
    n = 40
    subsets = forget_subsets(proxy, n, seed=0)
    order = np.argsort(proxy)
    assert set(subsets["high"].tolist()) == set(order[-n:].tolist())
    assert set(subsets["low"].tolist()) == set(order[:n].tolist())
    med = np.median(proxy)
    mid_gap = np.abs(proxy[subsets["mid"].numpy()] - med).max()
    others = np.setdiff1d(np.arange(len(proxy)), np.concatenate([s.numpy() for s in subsets.values()]))
    assert mid_gap <= np.abs(proxy[others] - med).min() + 1e-12  # mid = the n closest to the median
    mixed = build_forget_set(proxy, n, "mixed", seed=0)
    assert len(mixed) == 3 * n == len(set(mixed.tolist()))
    assert build_forget_set(proxy, n, "high", seed=0).tolist() == subsets["high"].tolist()
    # the mixed set lands one subset per tertile bin
    assert [len(b) for b in refine(mixed, proxy)] == [n, n, n]


def test_mid_never_overlaps_high_or_low_on_a_bottom_heavy_distribution():
    # center 0.5 sits in the top (docs/proxies-and-metrics.md#forget-sets-of-rums-experiments)
    values = np.array([0.0] * 12 + [0.5, 0.9, 1.0])
    s = forget_subsets(values, 3, center=0.5, seed=1)
    all_rows = torch.cat(list(s.values())).tolist()
    assert len(all_rows) == len(set(all_rows)) == 9
    assert set(s["high"].tolist()) == {12, 13, 14}


def test_random_forget_set_and_bad_arguments(proxy):
    a = build_forget_set(proxy, 10, "random", seed=3)
    assert len(a) == 30 == len(set(a.tolist()))
    assert a.tolist() == build_forget_set(proxy, 10, "random", seed=3).tolist()
    assert a.tolist() != build_forget_set(proxy, 10, "random", seed=4).tolist()
    with pytest.raises(ConfigError, match="kind"):
        build_forget_set(proxy, 10, "hard")
    with pytest.raises(ConfigError, match="n_per_bin"):
        build_forget_set(proxy, len(proxy) // 2, "mixed")


def test_embeddings_are_the_input_of_the_head(original, digits, runtime):
    view = digits.view("test").head(50)
    emb = embeddings(original, view, runtime)
    with torch.no_grad():
        expected = original.features(view.x)
    assert emb.shape == expected.shape
    torch.testing.assert_close(emb, expected, rtol=1e-4, atol=1e-5)


class _HeadFirst(nn.Module):
    """A user model that registers its head before its body: the hook must follow call order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x))


def test_embeddings_follow_call_order_and_need_a_linear_head(digits, runtime):
    torch.manual_seed(0)
    m = _HeadFirst()
    view = digits.view("test").head(10)
    with torch.no_grad():
        expected = m.body(view.x)
    torch.testing.assert_close(embeddings(m, view, runtime), expected)
    with pytest.raises(ConfigError, match="nn.Linear"):
        embeddings(nn.Sequential(nn.Flatten()), view, runtime)


def test_entanglement_random_forget_set_is_more_entangled_than_one_class(original, digits, runtime):
    g = torch.Generator().manual_seed(1)
    rnd = torch.randperm(len(digits.train), generator=g)[:100]
    f, r = digits.forget_retain(rnd)
    es_random = entanglement_score(original, r, f, runtime)
    one_class = torch.nonzero(digits.train.y == 3).squeeze(1)
    f, r = digits.forget_retain(one_class)
    es_class = entanglement_score(original, r, f, runtime)
    assert 0 < es_class < np.inf and 0 < es_random < np.inf
    # a random subset shares the retain set's mean embedding (tiny denominator); one class is far
    assert es_random > 10 * es_class, (es_random, es_class)
