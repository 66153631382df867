"""``l1_sparse`` (FT_prune, "model sparsity helps unlearning", ALGORITHMS §4.4).

Fine-tuning on the retain set with an L1 penalty on every trainable parameter:
CE(retain batch) + α_t·||θ||₁ with α_t = α·(1 − e/(E − no_l1_epochs)) for 0-based epoch e,
clamped at 0, so the penalty decays linearly to zero and the last ``no_l1_epochs`` epochs are
plain fine-tuning (as RUM's ``FT_iter``; E − no_l1_epochs ≤ 0 means no penalty at all).
||θ||₁ sums over all parameters including biases and BatchNorm affine terms, as the reference's
``l1_regularization``. α is per-model: the paper tunes it, RUM's README gives no value and DEL
uses 7e-5 on ResNet-18; ours is from ``bench.tune_unlearners``.
"""

from __future__ import annotations

import torch.nn.functional as F

from .base import LoopUnlearner, check_number, register


@register
class L1Sparse(LoopUnlearner):
    name = "l1_sparse"
    defaults = {
        **LoopUnlearner.defaults, "max_retain_drop": 0.05,
        "epochs": 3, "lr": 0.05, "alpha": 1e-3, "no_l1_epochs": 0}

    def validate(self):
        super().validate()
        check_number(self.hp, "alpha", low=0)
        check_number(self.hp, "no_l1_epochs", low=0, integer=True)

    def alpha_at(self, epoch: int) -> float:
        span = int(self.hp["epochs"]) - int(self.hp["no_l1_epochs"])
        if span <= 0:
            return 0.0
        return max(0.0, float(self.hp["alpha"]) * (1 - epoch / span))

    def loss(self, model, x, batch, epoch):
        logits = model(x)
        loss = F.cross_entropy(logits, batch.y.to(logits.device))
        a = self.alpha_at(epoch)
        if a > 0:
            loss = loss + a * sum(p.abs().sum() for p in model.parameters() if p.requires_grad)
        return loss
