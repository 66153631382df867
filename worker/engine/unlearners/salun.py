"""``salun`` (SalUn, ALGORITHMS §4.4): random-label unlearning restricted to salient weights.

Saliency mask (standard SalUn, OPTML-Group code): in eval mode and without any optimizer step,
g = |Σ_{forget batches} ∇θ(−CE_b)| (batch-mean CE, true labels); M = 1 on the ``k`` fraction of
entries with the **largest** g, ranked globally over all trainable tensors (k = 0.5 by default).
Then ``random_label`` runs with gradients multiplied by M.

[Deviation, on purpose] RUM's released ``generate_mask.py`` differs in two ways (ALGORITHMS
§4.4/§7.4): it calls ``optimizer.step()`` while accumulating the gradients (so the model it
unlearns is not the one it scored), and it ranks without the minus sign, so ``ranks < thr``
marks the *smallest* |g| entries. We reproduce neither bug.

[Deviation] Weight decay is applied through the masked gradient (see
:class:`~.masking.MaskedLoopUnlearner`), so entries outside M stay bit-identical; SalUn's code
lets SGD's decay shrink them too.
"""

from __future__ import annotations

from .base import check_number, register
from .masking import MaskedLoopUnlearner, gradient_sum, top_fraction
from .random_label import RandomLabel


def saliency_mask(model, forget, runtime, *, k: float, batch_size: int, ctx=None):
    """SalUn's mask: bool per entry, True on the top-``k`` fraction of |Σ_b ∇θ CE_b| over ``forget``."""
    g = gradient_sum(model, forget, runtime, batch_size=batch_size, ctx=ctx)
    return top_fraction({n: t.abs() for n, t in g.items()}, k)


@register
class SalUn(MaskedLoopUnlearner, RandomLabel):
    name = "salun"
    defaults = {**RandomLabel.defaults, "max_retain_drop": 0.05, "epochs": 3, "lr": 0.005, "k": 0.5}

    def validate(self):
        super().validate()
        check_number(self.hp, "k", low=0, high=1)

    def prepare(self, model, task, runtime):
        mask = saliency_mask(model, task.forget, runtime, k=float(self.hp["k"]),
                             batch_size=int(self.hp["batch_size"]), ctx=self._ctx)
        self.set_mask(model, mask)
        super().prepare(model, task, runtime)
