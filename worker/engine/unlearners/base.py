"""The unlearner contract and the shared SGD-loop base class.

An unlearner is configured with hyperparameters (merged over its class ``defaults``; unknown
names raise :class:`ConfigError`) and called as ``unlearn(model, task, runtime, ctx)``. It
returns the unlearned model (usually the same object, updated in place; ``retrain`` returns a new
one). ``LoopUnlearner`` turns the shared loop of :mod:`worker.engine.training` into a method
with three hooks: which batches an epoch sees, the loss of a batch, and an optional gradient edit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..data import Batch, View
from ..errors import ConfigError
from ..runtime import RunContext, Runtime, seed_everything
from ..training import accuracy, fit, make_optimizer, make_scheduler

REGISTRY: dict[str, type[Unlearner]] = {}


def check_number(
    hp: dict[str, Any], key: str, *, low: float | None = None, high: float | None = None,
    low_open: bool = False, integer: bool = False, optional: bool = False,
) -> None:
    """The one hyperparameter check: a number (not a bool) within [low, high] (or (low, high]).

    Raises :class:`ConfigError` naming ``hyperparameters.<key>``; ``optional`` allows null.
    """
    v = hp[key]
    if optional and v is None:
        return
    ok = isinstance(v, int | float) and not isinstance(v, bool) and (not integer or v == int(v))
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        kind = "an integer" if integer else "a number"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ConfigError(f"hyperparameters.{key}: must be {kind}{' ' + bounds if bounds else ''}"
                          f"{' or null' if optional else ''}, got {v!r}")


@dataclass
class UnlearningTask:
    """What to forget and what to keep. Views live on the runtime's device or on CPU."""

    forget: View
    retain: View
    num_classes: int
    seed: int = 0
    # The model the retain guard measures drops against; None = the model as it enters this call.
    # RUM passes the model as it entered the *first* bin, so the guard's budget is not spent anew
    # in every bin.
    reference: nn.Module | None = None


class Unlearner:
    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **hparams: Any):
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise ConfigError(
                f"hyperparameters: unknown for {self.name!r}: {unknown}; known: {sorted(self.defaults)}"
            )
        self.hp: dict[str, Any] = {**self.defaults, **hparams}
        self.validate()

    def validate(self) -> None:
        """Check hyperparameter values; raise ConfigError naming the field."""
        for key, low, integer in (("lr", 0, False), ("epochs", 0, True), ("batch_size", 1, True)):
            if key in self.hp:
                check_number(self.hp, key, low=low, integer=integer)

    def config(self) -> dict[str, Any]:
        return {"method": self.name, **self.hp}

    def unlearn(
        self, model: nn.Module, task: UnlearningTask, runtime: Runtime, ctx: RunContext | None = None
    ) -> nn.Module:
        raise NotImplementedError


def register(cls: type[Unlearner]) -> type[Unlearner]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


def get_unlearner(name: str, **hparams: Any) -> Unlearner:
    if name not in REGISTRY:
        raise ConfigError(f"method: unknown unlearner {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name](**hparams)


class LoopUnlearner(Unlearner):
    """An unlearner that is a few epochs of the shared loop.

    Subclasses set ``defaults`` (at least ``epochs``, ``lr``, ``batch_size``; optionally
    ``optimizer``, ``momentum``, ``weight_decay``, ``schedule``, ``eta_min_frac``) and override
    ``loss``; ``batches`` defaults to one shuffled pass over the retain set; ``prepare`` may
    compute masks or copies before the loop; ``after_backward`` may edit gradients.
    """

    defaults: ClassVar[dict[str, Any]] = {
        "epochs": 5, "lr": 0.01, "batch_size": 128, "optimizer": "sgd", "momentum": 0.9,
        "weight_decay": 5e-4, "schedule": "cosine", "eta_min_frac": 0.0, "max_retain_drop": None,
    }
    #: What the last run did: {"steps_checked", "guard_tripped", "retain_probe_before", "retain_probe_after"}.
    last_run: dict[str, Any] | None = None

    def validate(self) -> None:
        super().validate()
        check_number(self.hp, "max_retain_drop", low=0, low_open=True, high=1, optional=True)

    def prepare(self, model: nn.Module, task: UnlearningTask, runtime: Runtime) -> None:
        """Called once before the loop (e.g. to compute a saliency mask)."""

    def batches(self, task: UnlearningTask, epoch: int, gen: torch.Generator) -> Iterable[Batch]:
        return task.retain.batches(int(self.hp["batch_size"]), shuffle=True, generator=gen)

    def loss(self, model: nn.Module, x: torch.Tensor, batch: Batch, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def after_backward(self, model: nn.Module) -> None:
        """Edit gradients in place after backward (e.g. multiply by a mask)."""

    def finish(self) -> None:
        """Called after the loop, also on error or cancellation: drop per-run state (teachers, masks)."""

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The loop's optimizer from ``optimizer``/``lr``/``momentum``/``weight_decay``.

        Override to change it (masked methods move weight decay into the masked gradient).
        """
        hp = self.hp
        return make_optimizer(model.parameters(), hp.get("optimizer", "sgd"), float(hp["lr"]),
                              hp.get("momentum", 0.9), hp.get("weight_decay", 5e-4))

    def has_after_backward(self) -> bool:
        return type(self).after_backward is not LoopUnlearner.after_backward

    def unlearn(
        self, model: nn.Module, task: UnlearningTask, runtime: Runtime, ctx: RunContext | None = None
    ) -> nn.Module:
        gen = seed_everything(task.seed)
        model = runtime.prepare(model)
        # ``prepare`` may poll ``self._ctx.check()`` (it runs before the loop reports any progress).
        self._task, self._ctx = task, ctx or RunContext()
        try:
            self.prepare(model, task, runtime)
            hp = self.hp
            epochs = int(hp["epochs"])
            opt = self.make_optimizer(model)
            sched = make_scheduler(opt, hp.get("schedule", "constant"), epochs, hp.get("eta_min_frac", 0.0))
            guard = None
            if hp.get("max_retain_drop") is not None and len(task.retain):
                guard = RetainGuard(model, task.retain, runtime, float(hp["max_retain_drop"]), seed=task.seed,
                                    reference=task.reference)
            model = fit(
                model, epochs=epochs, batches=lambda e: self.batches(task, e, gen), loss_fn=self.loss,
                optimizer=opt, scheduler=sched, runtime=runtime, ctx=ctx,
                after_backward=self.after_backward if self.has_after_backward() else None, monitor=guard,
            )
            self.last_run = guard.report() if guard is not None else {"guard_tripped": False}
            return model
        finally:
            self._task = self._ctx = None
            self.finish()


class RetainGuard:
    """Stops a loop whose retain accuracy falls more than ``max_drop`` below where it started.

    [Ours] Users' first complaint about peer tools is defaults that wreck the model (ascent
    diverging, SCRUB's max-steps running away). Every ``fit`` monitor call measures accuracy on a
    fixed seeded probe of ``probe_size`` retain rows; while it is within ``max_drop`` of the
    starting value the state is remembered, and when it falls further the last good state is
    restored and the loop stops. The probe is part of the retain set (never the test split), so
    the audit's test accuracy stays clean. ``max_retain_drop: null`` turns it off (DEL does: its
    reset drops accuracy on purpose before the fine-tuning recovers it). It is on by default
    (0.05) for the methods with an ascent or a penalty that can run away: neggrad, neggrad_plus,
    l1_sparse, random_label, salun and scrub; off for finetune, whose transient dip after the
    learning rate restarts recovers under the cosine schedule.
    """

    def __init__(self, model: nn.Module, retain: View, runtime: Runtime, max_drop: float, *,
                 probe_size: int = 512, seed: int = 0, reference: nn.Module | None = None):
        g = torch.Generator().manual_seed(seed + 104729)
        pick = torch.randperm(len(retain), generator=g)[:probe_size]
        self.model, self.runtime, self.max_drop = model, runtime, max_drop
        self.probe = View(retain.split, retain.index[pick.to(retain.index.device)],
                          retain.labels[pick.to(retain.labels.device)] if retain.labels is not None else None)
        self.last = accuracy(model, self.probe, runtime)
        self.before = accuracy(reference, self.probe, runtime) if reference is not None else self.last
        self.good = self._state()
        self.checks = 0
        self.tripped = False

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def __call__(self) -> bool:
        self.checks += 1
        acc = accuracy(self.model, self.probe, self.runtime)
        if self.before - acc > self.max_drop:
            self.model.load_state_dict(self.good)
            self.tripped = True
            return False
        self.good, self.last = self._state(), acc
        return True

    def report(self) -> dict[str, Any]:
        return {"guard_tripped": self.tripped, "guard_checks": self.checks,
                "retain_probe_before": self.before, "retain_probe_after": self.last}
