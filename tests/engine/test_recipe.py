"""Recipes and recipe-relative budgets: work is a share of the original's optimizer steps, learning
rates a multiple of the original's, so the same policy costs the same share on any data size."""

from __future__ import annotations

import pytest

from worker.engine.errors import ConfigError
from worker.engine.recipe import Recipe
from worker.engine.unlearners import UnlearningTask, get_unlearner


def test_missing_fields_are_inferred_and_listed():
    r = Recipe.from_dict({"epochs": 20, "lr": 0.1}, n_train=1000)
    assert (r.epochs, r.lr, r.batch_size, r.optimizer) == (20, 0.1, 128, "sgd")
    assert "epochs" not in r.inferred and "lr" not in r.inferred and "batch_size" in r.inferred
    assert r.steps_per_epoch == 8 and r.steps == 160
    d = r.to_dict()
    assert d["steps"] == 160 and d["n_train"] == 1000 and "batch_size" in d["inferred"]
    assert Recipe.from_dict(d, n_train=1000) == r  # round trip (inferred and steps are read back)
    assert set(Recipe.infer(10).inferred) == {"optimizer", "lr", "momentum", "weight_decay", "schedule", "epochs",
                                              "batch_size"}


@pytest.mark.parametrize(("field", "value"), [
    ("epochs", 0), ("epochs", 2.5), ("epochs", True), ("lr", 0), ("lr", -1), ("lr", float("nan")),
    ("batch_size", 0), ("optimizer", "lbfgs"), ("schedule", "step"), ("momentum", 1.0), ("weight_decay", -1),
    ("n_train", 0),
])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=f"recipe.{field}"):
        Recipe.from_dict({field: value}, n_train=None if field == "n_train" else 100)


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="unknown field"):
        Recipe.from_dict({"epoch": 3}, n_train=10)


def _plan(name, recipe, n_rows=100, **hp):
    u = get_unlearner(name, **hp)
    return u.resolve(UnlearningTask(forget=_View(5), retain=_View(n_rows), num_classes=10, recipe=recipe))


class _View:  # resolve only needs len()
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_budget_is_a_share_of_the_original_steps_and_lr_relative():
    recipe = Recipe.from_dict({"epochs": 30, "lr": 0.1, "batch_size": 100}, n_train=1000)  # 300 steps
    plan = _plan("finetune", recipe, budget=0.1, lr_scale=0.5)
    assert plan.steps == 30 and plan.lr == pytest.approx(0.05) and plan.batch_size == 100
    assert plan.optimizer == "sgd" and plan.weight_decay == recipe.weight_decay


def test_ten_times_the_data_gets_the_same_relative_cost():
    small = Recipe.from_dict({"epochs": 30}, n_train=1_000)
    large = small.with_n_train(10_000)
    a, b = _plan("salun", small), _plan("salun", large)
    assert b.steps == pytest.approx(10 * a.steps, rel=0.1)
    assert a.steps / small.steps == pytest.approx(b.steps / large.steps, rel=0.1)


def test_an_adam_recipe_gives_an_adam_unlearner_at_its_scale():
    plan = _plan("random_label", Recipe.from_dict({"optimizer": "adam", "lr": 1e-3}, n_train=500), lr_scale=2)
    assert plan.optimizer == "adam" and plan.lr == pytest.approx(2e-3)


def test_explicit_values_override_the_recipe():
    recipe = Recipe.from_dict({"epochs": 30}, n_train=1000)
    plan = _plan("finetune", recipe, epochs=3, lr=0.01, batch_size=32)
    assert plan.steps is None and plan.epochs == 3 and plan.lr == 0.01 and plan.batch_size == 32
    assert _plan("finetune", recipe, steps=7).steps == 7


def test_a_run_spends_its_budget(original, digits, forget_rows, runtime):
    forget, retain = digits.forget_retain(forget_rows)
    recipe = Recipe.from_dict({"epochs": 12}, n_train=len(digits.train))
    u = get_unlearner("finetune", budget=0.05, max_retain_drop=None)
    u.unlearn(original, UnlearningTask(forget, retain, digits.num_classes, recipe=recipe), runtime)
    assert u.last_run["steps_done"] == u.last_run["steps"] == recipe.steps_for(0.05)
    assert u.last_run["cost_share"] == pytest.approx(0.05, abs=1 / recipe.steps)


def test_budgets_are_validated():
    for key, value in (("budget", 0), ("budget", 2), ("lr_scale", 0), ("steps", 0), ("optimizer", "rmsprop")):
        with pytest.raises(ConfigError, match=f"hyperparameters.{key}"):
            get_unlearner("finetune", **{key: value})
