"""``l1_sparse`` (FT_prune, "model sparsity helps unlearning"; docs/methods.md#l1_sparse).

Fine-tuning on the retain set with an L1 penalty on every trainable parameter:
CE(retain batch) + α_t·||θ||₁ with α_t = α·(1 − t/(1 − no_l1_fraction)) at fraction t of the run,
clamped at 0, so the penalty decays linearly to zero and the last ``no_l1_fraction`` of the run is
plain fine-tuning (RUM's ``FT_iter`` does the same per epoch with ``no_l1_epochs``; our runs are
measured in steps, see base.py).
||θ||₁ sums over all parameters including biases and BatchNorm affine terms, as the reference's
``l1_regularization``. α is per-model: the paper tunes it, RUM's README gives no value and DEL
uses 7e-5 on ResNet-18; ours (3e-3, with 5% of the original's steps at twice its learning rate) was
chosen on digits (docs/unlearning.md).
"""

from __future__ import annotations

import torch.nn.functional as F

from .base import LoopUnlearner, register


@register
class L1Sparse(LoopUnlearner):
    name = "l1_sparse"
    def alpha_at(self, fraction: float) -> float:
        """α at ``fraction`` of the run: linear from α to 0 at ``1 − no_l1_fraction``, then 0."""
        span = 1.0 - float(self.hp["no_l1_fraction"])
        if span <= 0:
            return 0.0
        return max(0.0, float(self.hp["alpha"]) * (1 - fraction / span))

    def loss(self, model, x, batch, epoch):
        logits = model(x)
        loss = F.cross_entropy(logits, batch.y.to(logits.device))
        a = self.alpha_at(self.fraction() if self.plan and self.plan.steps else epoch / max(self.plan.epochs, 1))
        if a > 0:
            loss = loss + a * sum(p.abs().sum() for p in model.parameters() if p.requires_grad)
        return loss
