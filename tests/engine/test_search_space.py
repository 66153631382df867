"""The calibration's search space (worker/engine/search_space.py): warm starts are reproduced
exactly by the parameters enqueued for them, every drawn policy is valid and within the cost cap,
and relabeling methods choose their labels."""

from __future__ import annotations

import optuna
import pytest

from worker.engine.calibration import CalibrationSettings
from worker.engine.recipe import Recipe
from worker.engine.rum import parse_policy
from worker.engine.search_space import (
    BIN_METHODS,
    as_params,
    default_policy,
    planned_cost,
    suggest_policy,
    warm_starts,
)
from worker.engine.unlearners import get_unlearner


def _full(policy):
    """A policy with every hyperparameter the search draws resolved against the method defaults."""
    out = []
    for b in policy["bins"]:
        hp = get_unlearner(b["method"], **b.get("hparams", {})).hp if b["method"] != "none" else {}
        out.append((b["method"], {k: hp[k] for k in ("budget", "lr_scale", "alpha", "label_mode") if k in hp}))
    return out


@pytest.mark.parametrize("space", ["rum", "plain"])
def test_warm_starts_come_back_from_their_parameters(space):
    settings = CalibrationSettings(space=space)
    starts = warm_starts(space)
    assert starts[0] == default_policy(space)
    for start in starts:
        drawn = suggest_policy(optuna.trial.FixedTrial(as_params(start, settings)), settings)
        if space == "plain":
            assert drawn["method"] == start["method"]
            continue
        assert drawn["quantiles"] == pytest.approx(start["quantiles"], abs=1e-4)
        assert _full(drawn) == _full(start)


def test_the_high_bin_tries_every_method_and_both_choices_of_labels():
    starts = warm_starts("rum")
    high = [(s["bins"][2]["method"], s["bins"][2].get("hparams", {}).get("label_mode", "any")) for s in starts]
    assert {m for m, _ in high} == set(BIN_METHODS[2])
    method = default_policy()["bins"][2]["method"]
    assert (method, "runner_up") in high and (method, "any") in high  # both choices of labels
    assert len(high) == len(set(high))  # no start twice


def test_drawn_policies_are_valid_and_within_the_cap():
    settings = CalibrationSettings(cost_cap=0.1, seed=3)
    recipe = Recipe.infer(1000)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    modes = set()
    for _ in range(60):
        trial = study.ask()
        policy = suggest_policy(trial, settings)
        parse_policy(policy)  # the engine accepts it
        for b in policy["bins"]:
            assert b["hparams"].get("budget", 0) <= 0.1
            if b["method"] in ("salun", "random_label"):
                modes.add(b["hparams"].get("label_mode", "any"))
        assert planned_cost(policy, recipe) <= 0.1 * len(policy["bins"])
        study.tell(trial, 0.0)
    assert modes == {"any", "runner_up"}
