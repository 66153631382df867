"""Memorization proxies and the Feldman–Zhang estimator on scikit-learn's digits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from worker.engine import architectures
from worker.engine.data import from_arrays
from worker.engine.datafile import validate_arrays
from worker.engine.errors import Cancelled, ConfigError, DatasetError
from worker.engine.events import EVENT_KEYS, REDACTED, LearningEvents, read_events, redact_events
from worker.engine.memorization import estimate_memorization
from worker.engine.proxies import (
    PROXIES,
    ProxyResult,
    available_proxies,
    check_proxy,
    compute_proxy,
    default_proxy,
)
from worker.engine.refine import build_forget_set, proxy_thresholds, refine
from worker.engine.runtime import RunContext
from worker.engine.sample_data import digits_arrays
from worker.engine.targets import proxy_quantiles
from worker.engine.training import TrainConfig, train_model

# (no global torch.set_num_threads here: changing it mid-process crashed later tests)

N_FLIP = 20
FAST = {"holdout_retrain": {"ft_epochs": 8}}  # keeps the file fast; the recipe is otherwise the default


def noisy_arrays(n_train: int | None = None, n_flip: int = N_FLIP, seed: int = 1) -> tuple[dict, np.ndarray]:
    """Digits with ``n_flip`` training labels changed to another class; returns (arrays, flipped rows)."""
    raw = digits_arrays()
    n = n_train or len(raw["y_train"])
    rng = np.random.default_rng(seed)
    flip = np.sort(rng.choice(n, n_flip, replace=False))
    y = raw["y_train"][:n].copy()
    y[flip] = (y[flip] + rng.integers(1, 10, n_flip)) % 10
    return {**raw, "x_train": raw["x_train"][:n], "y_train": y, "ids_train": raw["ids_train"][:n]}, flip


class _Poison:
    """Stands in for a split that must never be read."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        raise AssertionError("the test split was read (len)")


@pytest.fixture(scope="module")
def noisy(runtime):
    """A small CNN trained 12 epochs with learning events on digits with 20 flipped labels."""
    raw, flip = noisy_arrays()
    data = from_arrays(validate_arrays(raw), mean=[0.5], std=[0.5])
    spec = architectures.default_spec("small_cnn", data.input_shape, data.num_classes, width=16)
    events = LearningEvents.empty(len(data.train))
    model = train_model(architectures.build(spec), data.view("train"), TrainConfig(epochs=12, seed=0),
                        runtime=runtime, events=events)
    results = {name: compute_proxy(name, model, data, runtime, events=events, **FAST.get(name, {}))
               for name in available_proxies()}
    return data, flip, results


def test_registry_and_defaults():
    names = available_proxies()
    assert {"confidence", "max_conf", "entropy", "bi_acc", "holdout_retrain", "loss_curvature"} <= set(names)
    assert {f"{k}_final" for k in ("confidence", "max_conf", "entropy", "bi_acc")} <= set(names)
    assert default_proxy(True) == "confidence"
    assert default_proxy(False) == "holdout_retrain"
    assert default_proxy(False, has_holdout=False) == "loss_curvature"
    for name in names:
        info = PROXIES[name]
        assert info.needs_events == (info.source == "events")
        assert not PROXIES[default_proxy(False, has_holdout=False)].needs_holdout
    assert check_proxy("ho_ret").name == "holdout_retrain"
    assert check_proxy("confidence", has_events=True).needs_events


def test_config_errors_name_the_problem(original, digits, runtime):
    with pytest.raises(ConfigError, match="'memorability'"):
        compute_proxy("memorability", original, digits, runtime)
    with pytest.raises(ConfigError, match="'memorability'"):
        check_proxy("memorability")
    with pytest.raises(ConfigError, match="unknown proxy"):
        check_proxy(["confidence"])
    with pytest.raises(ConfigError, match="lr_typo"):
        compute_proxy("holdout_retrain", original, digits, runtime, lr_typo=0.1)
    with pytest.raises(ConfigError, match="ft_epochs"):
        check_proxy("holdout_retrain", {"ft_epochs": 0})
    with pytest.raises(ConfigError, match="proxy_params.h"):
        check_proxy("loss_curvature", {"h": [0.01, -1]})
    with pytest.raises(ConfigError, match="learning events"):
        compute_proxy("confidence", original, digits, runtime, events=None)
    with pytest.raises(ConfigError, match="learning events"):
        check_proxy("bi_acc", has_events=False)
    with pytest.raises(ConfigError, match="holdout"):
        check_proxy("holdout_retrain", has_holdout=False)


def test_every_proxy_one_finite_value_per_train_row(original, digits, runtime, learning_events):
    for name in available_proxies():
        r = compute_proxy(name, original, digits, runtime, events=learning_events, **FAST.get(name, {}))
        assert isinstance(r, ProxyResult) and r.name == name
        assert r.values.shape == (len(digits.train),) and r.values.dtype == np.float64
        assert np.isfinite(r.values).all(), name
        assert r.source == PROXIES[name].source and r.seconds >= 0
        if name != "bi_acc_final":  # 0/1 per row: constant once the model fits every training row
            assert r.values.std() > 0, f"{name} is constant"


@pytest.mark.parametrize("name", sorted(PROXIES))
def test_mislabeled_examples_score_higher(noisy, name):
    """Orientation: flipped-label examples are memorized (or not learned), so they score higher."""
    data, flip, results = noisy
    values = results[name].values
    assert values.shape == (len(data.train),) and np.isfinite(values).all()
    mislabeled = np.zeros(len(values), dtype=bool)
    mislabeled[flip] = True
    assert values[mislabeled].mean() > values[~mislabeled].mean(), (
        f"{name}: mislabeled {values[mislabeled].mean():.4f} <= clean {values[~mislabeled].mean():.4f}"
    )


def test_holdout_retrain_refuses_a_dataset_without_holdout(original, digits, runtime):
    with pytest.raises(DatasetError, match="holdout"):
        compute_proxy("holdout_retrain", original, dataclasses.replace(digits, holdout=None), runtime)


def test_holdout_retrain_never_reads_the_test_split_nor_changes_the_model(original, digits, runtime):
    before = {k: v.clone() for k, v in original.state_dict().items()}
    poisoned = dataclasses.replace(digits, test=_Poison())
    r = compute_proxy("holdout_retrain", original, poisoned, runtime, ft_epochs=3)
    again = compute_proxy("holdout_retrain", original, digits, runtime, ft_epochs=3)
    np.testing.assert_allclose(r.values, again.values, rtol=1e-5, atol=1e-7)
    assert r.params["ft_epochs"] == 3 and r.params["ft_lr"] == 0.1
    for k, v in original.state_dict().items():
        assert torch.equal(v, before[k]), f"holdout_retrain modified {k}"


def test_events_from_a_file_give_the_same_proxy(original, digits, runtime, learning_events, tmp_path):
    path = tmp_path / "events.npz"
    learning_events.save(path, digits.ids)
    # a file written in another row order is realigned by id
    shuffled = tmp_path / "shuffled.npz"
    perm = np.random.default_rng(0).permutation(len(digits.train))
    shuffled_events = LearningEvents(learning_events.sums[perm], learning_events.count[perm])
    shuffled_events.save(shuffled, np.asarray(digits.ids)[perm])
    for name in ("confidence", "max_conf", "entropy", "bi_acc"):
        memory = compute_proxy(name, original, digits, runtime, events=learning_events).values
        from_dict = compute_proxy(name, original, digits, runtime, events=read_events(path, digits.ids)).values
        from_path = compute_proxy(name, original, digits, runtime, events=path).values
        unordered = compute_proxy(name, original, digits, runtime, events=read_events(shuffled)).values
        np.testing.assert_array_equal(memory, from_dict)
        np.testing.assert_array_equal(memory, from_path)
        np.testing.assert_array_equal(memory, unordered)


def test_redacted_events_rows_are_blank_ignored_by_statistics_and_refused_in_a_forget_set(
        original, digits, runtime, learning_events, tmp_path):
    """Retention blanks the events of samples no kept version holds (service/core/repo/retention.py):
    the file keeps every id and every other row byte for byte; the proxies give NaN there, which
    whole-set statistics ignore and a forget set refuses loudly."""
    path = tmp_path / "events.npz"
    perm = np.random.default_rng(1).permutation(len(digits.train))  # a file in another row order
    LearningEvents(learning_events.sums[perm], learning_events.count[perm]).save(path, np.asarray(digits.ids)[perm])
    gone = [3, 5, 40]
    ids = np.asarray(digits.ids).astype(str)
    data, n_new, n_blank = redact_events(path, [*ids[gone], "not-an-id"])
    assert (n_new, n_blank) == (3, 3)
    (tmp_path / "redacted.npz").write_bytes(data)
    with np.load(path, allow_pickle=False) as a, np.load(tmp_path / "redacted.npz", allow_pickle=False) as b:
        assert a.files == b.files and np.array_equal(a["ids"], b["ids"])
        blank = np.isin(b["ids"], ids[gone])
        assert blank.sum() == 3 and (b["count"][blank] == REDACTED).all()
        for k in a.files:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            assert [x.tobytes() for x in a[k][~blank]] == [x.tobytes() for x in b[k][~blank]], k
            if k in EVENT_KEYS:
                assert np.isnan(b[k][blank]).all()
    # blanking again changes nothing; an upload may not carry blank rows, a stored file may
    assert redact_events(tmp_path / "redacted.npz", ids[gone])[1:] == (0, 3)
    with pytest.raises(DatasetError, match="negative count"):
        read_events(tmp_path / "redacted.npz", digits.ids)
    read_events(tmp_path / "redacted.npz", digits.ids, redacted_ok=True)

    full = compute_proxy("confidence", original, digits, runtime, events=path).values
    values = compute_proxy("confidence", original, digits, runtime, events=tmp_path / "redacted.npz").values
    assert np.isnan(values[gone]).all()
    rest = np.setdiff1d(np.arange(len(values)), gone)
    np.testing.assert_array_equal(values[rest], full[rest])
    # whole-training-set statistics leave the blank rows out
    assert proxy_thresholds(values, quantiles=[0.5]) == [float(np.quantile(full[rest], 0.5))]
    q = proxy_quantiles(values)
    assert np.isnan(q[gone]).all() and np.isfinite(q[rest]).all() and q[rest].max() < 1
    for kind in ("mixed", "random"):
        drawn = build_forget_set(values, (len(values) - 3) // 3, kind=kind).numpy()
        assert not np.isin(drawn, gone).any()
    # a forget set may not name one: it was forgotten already, and its value is gone
    assert sum(len(b) for b in refine([0, 1, 2], values)) == 3
    with pytest.raises(DatasetError, match="redacted"):
        refine([0, 1, 3], values)


def test_events_that_miss_rows_are_refused(original, digits, runtime, learning_events):
    partial = LearningEvents(learning_events.sums.copy(), learning_events.count.copy())
    partial.sums[:3] = 0
    partial.count[:3] = 0
    with pytest.raises(DatasetError, match="never recorded"):
        compute_proxy("confidence", original, digits, runtime, events=partial)
    short = LearningEvents.empty(10)
    with pytest.raises(DatasetError, match="rows"):
        compute_proxy("confidence", original, digits, runtime, events=short)


def _cancel_after(n_checks: int) -> RunContext:
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > n_checks

    return RunContext(cancel_requested=cancel, stage="proxies")


@pytest.mark.parametrize("name", ["holdout_retrain", "loss_curvature", "confidence_final", "confidence"])
def test_cancellation_raises_cancelled(original, digits, runtime, learning_events, name):
    with pytest.raises(Cancelled):
        compute_proxy(name, original, digits, runtime, events=learning_events, ctx=_cancel_after(0))
    if name in ("holdout_retrain", "loss_curvature"):  # also mid-way
        with pytest.raises(Cancelled):
            compute_proxy(name, original, digits, runtime, ctx=_cancel_after(3))


def test_progress_is_reported_up_to_one(original, digits, runtime):
    seen: list[float] = []
    compute_proxy("holdout_retrain", original, digits, runtime, ft_epochs=3,
                  ctx=RunContext(progress=lambda stage, f: seen.append(f), stage="proxies"))
    assert seen and seen[-1] == pytest.approx(1.0)
    assert all(a <= b + 1e-12 for a, b in zip(seen, seen[1:]))


def test_loss_curvature_averages_several_h(original, digits, runtime):
    one = compute_proxy("loss_curvature", original, digits, runtime, h=0.01).values
    two = compute_proxy("loss_curvature", original, digits, runtime, h=[0.01, 0.02]).values
    big = compute_proxy("loss_curvature", original, digits, runtime, h=0.02).values
    np.testing.assert_allclose(two, (one + big) / 2, rtol=1e-5, atol=1e-8)


def test_feldman_zhang_estimate_in_range_and_agrees_with_confidence(runtime):
    raw, flip = noisy_arrays(n_train=300, n_flip=15)
    data = from_arrays(validate_arrays(raw), mean=[0.5], std=[0.5])
    spec = architectures.default_spec("small_cnn", data.input_shape, data.num_classes, width=8)
    cfg = TrainConfig(epochs=15, batch_size=32, seed=0)
    mem = estimate_memorization(spec, data, cfg, runs=10, subset_frac=0.7, seed=0, runtime=runtime)
    assert mem.shape == (300,)
    finite = np.isfinite(mem)
    assert finite.mean() > 0.9  # P(never out in 10 runs) = 0.7**10 ≈ 3%
    assert ((mem[finite] >= -1) & (mem[finite] <= 1)).all()
    assert np.nanmean(mem[flip]) > np.nanmean(np.delete(mem, flip))
    events = LearningEvents.empty(300)
    model = train_model(architectures.build(spec), data.view("train"), cfg, runtime=runtime, events=events)
    confidence = compute_proxy("confidence", model, data, runtime, events=events).values
    rho = spearmanr(mem[finite], confidence[finite]).statistic
    assert rho > 0.2, rho


def test_feldman_zhang_validates_and_cancels(digits, runtime, original_spec):
    cfg = TrainConfig(epochs=1)
    with pytest.raises(ConfigError, match="runs"):
        estimate_memorization(original_spec, digits, cfg, runs=1, runtime=runtime)
    with pytest.raises(ConfigError, match="subset_frac"):
        estimate_memorization(original_spec, digits, cfg, runs=4, subset_frac=1.0, runtime=runtime)
    with pytest.raises(Cancelled):
        estimate_memorization(original_spec, digits, cfg, runs=4, runtime=runtime, ctx=_cancel_after(5))
