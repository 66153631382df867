"""Calibration on digits: two disjoint calibration sets, one retrain reference, an Optuna search
that starts from the default, a check on the second set, trials that survive a restart."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.engine.calibration import (
    CalibrationSettings,
    Score,
    calibrate,
    check_margin,
    default_policy,
    paired_mixed_sets,
    penalized,
    planned_cost,
)
from worker.engine.errors import Cancelled, ConfigError
from worker.engine.recipe import Recipe
from worker.engine.refine import proxy_thresholds
from worker.engine.rum import default_rum_config, parse_policy
from worker.engine.runtime import RunContext


@pytest.fixture(scope="module")
def proxy(learning_events) -> np.ndarray:
    return 1.0 - learning_events.means()["confidence"].astype(np.float64)


@pytest.fixture(scope="module")
def recipe(digits) -> Recipe:
    return Recipe.from_dict({"epochs": 12}, n_train=len(digits.train))  # how the conftest model was trained


def test_paired_sets_are_disjoint_alike_and_skip_excluded(proxy):
    excluded = torch.arange(0, 1197, 7)
    a, b = paired_mixed_sets(proxy, 60, seed=0, exclude=excluded)
    assert len(a) == len(b) == 60
    assert not set(a.tolist()) & set(b.tolist())
    assert not (set(a.tolist()) | set(b.tolist())) & set(excluded.tolist())
    cuts = proxy_thresholds(proxy, bins=3)
    for rows in (a, b):  # both mixed: rows in every memorization tertile
        levels = np.digitize(proxy[rows.numpy()], cuts)
        assert set(levels.tolist()) == {0, 1, 2}
    assert abs(proxy[a.numpy()].mean() - proxy[b.numpy()].mean()) < 0.1 * proxy.std() + 0.02


def test_settings_are_validated_and_named():
    assert CalibrationSettings.from_dict({"n_trials": 5}).n_trials == 5
    for field, value in (("n_trials", 0), ("cost_cap", 2), ("forget_fraction", 0.9), ("space", "grid"),
                         ("max_retrains", 1)):
        with pytest.raises(ConfigError, match=f"calibration.{field}"):
            CalibrationSettings.from_dict({field: value})
    with pytest.raises(ConfigError, match="unknown"):
        CalibrationSettings.from_dict({"trials": 3})


def test_planned_cost_sums_the_bins_budgets(recipe):
    default = default_rum_config().to_dict()
    assert planned_cost(default, recipe) == pytest.approx(0.05)  # 1% mid, 4% high
    assert planned_cost({"method": "iau", "hparams": {"steps": 2}}, recipe) == pytest.approx(2 / 12)
    assert planned_cost({"method": "none"}, recipe) == 0.0


def test_calibration_end_to_end_and_resumes_from_its_storage(original, digits, proxy, recipe, runtime, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.sqlite3'}"
    settings = CalibrationSettings(n_trials=4, max_retrains=10.0, seed=0)
    stages = []
    ctx = RunContext(progress=lambda stage, f: stages.append((stage, f)))
    before = {k: v.clone() for k, v in original.state_dict().items()}
    result = calibrate(original, digits, recipe, proxy, runtime, ctx, settings=settings, storage=storage,
                       study_name="model1-job1")
    assert all(torch.equal(v, before[k]) for k, v in original.state_dict().items())  # the model is not changed
    d = result.to_dict()
    assert len(d["trials"]) == 4 and d["trials"][0]["policy"] == default_policy()
    assert parse_policy(default_policy()).to_dict() == default_rum_config().to_dict()
    assert all(t["planned_cost"] <= settings.cost_cap + 1e-9 or t["state"] == "pruned" for t in d["trials"])
    parse_policy(d["policy"])  # a policy the engine accepts
    assert d["chosen"] in ("calibrated", "default")
    assert d["check_margin"] == pytest.approx(check_margin(d["sets"]["check_size"]))
    gain = (penalized(Score(**d["check"]), settings.cost_cap)
            - penalized(Score(**d["default_check"]), settings.cost_cap))
    if d["chosen"] == "default":
        assert d["policy"] == default_policy()
        assert gain < d["check_margin"] or d["winner"] == default_policy()
    else:  # only a winner that clears the check set's noise replaces the default
        assert d["policy"] == d["winner"] != default_policy() and gain >= d["check_margin"]
    for key in ("search", "check", "default_search", "default_check"):
        assert 0.0 <= d[key]["score"] <= 1.0
    best = max(t["score"] for t in d["trials"] if t["state"] == "complete")
    assert d["search"]["score"] == pytest.approx(best, abs=1e-6)
    assert d["search"]["score"] >= d["default_search"]["score"] - 1e-9  # the default is trial 0
    assert d["sets"]["search_size"] == d["sets"]["check_size"] > 0
    assert d["cost_retrains"] > 0 and d["retrain_seconds"] > 0
    assert {s for s, _ in stages} >= {"reference", "search", "check"}
    assert [f for _, f in stages] == sorted(f for _, f in stages)

    # a restarted calibration finds its trials in the storage and runs none again
    again = calibrate(original, digits, recipe, proxy, runtime, settings=settings, storage=storage,
                      study_name="model1-job1").to_dict()
    assert len(again["trials"]) == 4
    assert [t["score"] for t in again["trials"]] == [t["score"] for t in d["trials"]]


def test_calibration_can_be_canceled(original, digits, proxy, recipe, runtime):
    ctx = RunContext(cancel_requested=lambda: True)
    with pytest.raises(Cancelled):
        calibrate(original, digits, recipe, proxy, runtime, ctx, settings=CalibrationSettings(n_trials=2))


def test_the_check_margin_is_the_largest_standard_error_of_an_accuracy_on_the_check_set():
    assert check_margin(100) == pytest.approx(0.05)
    assert check_margin(72) == pytest.approx(0.0589, abs=1e-4)  # digits' 6% check set
    assert check_margin(400) < check_margin(100) < check_margin(24)  # more rows, less noise
    assert check_margin(0) == 0.5
