"""RUM meta-algorithm and the plain path (on digits), with a spy unlearner that records its tasks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from worker.engine.errors import Cancelled, ConfigError
from worker.engine.metrics import snapshot
from worker.engine.recipe import Recipe
from worker.engine.refine import build_forget_set, refine
from worker.engine.rum import (
    BinStep,
    PlainConfig,
    RumConfig,
    bin_audit,
    default_rum_config,
    parse_policy,
    rum_same_method,
    run_unlearning,
)
from worker.engine.runtime import RunContext
from worker.engine.unlearners import REGISTRY, Unlearner, register


class Spy(Unlearner):
    """Records (tag, forget rows, retain rows, seed) of every call; leaves the model alone."""

    name = "spy_rum_test"
    defaults = {"tag": 0}
    calls: list[dict] = []

    def unlearn(self, model, task, runtime, ctx=None):
        Spy.calls.append({"tag": self.hp["tag"], "forget": set(task.forget.index.tolist()),
                          "retain": set(task.retain.index.tolist()), "seed": task.seed})
        if ctx is not None:
            ctx.report(1.0)
        return model


@pytest.fixture
def spy():
    register(Spy)
    Spy.calls = []
    yield Spy
    REGISTRY.pop(Spy.name, None)


@pytest.fixture(scope="module")
def proxy(learning_events) -> np.ndarray:
    return 1.0 - learning_events.means()["confidence"].astype(np.float64)


@pytest.fixture(scope="module")
def mixed(proxy) -> torch.Tensor:
    return build_forget_set(proxy, 15, "mixed", seed=0)


@pytest.fixture(scope="module")
def excluded(digits, mixed) -> torch.Tensor:
    """20 rows forgotten by an earlier job (disjoint from the current forget set)."""
    others = np.setdiff1d(np.arange(len(digits.train)), mixed.numpy())
    return torch.from_numpy(np.random.default_rng(5).choice(others, 20, replace=False))


def spy_rum(k: int = 3) -> RumConfig:
    return RumConfig([BinStep(Spy.name, {"tag": i}) for i in range(k)])


def test_rum_visits_bins_low_to_high_with_the_paper_retain_sets(spy, original, digits, runtime, proxy, mixed,
                                                                excluded):
    result = run_unlearning(original, digits, mixed, proxy, spy_rum(), runtime, excluded_rows=excluded, seed=10)
    bins = refine(mixed, proxy)
    assert [c["tag"] for c in spy.calls] == [0, 1, 2]
    assert [c["forget"] for c in spy.calls] == [set(b.rows.tolist()) for b in bins]
    assert [c["seed"] for c in spy.calls] == [10, 11, 12]
    medians = [np.median(proxy[list(c["forget"])]) for c in spy.calls]
    assert medians[0] < medians[1] < medians[2]
    everything = set(range(len(digits.train)))
    excl = set(excluded.tolist())
    done: set[int] = set()
    for k, call in enumerate(spy.calls):
        done |= call["forget"]
        later = set().union(*(c["forget"] for c in spy.calls[k + 1:]))
        assert not call["retain"] & done  # done bins and the current one are out
        assert later <= call["retain"]  # later bins are still in (docs/methods.md#rum)
        assert not call["retain"] & excl  # earlier jobs' samples never come back
        assert call["retain"] == everything - done - excl
    assert [s.n_forget for s in result.steps] == [15, 15, 15]
    assert [s.n_retain for s in result.steps] == [len(c["retain"]) for c in spy.calls]
    assert all(s.seconds >= 0 for s in result.steps)
    assert result.thresholds == pytest.approx(list(np.quantile(proxy, [1 / 3, 2 / 3])))
    assert result.summary()["steps"][2]["level"] == "high"


def test_plain_policy_uses_one_step_with_retain_without_forget_and_excluded(spy, original, digits, runtime, mixed,
                                                                           excluded):
    result = run_unlearning(original, digits, mixed, None, PlainConfig(Spy.name), runtime, excluded_rows=excluded)
    (call,) = spy.calls
    assert call["forget"] == set(mixed.tolist())
    assert call["retain"] == set(range(len(digits.train))) - set(mixed.tolist()) - set(excluded.tolist())
    assert result.method == Spy.name and result.steps[0].bin.level == "all" and result.thresholds is None


def test_empty_bins_are_skipped_and_the_step_matches_the_band(spy, original, digits, runtime, proxy):
    lowest = torch.from_numpy(np.argsort(proxy)[:12].copy())
    result = run_unlearning(original, digits, lowest, proxy, spy_rum(), runtime)
    assert [c["tag"] for c in spy.calls] == [0]
    highest = torch.from_numpy(np.argsort(proxy)[-12:].copy())
    spy.calls.clear()
    result = run_unlearning(original, digits, highest, proxy, spy_rum(), runtime)
    assert [c["tag"] for c in spy.calls] == [2] and result.steps[0].bin.index == 2


def test_none_in_every_bin_leaves_the_model_unchanged(original, digits, runtime, proxy, mixed):
    before = snapshot(original)
    result = run_unlearning(original, digits, mixed, proxy, rum_same_method("none"), runtime)
    after = snapshot(result.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [s.method for s in result.steps] == ["none"] * 3


def test_rum_finetune_changes_the_model_and_reports_progress(original, digits, runtime, proxy, mixed):
    before = snapshot(original)
    seen = []
    policy = RumConfig([BinStep("none"), BinStep("finetune", {"epochs": 1}), BinStep("finetune", {"epochs": 1})])
    result = run_unlearning(original, digits, mixed, proxy, policy, runtime,
                            RunContext(progress=lambda s, f: seen.append(f), stage="unlearning"))
    after = snapshot(result.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    assert [s.method for s in result.steps] == ["none", "finetune", "finetune"]
    per_bin = bin_audit(result.model, digits, result.bins, runtime)
    assert [r["level"] for r in per_bin] == ["low", "mid", "high"]
    assert all(0 <= r["acc_forget"] <= 1 and 0 <= r["mia"] <= 1 for r in per_bin)


def test_bin_audit_of_the_original_sees_high_memorization_as_non_members(original, digits, runtime, proxy, mixed):
    low, _, high = bin_audit(original, digits, refine(mixed, proxy), runtime)
    assert low["acc_forget"] == 1.0
    assert high["mia"] > low["mia"]  # low-confidence (memorized) rows look like non-members


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (RumConfig([BinStep("none"), BinStep("no_such_method"), BinStep("none")]), r"bins\[1\]\.method"),
        (RumConfig([BinStep("finetune", {"lrr": 0.1})]), r"bins\[0\]\.hyperparameters"),
        (RumConfig([BinStep("none"), BinStep("finetune", {"lr": -1})]), r"bins\[1\]\.hyperparameters\.lr"),
        (RumConfig([BinStep("none")] * 3, quantiles=[0.5]), "quantiles: 3 bins need 2"),
        (RumConfig([BinStep("none")] * 2, thresholds=[0.1, 0.2]), "thresholds: 2 bins need 1"),
        (RumConfig([BinStep("none")] * 2, quantiles=[0.5], thresholds=[0.1]), "thresholds"),
        (RumConfig([]), "bins"),
        (RumConfig([BinStep("rum")]), r"bins\[0\]\.method"),
        (PlainConfig("no_such_method"), "method"),
        (PlainConfig("finetune", {"epochs": 1.5}), "hyperparameters.epochs"),
    ],
)
def test_bad_configs_raise_config_error_naming_the_field(policy, field, original, digits, runtime, proxy, mixed):
    with pytest.raises(ConfigError, match=field):
        run_unlearning(original, digits, mixed, proxy, policy, runtime)


def test_rum_needs_a_proxy_of_the_right_length(original, digits, runtime, proxy, mixed):
    with pytest.raises(ConfigError, match="proxy"):
        run_unlearning(original, digits, mixed, None, rum_same_method("none"), runtime)
    with pytest.raises(ConfigError, match="proxy"):
        run_unlearning(original, digits, mixed, proxy[:-1], rum_same_method("none"), runtime)
    with pytest.raises(ConfigError, match="forget_rows"):
        run_unlearning(original, digits, [], proxy, rum_same_method("none"), runtime)


def test_parse_policy_round_trip_and_errors():
    policy = parse_policy({"method": "rum", "bins": ["none", {"method": "finetune", "hparams": {"epochs": 2}},
                                                     {"method": "finetune"}], "quantiles": [0.25, 0.75]})
    assert isinstance(policy, RumConfig) and policy.bins[1] == BinStep("finetune", {"epochs": 2})
    assert parse_policy(policy.to_dict()).to_dict() == policy.to_dict()
    assert parse_policy({"method": "finetune", "hparams": {"lr": 0.01}}) == PlainConfig("finetune", {"lr": 0.01})
    with pytest.raises(ConfigError, match=r"bins\[0\]\.method"):
        parse_policy({"method": "rum", "bins": [{"hparams": {}}]})
    with pytest.raises(ConfigError, match="unknown field"):
        parse_policy({"method": "finetune", "bins": []})
    with pytest.raises(ConfigError, match="method"):
        parse_policy({"bins": []})


def test_default_pipeline_is_three_valid_bins():
    cfg = default_rum_config()
    assert len(cfg.bins) == 3 and len(cfg.quantiles) == 2
    cfg.quantiles.append(0.95)  # a fresh copy each time: callers may edit theirs
    assert len(default_rum_config().quantiles) == 2
    missing = {b.method for b in cfg.bins} - set(REGISTRY)
    if missing:
        pytest.skip(f"unlearners not registered yet: {missing}")
    default_rum_config().validate()


def test_cancellation_between_bins(spy, original, digits, runtime, proxy, mixed):
    ctx = RunContext(cancel_requested=lambda: len(Spy.calls) >= 1)
    with pytest.raises(Cancelled):
        run_unlearning(original, digits, mixed, proxy, spy_rum(), runtime, ctx)
    assert len(spy.calls) == 1


def test_cancellation_within_a_bin(original, digits, runtime, proxy, mixed):
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 3

    policy = RumConfig([BinStep("finetune", {"epochs": 3})] * 3)
    with pytest.raises(Cancelled):
        run_unlearning(original, digits, mixed, proxy, policy, runtime, RunContext(cancel_requested=cancel))
    # one pass over ~1,180 retain rows is 10 batches: stopping after 4 polls means mid-bin
    assert len(polls) == 4


def test_guard_budget_is_shared_across_bins(original, digits, runtime, proxy, mixed):
    """Reckless guarded NegGrad in three bins: drops are measured from the model entering RUM."""
    from worker.engine.training import accuracy

    _, retain = digits.forget_retain(mixed)
    before = accuracy(original, retain, runtime)
    policy = rum_same_method("neggrad", {"lr": 0.5, "epochs": 3, "loss_bound": 50.0})
    result = run_unlearning(original, digits, mixed, proxy, policy, runtime)
    after = accuracy(result.model, retain, runtime)
    assert after >= before - 0.08  # one 0.05 budget (plus probe sampling error), not three
    assert all("guard" in s.to_dict() for s in result.steps)
    assert any(s.run["guard"]["outcome"] in ("restored", "input") for s in result.steps)


def test_a_job_never_spends_past_its_cost_cap_on_retries(original, digits, runtime, proxy, mixed):
    """Guard retries stop at ``max_cost_share`` of the original's steps (or at the plan, if that is
    more): a policy whose bins are too hot for the model retries while it fits and no further."""
    hot = {"lr": 10.0, "budget": 0.02, "momentum": 0.0}
    policy = rum_same_method("finetune", hot)
    planned = 3 * round(0.02 * Recipe.infer(len(digits.train)).steps)
    free = run_unlearning(copy.deepcopy(original), digits, mixed, proxy, policy, runtime, max_cost_share=None)
    assert free.cost_share > 0.06 + 1e-9  # retried in every bin: up to three times the plan
    for cap in (0.05, 0.08):
        result = run_unlearning(copy.deepcopy(original), digits, mixed, proxy, policy, runtime, max_cost_share=cap)
        steps = sum(s.run["steps_total"] for s in result.steps)
        assert steps <= max(round(cap * result.recipe.steps), planned)
        assert any("retry_skipped" in s.run for s in result.steps)
    assert run_unlearning(copy.deepcopy(original), digits, mixed, proxy, policy, runtime).cost_share <= 0.10 + 1e-9


def test_retain_guard_measures_against_the_reference(original, digits, runtime, mixed):
    import copy

    from worker.engine.unlearners import UnlearningTask
    from worker.engine.unlearners.base import RetainGuard

    forget, retain = digits.forget_retain(mixed)
    broken = copy.deepcopy(original)
    with torch.no_grad():
        broken.fc.weight.mul_(-1.0)  # far worse than the original on the retain set
    alone = RetainGuard(broken, retain, runtime, 0.05)
    assert alone.check() is True  # no drop relative to itself
    task = UnlearningTask(forget, retain, digits.num_classes, reference=original)
    against = RetainGuard(broken, task.retain, runtime, 0.05, reference=task.reference)
    assert against.check() is False and against.outside == 1


def test_non_finite_weights_are_never_returned(original, digits, forget_rows, runtime):
    from worker.engine.errors import EngineError
    from worker.engine.rum import PlainConfig, run_unlearning
    from worker.engine.unlearners import REGISTRY, Unlearner, register

    @register
    class Diverging(Unlearner):  # what a diverged ascent leaves behind, whatever caused it
        name = "test_diverging"

        def unlearn(self, model, task, runtime, ctx=None):
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
            return model

    try:
        with pytest.raises(EngineError, match="non-finite weights"):
            run_unlearning(copy.deepcopy(original), digits, forget_rows, None, PlainConfig("test_diverging"), runtime)
    finally:
        REGISTRY.pop("test_diverging", None)
