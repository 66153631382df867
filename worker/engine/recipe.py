"""The training recipe of a model: what unlearning budgets are measured against.

A model's unlearning cost only means something relative to what it cost to train: 20 steps are
a third of a digits model's training and a rounding error on CIFAR. So every unlearner's default
work is a *share of the original's optimizer steps* and its default learning rate a *multiple of
the original's* (``budget`` and ``lr_scale`` in :mod:`worker.engine.unlearners.base`). A dataset
ten times larger has ten times the steps, so the same share costs the same fraction of a retrain.

``Recipe.from_dict`` validates a recipe given as JSON (the service's ``recipe`` field at model
registration, ``unlearnd train``'s ``recipe.json``); missing fields take the defaults of
:class:`~worker.engine.training.TrainConfig` and are listed in ``inferred`` so that the API can show
that they were guessed. This module imports no torch: the API validates recipes with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")
# Defaults when a field is absent: the engine's own training defaults (TrainConfig).
DEFAULTS: dict[str, Any] = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                            "schedule": "cosine", "epochs": 30, "batch_size": 128}
MAX_EPOCHS = 100_000
MAX_BATCH = 1_000_000


@dataclass(frozen=True)
class Recipe:
    """How the original model was trained (no augmentation assumed), and on how many rows."""

    n_train: int
    epochs: int = DEFAULTS["epochs"]
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    optimizer: str = DEFAULTS["optimizer"]
    momentum: float = DEFAULTS["momentum"]
    weight_decay: float = DEFAULTS["weight_decay"]
    schedule: str = DEFAULTS["schedule"]
    inferred: tuple[str, ...] = field(default=(), compare=False)  # fields filled with defaults

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_train / self.batch_size))

    @property
    def steps(self) -> int:
        """Optimizer steps of the original training (and of a retrain on about as many rows)."""
        return self.epochs * self.steps_per_epoch

    def steps_for(self, share: float) -> int:
        """``share`` of the original's optimizer steps, at least one."""
        return max(1, round(share * self.steps))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inferred"] = list(self.inferred)
        d["steps"] = self.steps
        return d

    def with_n_train(self, n_train: int) -> Recipe:
        """The same recipe on another number of rows (a retrain on D \\ S)."""
        return Recipe(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "n_train": int(n_train)})

    @classmethod
    def infer(cls, n_train: int) -> Recipe:
        """The default recipe for ``n_train`` rows, every field marked inferred."""
        return cls.from_dict(None, n_train=n_train)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, *, n_train: int | None = None, prefix: str = "recipe") -> Recipe:
        """Validate a recipe given as JSON; ``n_train`` (the dataset's) wins over a given one if set.

        Raises :class:`ConfigError` naming ``<prefix>.<field>``.
        """
        d = dict(d or {})
        known = set(DEFAULTS) | {"n_train", "inferred", "steps"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{prefix}: unknown field(s) {unknown}; known: {sorted(set(DEFAULTS) | {'n_train'})}")
        d.pop("inferred", None)
        d.pop("steps", None)
        given = {k for k in DEFAULTS if d.get(k) is not None}
        out = {k: (d[k] if k in given else v) for k, v in DEFAULTS.items()}
        if n_train is None:
            n_train = d.get("n_train")
        _check_int(n_train, f"{prefix}.n_train", 1, 10**12)
        _check_int(out["epochs"], f"{prefix}.epochs", 1, MAX_EPOCHS)
        _check_int(out["batch_size"], f"{prefix}.batch_size", 1, MAX_BATCH)
        _check_float(out["lr"], f"{prefix}.lr", 0, 10, low_open=True)
        _check_float(out["momentum"], f"{prefix}.momentum", 0, 1, high_open=True)
        _check_float(out["weight_decay"], f"{prefix}.weight_decay", 0, 1)
        if out["optimizer"] not in OPTIMIZERS:
            raise ConfigError(f"{prefix}.optimizer: must be one of {list(OPTIMIZERS)}, got {out['optimizer']!r}")
        if out["schedule"] not in SCHEDULES:
            raise ConfigError(f"{prefix}.schedule: must be one of {list(SCHEDULES)}, got {out['schedule']!r}")
        inferred = tuple(k for k in DEFAULTS if k not in given)
        return cls(n_train=int(n_train), epochs=int(out["epochs"]), batch_size=int(out["batch_size"]),
                   lr=float(out["lr"]), optimizer=out["optimizer"], momentum=float(out["momentum"]),
                   weight_decay=float(out["weight_decay"]), schedule=out["schedule"], inferred=inferred)


def _check_int(v: Any, name: str, low: int, high: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or v != int(v) or not low <= v <= high:
        raise ConfigError(f"{name}: must be an integer in [{low}, {high}], got {v!r}")


def _check_float(v: Any, name: str, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"{name}: must be a number in {lo}{low:g}, {high:g}{hi}, got {v!r}")
