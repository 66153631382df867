"""``random_label`` (RL_og; docs/methods.md#random_label): fine-tune on forget-with-random-labels ∪ retain.

Forget rows get new random labels every epoch (seeded by the task's seed and the epoch, as RUM's
``RL`` redraws them per epoch), then forget and retain are shuffled together into one view
(``View.with_labels`` + ``data.concat``) and trained with CE.
``label_mode="any"`` draws labels uniformly from all classes, as RUM's ``RL_og`` and SalUn do (so
about 1/C of the rows keep their true label); ``"wrong"`` draws uniformly among the other C−1
classes. ``"runner_up"`` gives each forget row, once before the loop, the class the model as it
entered ranks highest after the row's own label: for a row whose label is wrong (the request's
reason is ``mislabeled`` or ``poisoned``) that is usually the class the rest of the data says it
is (a backdoored row's image still looks like its true class; a flipped row like its old one), so
training pulls the row towards what a retrain predicts instead of towards noise. It is the cheap
form of Boundary Unlearning's "shrink" (nearest other class by an adversarial step; Chen et al.,
CVPR 2023); docs/unlearning.md#corrupted-rows has the measurements. Batches carry ``forget``
(True for relabeled rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import View, concat
from ..runtime import predict
from .base import LoopUnlearner, register


def runner_up_labels(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row, the highest-scoring class other than its label ``y``."""
    # finite scores first, so the label's -inf is always the lowest (an argmax of all -inf is 0)
    masked = torch.nan_to_num(logits.detach().float().cpu(), nan=0.0, posinf=3e38, neginf=-3e38)
    masked[torch.arange(len(y)), y.cpu()] = float("-inf")
    return masked.argmax(1)


def random_labels(y: torch.Tensor, num_classes: int, mode: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = y.cpu()
    if mode == "any":
        return torch.randint(0, num_classes, y.shape, generator=g)
    return (y + torch.randint(1, max(num_classes, 2), y.shape, generator=g)) % num_classes


@register
class RandomLabel(LoopUnlearner):
    name = "random_label"
    _runner_up: torch.Tensor | None = None

    def prepare(self, model, task, runtime):
        super().prepare(model, task, runtime)
        self._runner_up = None
        if self.hp["label_mode"] == "runner_up" and len(task.forget):
            self._runner_up = runner_up_labels(predict(model, task.forget, runtime), task.forget.y)

    def relabeled_forget(self, task, epoch: int) -> View:
        """The forget set with this epoch's labels (random, or the fixed runner-up classes)."""
        forget = task.forget
        if self.hp["label_mode"] == "runner_up":
            if self._runner_up is None or len(self._runner_up) != len(forget):
                raise RuntimeError("random_label: runner-up labels are computed in prepare()")
            return forget.with_labels(self._runner_up.to(forget.y.device))
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
