"""``retrain``: train a freshly initialized copy of the architecture on the retain set only.

This is the gold standard (and the audit's reference). It uses the original's recipe (``task.recipe``,
:mod:`worker.engine.recipe`); explicit hyperparameters override single fields.
"""

from __future__ import annotations

from ..architectures import fresh_init
from ..training import TrainConfig, train_model
from .base import Unlearner, register


@register
class Retrain(Unlearner):
    name = "retrain"

    def config_for(self, task) -> TrainConfig:
        recipe = task.the_recipe()
        # a hyperparameter left None is the original's (task.recipe): the reference is trained as it was
        given = {k: v for k, v in self.hp.items() if v is not None}
        base = {"epochs": recipe.epochs, "lr": recipe.lr, "batch_size": recipe.batch_size,
                "optimizer": recipe.optimizer, "momentum": recipe.momentum,
                "weight_decay": recipe.weight_decay, "schedule": recipe.schedule}
        return TrainConfig(seed=task.seed, **{**base, **given})

    def unlearn(self, model, task, runtime, ctx=None):
        fresh = fresh_init(model, seed=task.seed + 7919)
        return train_model(fresh, task.retain, self.config_for(task), runtime=runtime, ctx=ctx)
