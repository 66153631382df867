"""``random_label`` (RL_og; docs/methods.md#random_label): fine-tune on forget-with-random-labels ∪ retain.

Forget rows get new random labels every epoch (seeded by the task's seed and the epoch, as RUM's
``RL`` redraws them per epoch), then forget and retain are shuffled together into one view
(``View.with_labels`` + ``data.concat``) and trained with CE.
``label_mode="any"`` draws labels uniformly from all classes, as RUM's ``RL_og`` and SalUn do (so
about 1/C of the rows keep their true label); ``"wrong"`` draws uniformly among the other C−1
classes. Batches carry ``forget`` (True for relabeled rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import View, concat
from .base import LoopUnlearner, register


def random_labels(y: torch.Tensor, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = y.cpu()
    if mode == "any":
        return torch.randint(0, num_classes, y.shape, generator=g)
    return (y + torch.randint(1, max(num_classes, 2), y.shape, generator=g)) % num_classes


@register
class RandomLabel(LoopUnlearner):
    name = "random_label"
    def relabeled_forget(self, task, epoch: int) -> View:
        """The forget set with this epoch's random labels."""
        forget = task.forget
        labels = random_labels(forget.y, task.num_classes, self.hp["label_mode"], task.seed + 1013 + 7919 * epoch)
        return forget.with_labels(labels.to(forget.y.device))

    def batches(self, task, epoch, gen):
        n_forget = len(task.forget)
        view = concat([self.relabeled_forget(task, epoch), task.retain]) if n_forget else task.retain
        for b in view.batches(self.batch_size, shuffle=True, generator=gen):
            b.forget = b.pos.cpu() < n_forget
            yield b

    def loss(self, model, x, batch, epoch):
        logits = model(x)
        return F.cross_entropy(logits, batch.y.to(logits.device))
