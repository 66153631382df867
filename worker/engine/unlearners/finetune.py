"""``finetune`` (FT; docs/methods.md#finetune): cross-entropy on the retain set only.

The forget set is never seen; forgetting comes from catastrophic forgetting while the model
keeps fitting the retain set.
"""

from __future__ import annotations

import torch.nn.functional as F

from .base import LoopUnlearner, register


@register
class Finetune(LoopUnlearner):
    name = "finetune"
    def loss(self, model, x, batch, epoch):
        return F.cross_entropy(model(x), batch.y)
