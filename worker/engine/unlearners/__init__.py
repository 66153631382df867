"""Unlearners: one small class per file, registered by name, sharing one training loop.

>>> from worker.engine.unlearners import get_unlearner
>>> u = get_unlearner("finetune", epochs=3)
>>> model = u.unlearn(model, task, runtime)
"""

from .base import REGISTRY, LoopUnlearner, Unlearner, UnlearningTask, get_unlearner, register

# Importing the modules registers the built-in methods.
from . import (  # noqa: E402, F401, I001  isort: skip
    retrain, finetune, neggrad, neggrad_plus, l1_sparse, random_label, salun, scrub, del_, iau, none,
)

__all__ = ["REGISTRY", "LoopUnlearner", "UnlearningTask", "Unlearner", "get_unlearner", "register"]
