"""``finetune`` (FT): a few epochs of cross-entropy on the retain set only (ALGORITHMS §4.4).

The forget set is never seen; forgetting comes from catastrophic forgetting while the model
keeps fitting the retain set.
"""

from __future__ import annotations

import torch.nn.functional as F

from .base import LoopUnlearner, register


@register
class Finetune(LoopUnlearner):
    name = "finetune"
    defaults = {**LoopUnlearner.defaults, "budget": 0.05, "lr_scale": 0.5}

    def loss(self, model, x, batch, epoch):
        return F.cross_entropy(model(x), batch.y)
