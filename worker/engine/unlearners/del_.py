"""``del`` (DEL, Deletion by Example Localization; docs/methods.md#del): reset the critical weights, then
fine-tune only them (and the classifier head) on the retain set.

1. **Criticality** (``weighted_grad``, eval mode, no step): G = Σ_{forget batches} ∇θ CE_b
   (batch-mean CE), score s = |θ ⊙ G|.
2. **Channel granularity**: a tensor with ndim > 1 is viewed as [C_out, fan_in] (dim 0 is the
   output dimension of ``nn.Linear`` and ``nn.Conv2d``); row o scores the mean of its top-k
   entries with k = int(0.1·C_out) as in the reference (10% of the *output* channels, not of
   fan_in), **guarded to at least 1** (C_out < 10 gives k = 0 and a NaN mean in
   the reference) and at most fan_in; every entry of the row takes that score. 1-D
   tensors (biases, BatchNorm γ/β) keep per-entry scores.
3. **Selection**: M = 1 on the top ``threshold`` fraction of *entries* of all trainable tensors
   ranked together (exactly int(threshold·N) entries; a channel may be split at the cut).
4. **Reset**: θ' = (1−M)·θ + M·θ_fresh with θ_fresh a *fresh* seeded init of the architecture
   (``architectures.fresh_init``, not the original init, as in the reference). Only parameters are reset:
   BatchNorm running statistics are kept.
5. **Fine-tune** on the retain set (the forget set is not used) with gradients multiplied by M,
   except the classifier head, which is trained in full. The reference finds the head by name
   ('fc' / 'mlp_head'); we take the parameters of the **last ``nn.Linear`` module** in
   ``model.modules()`` order, which is ``fc`` for every built-in and works for user
   architectures with other names (a model without ``nn.Linear`` has no unmasked head).
   Optimizer: SGD momentum 0.9, weight decay 0, cosine to 0.01·lr (as the reference).

[Deviations] The reference's forget loader uses ``drop_last=True`` (batch 128); ours keeps the
last partial batch, since a forget set smaller than a batch would otherwise score nothing.
The reference fine-tunes 30 epochs at lr 0.015 (0.15 of the original's 0.1) on CIFAR-10/ResNet-18,
as much as a retrain; ours spends a ``budget`` share of the original's steps (base.py), and the
retain guard returns the input model when the fine-tuning did not recover. ``epochs=0`` gives the
reset alone (with the guard off).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import fresh_init
from .base import register
from .masking import MaskedLoopUnlearner, gradient_sum, top_fraction, trainable

CHANNEL_TOPK = 0.1  # k = int(CHANNEL_TOPK · C_out) entries per row (reference value)


def channel_scores(score: torch.Tensor, topk_frac: float = CHANNEL_TOPK) -> torch.Tensor:
    """DEL's channel granularity: each row of a ≥2-D score gets the mean of its k largest entries."""
    if score.ndim < 2:
        return score
    rows = score.reshape(score.shape[0], -1)
    k = min(max(1, int(topk_frac * rows.shape[0])), rows.shape[1])  # guard: k ≥ 1 (docs/methods.md#del)
    per_row = rows.topk(k, dim=1).values.mean(dim=1)
    return per_row.view(-1, *([1] * (score.ndim - 1))).expand_as(score)


def criticality_scores(model, forget, runtime, *, batch_size: int, ctx=None) -> dict[str, torch.Tensor]:
    """Channel-granular |θ ⊙ Σ_b ∇θ CE_b| per trainable tensor (steps 1–2 above)."""
    g = gradient_sum(model, forget, runtime, batch_size=batch_size, ctx=ctx)
    params = dict(trainable(model))
    return {n: channel_scores((params[n].detach().float() * gn).abs()) for n, gn in g.items()}


def criticality_mask(model, forget, runtime, *, threshold: float, batch_size: int, ctx=None):
    return top_fraction(criticality_scores(model, forget, runtime, batch_size=batch_size, ctx=ctx), threshold)


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of the last ``nn.Linear`` module (the classifier head)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return set()
    head = {id(p) for p in linears[-1].parameters()}
    return {n for n, p in model.named_parameters() if id(p) in head}


@register
class Del(MaskedLoopUnlearner):
    name = "del"
    # The reset drops accuracy on purpose and fine-tuning recovers it: the guard never stops DEL
    # early, it only judges the end (and returns the input model if it did not recover).
    guard_patience = None

    reset_fraction: float | None = None  # fraction of trainable entries reset by the last run

    def prepare(self, model, task, runtime):
        mask = criticality_mask(model, task.forget, runtime, threshold=float(self.hp["threshold"]),
                                batch_size=self.batch_size, ctx=self._ctx)
        fresh = dict(fresh_init(model, seed=task.seed + 104729).named_parameters())
        with torch.no_grad():
            for n, p in trainable(model):
                p.copy_(torch.where(mask[n], fresh[n].detach().to(p.dtype), p))
        total = sum(m.numel() for m in mask.values())
        self.reset_fraction = sum(int(m.sum()) for m in mask.values()) / max(total, 1)
        head = head_parameter_names(model)
        self.set_mask(model, {n: m for n, m in mask.items() if n not in head})

    def loss(self, model, x, batch, epoch):
        logits = model(x)
        return F.cross_entropy(logits, batch.y.to(logits.device))
