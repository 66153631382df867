"""The estimate of a retrain's accuracy on forget rows (worker/engine/targets.py) and the loops'
``stop: "accuracy"`` and ``"confidence"`` rules (worker/engine/unlearners/base.py) that uses it."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest

from worker.engine.refine import build_forget_set
from worker.engine.rum import BinStep, RumConfig, run_unlearning
from worker.engine.runtime import predict
from worker.engine.targets import holdout_difficulty, proxy_quantiles, rank_matched
from worker.engine.training import accuracy
from worker.engine.unlearners import UnlearningTask, get_unlearner


def test_proxy_quantiles_rank_the_rows_and_tie_equal_values():
    q = proxy_quantiles(np.array([0.3, 0.1, 0.9, 0.3, 0.5]))
    assert q[1] < q[0] == q[3] < q[4] < q[2]
    assert ((q > 0) & (q < 1)).all()


def test_retrain_accuracy_follows_the_holdout_rows_of_the_same_difficulty_rank():
    correct = np.array([1.0] * 90 + [0.0] * 10)  # easiest first: the hardest tenth is wrong
    est = rank_matched(correct, np.array([0.02, 0.5, 0.97, 0.999]), window=0.02)
    assert est[0] == est[1] == 1.0
    assert est[2] == est[3] == 0.0
    # the window smooths across the border between right and wrong
    mid = rank_matched(correct, np.array([0.9]), window=0.05)[0]
    assert 0.4 < mid < 0.6
    with pytest.raises(ValueError, match="holdout"):
        rank_matched(np.array([]), np.array([0.5]))


def test_holdout_difficulty_is_ordered_by_the_models_confidence(original, digits, runtime):
    c, p = holdout_difficulty(original, digits.view("holdout"), runtime)
    assert len(c) == len(p) == len(digits.holdout.y) and set(np.unique(c)) <= {0.0, 1.0}
    assert (np.diff(p) <= 0).all()  # easiest (most confident in the label) first
    assert c.mean() == pytest.approx(accuracy(original, digits.view("holdout"), runtime))
    # a model that knows its classes gets the easy half at least as right as the hard half
    assert c[: len(c) // 2].mean() >= c[len(c) // 2:].mean()


@pytest.fixture(scope="module")
def task(digits, forget_rows):
    forget, retain = digits.forget_retain(forget_rows)
    return UnlearningTask(forget, retain, digits.num_classes, seed=0, holdout=digits.view("holdout"))


def forget_confidence(model, view, runtime) -> float:
    p = predict(model, view, runtime).softmax(1)
    return p.gather(1, view.y.view(-1, 1).cpu()).mean().item()


def _run(original, task, runtime, target, stat="accuracy", **hp):
    u = get_unlearner("random_label", budget=0.3, lr_scale=2.0, **hp)
    model = u.unlearn(copy.deepcopy(original), replace(task, forget_target={stat: target}), runtime)
    return model, u.last_run


def test_stop_at_target_ends_the_loop_once_the_forget_rows_are_there(original, task, runtime):
    start = accuracy(original, task.forget, runtime)
    target = start - 0.15
    model, run = _run(original, task, runtime, target, stop="accuracy", max_retain_drop=None)
    assert run["target"]["target"] == pytest.approx(target, abs=1e-4) and run["target"]["stat"] == "accuracy"
    assert run["target"]["reached_at_step"] is not None
    assert run["steps_done"] < run["steps"]  # stopped before the budget was spent
    assert accuracy(model, task.forget, runtime) <= target
    # the same run spending its budget goes further
    _, full = _run(original, task, runtime, target, stop="budget", max_retain_drop=None)
    assert "target" not in full and full["steps_done"] == full["steps"]


def test_stop_at_target_does_nothing_when_the_rows_are_already_there(original, task, runtime):
    start = accuracy(original, task.forget, runtime)
    model, run = _run(original, task, runtime, start + 0.01, stop="accuracy")
    assert run["steps_done"] == 0 and run["target"]["reached_at_step"] == 0
    before = original.state_dict()
    assert all((v == before[k]).all() for k, v in model.state_dict().items())


def test_stop_at_a_confidence_target(original, task, runtime):
    start = forget_confidence(original, task.forget, runtime)
    model, run = _run(original, task, runtime, start - 0.2, stat="confidence", stop="confidence",
                      max_retain_drop=None)
    assert run["target"]["stat"] == "confidence" and run["target"]["reached_at_step"] is not None
    assert run["steps_done"] < run["steps"]
    assert forget_confidence(model, task.forget, runtime) <= start - 0.2


def test_unreachable_target_spends_the_budget(original, task, runtime):
    _, run = _run(original, task, runtime, -1.0, stop="accuracy", max_retain_drop=None)
    assert run["target"]["reached_at_step"] is None and run["steps_done"] == run["steps"]


def test_run_unlearning_gives_each_bin_the_estimate_of_its_rows(original, digits, runtime, learning_events):
    proxy = 1.0 - learning_events.means()["confidence"].astype(np.float64)
    forget = build_forget_set(proxy, 15, "mixed", seed=0)
    policy = RumConfig([BinStep("none"), BinStep("none"),
                        BinStep("finetune", {"budget": 0.02, "stop": "confidence"})])
    result = run_unlearning(copy.deepcopy(original), digits, forget, proxy, policy, runtime)
    (step,) = [s for s in result.steps if s.method == "finetune"]
    _, p_true = holdout_difficulty(original, digits.view("holdout"), runtime)
    expected = rank_matched(p_true, proxy_quantiles(proxy)[step.bin.rows.numpy()]).mean()
    assert step.run["target"]["target"] == pytest.approx(expected, abs=1e-4)
    # a policy that never stops at a target pays nothing for the estimate and reports none
    plain = run_unlearning(copy.deepcopy(original), digits, forget, proxy,
                           RumConfig([BinStep("none"), BinStep("none"), BinStep("finetune", {"budget": 0.02})]),
                           runtime)
    assert all("target" not in s.run for s in plain.steps)
