"""Every unlearner's hyperparameters in one place: names, types, bounds and defaults, without torch.

The API checks a policy against this schema when a model is registered or a calibration asked for
(a 422 at once, naming ``hyperparameters.<key>``), and every unlearner checks its own with the same
call when it is built in the worker, so the two can never disagree. Budgets are shares of the
original's optimizer steps and learning rates are relative to the original's (``lr_scale``):
docs/unlearning.md explains both and where each default was chosen.

Upper bounds are there to refuse mistakes that would run for days or diverge at once (a budget of
a hundred retrainings, an lr of 1e6), not to second-guess tuning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .errors import ConfigError
from .recipe import OPTIMIZERS as RECIPE_OPTIMIZERS
from .recipe import SCHEDULES


@dataclass(frozen=True)
class Number:
    """A number (never a bool) in [low, high], or (low, high] with ``low_open``; null if optional."""

    default: Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    integer: bool = False
    optional: bool = False

    def check(self, key: str, value: Any) -> None:
        if self.optional and value is None:
            return
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and (not self.integer or float(value).is_integer())
        if ok and self.low is not None:
            ok = value > self.low if self.low_open else value >= self.low
        if ok and self.high is not None:
            ok = value <= self.high
        if not ok:
            lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
            hi = "" if self.high is None else f"<= {self.high:g}"
            bounds = " and ".join(b for b in (lo, hi) if b)
            kind = "an integer" if self.integer else "a number"
            raise ConfigError(f"hyperparameters.{key}: must be {kind}{' ' + bounds if bounds else ''}"
                              f"{' or null' if self.optional else ''}, got {value!r}")


@dataclass(frozen=True)
class OneOf:
    default: Any
    options: tuple

    def check(self, key: str, value: Any) -> None:
        if value not in self.options or isinstance(value, bool):
            raise ConfigError(f"hyperparameters.{key}: must be one of {list(self.options)}, got {value!r}")


Spec = Number | OneOf
MAX_STEPS = 1_000_000
MAX_EPOCHS = 1000
MAX_BATCH = 1_000_000
OPTIMIZERS = (None, *RECIPE_OPTIMIZERS)  # None: the original's, from its recipe
LABEL_MODES = ("any", "wrong", "runner_up")


def _with(base: dict[str, Spec], **defaults: Any) -> dict[str, Spec]:
    """``base`` with other defaults (same bounds)."""
    return {**base, **{k: replace(base[k], default=v) for k, v in defaults.items()}}


# The shared training loop (worker/engine/unlearners/base.py): work relative to the original's
# recipe, explicit steps/epochs/lr/batch size/optimizer override it, and the retain guard.
LOOP: dict[str, Spec] = {
    "budget": Number(0.03, low=0, low_open=True, high=1),  # share of the original's optimizer steps
    "lr_scale": Number(0.5, low=0, low_open=True, high=100),  # times the original's learning rate
    "steps": Number(None, low=1, high=MAX_STEPS, integer=True, optional=True),
    "epochs": Number(None, low=0, high=MAX_EPOCHS, integer=True, optional=True),
    "lr": Number(None, low=0, low_open=True, high=10, optional=True),
    "batch_size": Number(None, low=1, high=MAX_BATCH, integer=True, optional=True),
    "optimizer": OneOf(None, OPTIMIZERS),
    "momentum": Number(0.9, low=0, high=0.999),
    "weight_decay": Number(None, low=0, high=1, optional=True),
    "schedule": OneOf("cosine", SCHEDULES),
    "eta_min_frac": Number(0.0, low=0, high=1),
    "max_retain_drop": Number(0.03, low=0, low_open=True, high=1, optional=True),
    "retries": Number(2, low=0, high=5, integer=True),
    # "accuracy" / "confidence": stop once the forget rows' accuracy / mean confidence in their
    # label is down to the estimate of a retrain's (worker/engine/targets.py; the budget is then
    # a ceiling); "budget": spend the whole budget
    "stop": OneOf("budget", ("budget", "accuracy", "confidence")),
}
LOSS_BOUND = Number(None, low=0, low_open=True, high=1000, optional=True)
RANDOM_LABEL = {**_with(LOOP, budget=0.03, lr_scale=1.0), "label_mode": OneOf("any", LABEL_MODES)}

SCHEMA: dict[str, dict[str, Spec]] = {
    "none": {},
    "retrain": {  # the recipe's own numbers unless given
        "epochs": Number(None, low=0, high=MAX_EPOCHS, integer=True, optional=True),
        "lr": Number(None, low=0, low_open=True, high=10, optional=True),
        "batch_size": Number(None, low=1, high=MAX_BATCH, integer=True, optional=True),
        "optimizer": OneOf(None, OPTIMIZERS),
        "momentum": Number(None, low=0, high=0.999, optional=True),
        "weight_decay": Number(None, low=0, high=1, optional=True),
        "schedule": OneOf(None, (None, *SCHEDULES)),
    },
    "finetune": _with(LOOP, budget=0.05, lr_scale=0.5),
    "neggrad": {**_with(LOOP, budget=0.05, lr_scale=0.5), "loss_bound": LOSS_BOUND},
    "neggrad_plus": {**_with(LOOP, budget=0.08, lr_scale=0.5), "alpha": Number(0.3, low=0, high=1),
                     "loss_bound": LOSS_BOUND},
    "l1_sparse": {**_with(LOOP, budget=0.05, lr_scale=2.0), "alpha": Number(3e-3, low=0, high=1),
                  "no_l1_fraction": Number(0.0, low=0, high=1)},
    "random_label": RANDOM_LABEL,
    "salun": {**_with(RANDOM_LABEL, budget=0.08, lr_scale=0.25), "k": Number(0.5, low=0, high=1)},
    "scrub": {**_with(LOOP, budget=0.08, lr_scale=4.0),
              "msteps": Number(2, low=-1, high=MAX_EPOCHS, integer=True),
              "temperature": Number(4.0, low=0, low_open=True, high=100),
              "beta": Number(0.5, low=0, high=1000), "gamma": Number(1.0, low=0, high=1000),
              "forget_batch_size": Number(None, low=1, high=MAX_BATCH, integer=True, optional=True)},
    "del": {**_with(LOOP, budget=0.08, lr_scale=2.0, weight_decay=0.0, eta_min_frac=0.01),
            "threshold": Number(0.01, low=0, high=1)},
    "iau": {"lr": Number(None, low=0, low_open=True, high=10, optional=True),
            "step_size": Number(0.005, low=0, low_open=True, high=1),
            "steps": Number(1, low=1, high=100, integer=True),
            "batch_size": Number(None, low=1, high=MAX_BATCH, integer=True, optional=True),
            "eps": Number(1e-8, low=0, low_open=True, high=1),
            "max_retain_drop": Number(0.03, low=0, low_open=True, high=1, optional=True),
            "backtrack": Number(4, low=0, high=20, integer=True)},
}


def default_hparams(method: str) -> dict[str, Any]:
    if method not in SCHEMA:
        raise ConfigError(f"method: unknown unlearner {method!r}; known: {sorted(SCHEMA)}")
    return {key: spec.default for key, spec in SCHEMA[method].items()}


def check_hparams(method: str, given: Any, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """``given`` merged over the method's defaults, every value checked; raises
    :class:`ConfigError` naming ``hyperparameters.<key>``. ``defaults`` replaces the schema's (an
    unlearner class may carry its own, e.g. one defined outside the built-ins)."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise ConfigError("hyperparameters: must be a JSON object")
    known = defaults if defaults is not None else default_hparams(method)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"hyperparameters: unknown for {method!r}: {unknown}; known: {sorted(known)}")
    hp = {**known, **given}
    for key, spec in SCHEMA.get(method, {}).items():
        if key in hp:
            spec.check(key, hp[key])
    return hp
