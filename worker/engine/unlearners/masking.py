"""Shared pieces of the gradient-based methods: gradient passes without a step, global top-k
masks, and a loop base whose gradients are multiplied by a fixed 0/1 mask.

Used by ``salun`` (saliency mask), ``del`` (criticality mask) and ``iau`` (mean gradients).
Device and precision follow the :class:`~worker.engine.runtime.Runtime` exactly as the shared
loop does: inputs through ``runtime.inputs``, the forward pass under ``runtime.autocast()``, the
loss and the accumulated gradients in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import View
from ..runtime import RunContext, Runtime
from ..training import make_optimizer
from .base import LoopUnlearner

LossOfLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def gradient_sum(
    model: nn.Module, view: View, runtime: Runtime, *, batch_size: int, average: bool = False,
    loss: LossOfLogits = F.cross_entropy, ctx: RunContext | None = None,
) -> dict[str, torch.Tensor]:
    """Gradients of the batch-mean ``loss`` accumulated over ``view``, in eval mode, no optimizer step.

    ``average=False``: Σ_b ∇θ loss_b (SalUn's and DEL's accumulation over forget batches).
    ``average=True``: Σ_b (|b|/|view|) ∇θ loss_b, i.e. the gradient of the mean loss over the whole
    view (IAU's "full batch" pass, reproduced with minibatches). Eval mode freezes BatchNorm
    statistics so that the gradient is the one of the model being unlearned, and nothing in the
    model (parameters, buffers, ``.grad``) is modified. Returns float32 tensors keyed by name.
    """
    params = trainable(model)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    was_training = model.training
    model.eval()
    n = len(view)
    try:
        for b in view.batches(batch_size):
            if ctx is not None:
                ctx.check()
            x = runtime.inputs(b.x)
            with runtime.autocast():
                logits = model(x)
            value = loss(logits.float(), b.y.to(logits.device))
            grads = torch.autograd.grad(value, [p for _, p in params], allow_unused=True)
            weight = len(b.y) / n if average else 1.0
            for (name, _), g in zip(params, grads, strict=True):
                if g is not None:
                    acc[name].add_(g.float(), alpha=weight)
    finally:
        model.train(was_training)
    return acc


def top_fraction(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Bool masks marking the ``int(fraction · N)`` largest entries of all tensors ranked together.

    Exactly that many entries are selected (``topk``, ties broken by position), so the masked
    fraction is ``fraction`` to within one entry whatever the ties (DEL's channel scores tie
    within a channel, and unused parameters all score 0). If every score is 0 (an empty forget
    set) nothing is selected rather than an arbitrary ``fraction`` of the model.
    """
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores.values()])
    k = min(int(fraction * flat.numel()), flat.numel()) if bool(flat.any()) else 0  # all-zero scores: nothing
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        chosen[flat.topk(k, sorted=False).indices] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = chosen[start : start + s.numel()].view(s.shape)
        start += s.numel()
    return out


class MaskedLoopUnlearner(LoopUnlearner):
    """A loop whose gradients are multiplied by a fixed per-parameter 0/1 mask (``set_mask`` in ``prepare``).

    Weight decay is taken out of the optimizer and added to the gradient *before* masking
    (g ← (g + wd·θ) ⊙ M). For the masked entries this is exactly the optimizer's coupled weight
    decay; entries outside the mask get a zero gradient from the first step on, so their
    momentum/Adam state stays zero and they stay **bit-identical** to the input model.
    [Deviation] The SalUn/RUM code masks only the loss gradient and lets SGD's weight decay
    shrink unmasked weights as well; we keep the localization exact instead (it is what users
    of a "localized" method expect, and the effect of 5e-4 decay over a few epochs is tiny).
    Parameters absent from the mask are trained normally.
    """

    _masked: list[tuple[nn.Parameter, torch.Tensor | None]]  # (parameter, bool 'frozen' mask)

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        plan = self.plan
        return make_optimizer(model.parameters(), plan.optimizer, plan.lr, self.hp["momentum"], 0.0)

    def set_mask(self, model: nn.Module, mask: dict[str, torch.Tensor]) -> None:
        """``mask[name]`` is a bool tensor shaped like the parameter; True entries are trained."""
        self._masked = [(p, ~mask[n].to(device=p.device, dtype=torch.bool) if n in mask else None)
                        for n, p in trainable(model)]

    def after_backward(self, model: nn.Module) -> None:
        wd = self.plan.weight_decay if self.plan is not None else 0.0
        for p, frozen in self._masked:
            if p.grad is None:
                continue
            if wd:
                p.grad.add_(p.detach(), alpha=wd)
            if frozen is not None:
                p.grad.masked_fill_(frozen, 0.0)  # exact zeros even where the loss gradient is not finite

    def finish(self) -> None:
        self._masked = []
        super().finish()
