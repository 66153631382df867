"""``neggrad`` (NegGrad / GA, ALGORITHMS §4.4): gradient *ascent* on the forget set only.

Each epoch is one shuffled pass over the forget set minimizing −CE. The retain set is never
seen, so nothing holds utility in place: the method is very sensitive to ``lr × epochs``, and
our defaults (found by ``bench.tune_unlearners``, see bench/results/TUNING.md) are a short, small
push. RUM's README default for CIFAR-10/ResNet-18 is lr 1e-4 for 5 epochs at batch 256; on our
small models and forget sets of a few dozen rows that is one step per epoch and does nothing,
hence the smaller batch. Even tuned, ascent is fragile: on a less-converged model (larger
forget-set gradients) the same defaults overshoot (test accuracy 0.90 on one of three held-out
models in TUNING.md); prefer ``neggrad_plus``, ``salun``, ``scrub`` or ``del`` in production.
"""

from __future__ import annotations

import torch.nn.functional as F

from .base import LoopUnlearner, register


@register
class NegGrad(LoopUnlearner):
    name = "neggrad"
    defaults = {**LoopUnlearner.defaults, "epochs": 3, "lr": 0.005, "batch_size": 16}

    def batches(self, task, epoch, gen):
        return task.forget.batches(int(self.hp["batch_size"]), shuffle=True, generator=gen)

    def loss(self, model, x, batch, epoch):
        logits = model(x)
        return -F.cross_entropy(logits, batch.y.to(logits.device))
