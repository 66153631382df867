"""``salun`` (SalUn; docs/methods.md#salun): random-label unlearning restricted to salient weights.

Saliency mask (standard SalUn, OPTML-Group code): in eval mode and without any optimizer step,
g = |Σ_{forget batches} ∇θ(−CE_b)| (batch-mean CE, true labels); M = 1 on the ``k`` fraction of
entries with the **largest** g, ranked globally over all trainable tensors (k = 0.5 by default).
Then, as SalUn's current code (``Classification/unlearn/RL.py``), each epoch is a pass over the
forget set with random labels (redrawn every epoch) followed by a pass over the retain set with
true labels, gradients multiplied by M. (``random_label`` is RUM's ``RL_og``, which shuffles both
sets together instead.)

[Deviation] RUM's released ``generate_mask.py`` differs in two ways (docs/methods.md#salun): it
calls ``optimizer.step()`` while accumulating the gradients (so the model it unlearns is not the
one it scored), and it ranks without the minus sign, so ``ranks < thr`` marks the *smallest* |g|
entries. We reproduce neither bug.

Entries outside M stay bit-identical: weight decay is applied through the masked gradient (see
:class:`~.masking.MaskedLoopUnlearner`), which matches SalUn's current code (it restores the
masked-out weights and zeroes their momentum every step); RUM's older copy lets SGD's decay
shrink them.
"""

from __future__ import annotations

import torch

from .base import register
from .masking import MaskedLoopUnlearner, gradient_sum, top_fraction
from .random_label import RandomLabel


def saliency_mask(model, forget, runtime, *, k: float, batch_size: int, ctx=None):
    """SalUn's mask: bool per entry, True on the top-``k`` fraction of |Σ_b ∇θ CE_b| over ``forget``."""
    g = gradient_sum(model, forget, runtime, batch_size=batch_size, ctx=ctx)
    return top_fraction({n: t.abs() for n, t in g.items()}, k)


@register
class SalUn(MaskedLoopUnlearner, RandomLabel):
    name = "salun"
    def prepare(self, model, task, runtime):
        mask = saliency_mask(model, task.forget, runtime, k=float(self.hp["k"]),
                             batch_size=self.batch_size, ctx=self._ctx)
        self.set_mask(model, mask)
        super().prepare(model, task, runtime)

    def batches(self, task, epoch, gen):
        for b in self.relabeled_forget(task, epoch).batches(self.batch_size, shuffle=True, generator=gen):
            b.forget = torch.ones(len(b.y), dtype=torch.bool)
            yield b
        yield from task.retain.batches(self.batch_size, shuffle=True, generator=gen)
