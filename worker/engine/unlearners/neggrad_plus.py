"""``neggrad_plus`` (NegGrad+ / NG; docs/methods.md#neggrad_plus): descend on retain, ascend on forget.

Loss per step: α·CE(retain batch) − (1−α)·CE(forget batch). An epoch is one shuffled pass over
the retain set; forget batches are drawn from ``zip(retain, cycle(forget))`` as in RUM's code,
except that the forget set is reshuffled each time it is exhausted (``itertools.cycle`` would
replay the first order forever). The two halves are forwarded separately, as in the reference,
so BatchNorm's train-mode statistics of one half never mix with the other.

Defaults: 8% of the original's steps at half its learning rate, α 0.3 (chosen on digits:
docs/unlearning.md). RUM's README uses lr 0.01 and α 0.97–0.99 for 5 full epochs on
CIFAR-10/ResNet-18 (a sixth of the original's training); within a budget of a few percent of the
steps, the ascent term needs a larger weight to move memorized rows at all.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..data import Batch, View
from .base import LoopUnlearner, register
from .neggrad import bounded_ce


def reshuffled_cycle(view: View, batch_size: int, gen: torch.Generator) -> Iterator[Batch]:
    """Endless batches of ``view``, reshuffled on every pass; nothing if the view is empty."""
    while len(view):
        yield from view.batches(batch_size, shuffle=True, generator=gen)


@register
class NegGradPlus(LoopUnlearner):
    name = "neggrad_plus"
    def batches(self, task, epoch, gen):
        bs = self.batch_size
        forget = reshuffled_cycle(task.forget, bs, gen)
        for rb in task.retain.batches(bs, shuffle=True, generator=gen):
            fb = next(forget, None)
            if fb is None:  # empty forget set: plain fine-tuning on retain
                yield rb
                continue
            x = torch.cat([rb.x, fb.x.to(rb.x.device)])
            y = torch.cat([rb.y, fb.y.to(rb.y.device)])
            is_forget = torch.zeros(len(y), dtype=torch.bool)
            is_forget[len(rb.y):] = True
            yield Batch(x, y, torch.cat([rb.pos, fb.pos.to(rb.pos.device)]), forget=is_forget)

    def loss(self, model, x, batch, epoch):
        a = float(self.hp["alpha"])
        y = batch.y.to(x.device)
        if batch.forget is None:
            return a * F.cross_entropy(model(x), y)
        f = batch.forget.to(x.device)
        retain_loss = F.cross_entropy(model(x[~f]), y[~f])
        forget_loss = bounded_ce(model(x[f]), y[f], self.hp["loss_bound"])
        return a * retain_loss - (1 - a) * forget_loss
