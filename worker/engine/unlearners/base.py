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
from ..training import fit, make_optimizer, make_scheduler

REGISTRY: dict[str, type[Unlearner]] = {}


@dataclass
class UnlearningTask:
    """What to forget and what to keep. Views live on the runtime's device or on CPU."""

    forget: View
    retain: View
    num_classes: int
    seed: int = 0


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
        for key in ("lr", "epochs", "batch_size"):
            if key in self.hp:
                v = self.hp[key]
                if not isinstance(v, int | float) or isinstance(v, bool) or v < 0 or (key != "lr" and v != int(v)):
                    raise ConfigError(f"hyperparameters.{key}: must be a non-negative number, got {v!r}")
                if key == "batch_size" and v < 1:
                    raise ConfigError("hyperparameters.batch_size: must be >= 1")

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
        "weight_decay": 5e-4, "schedule": "constant", "eta_min_frac": 0.0,
    }

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
            return fit(
                model, epochs=epochs, batches=lambda e: self.batches(task, e, gen), loss_fn=self.loss,
                optimizer=opt, scheduler=sched, runtime=runtime, ctx=ctx,
                after_backward=self.after_backward if self.has_after_backward() else None,
            )
        finally:
            self._task = self._ctx = None
            self.finish()
