"""``retrain``: train a freshly initialized copy of the architecture on the retain set only.

This is the gold standard (and the audit's reference). It uses the same recipe as the original
training (:class:`~worker.engine.training.TrainConfig`), so pass the original's epochs and lr.
"""

from __future__ import annotations

from ..architectures import fresh_init
from ..training import TrainConfig, train_model
from .base import Unlearner, register


@register
class Retrain(Unlearner):
    name = "retrain"
    defaults = {
        "epochs": 30, "lr": 0.05, "batch_size": 128, "optimizer": "sgd", "momentum": 0.9,
        "weight_decay": 5e-4, "schedule": "cosine",
    }

    def unlearn(self, model, task, runtime, ctx=None):
        cfg = TrainConfig(seed=task.seed, **self.hp)
        fresh = fresh_init(model, seed=task.seed + 7919)
        return train_model(fresh, task.retain, cfg, runtime=runtime, ctx=ctx)
