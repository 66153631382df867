"""``scrub`` (SCRUB, Kurmanji et al.; docs/methods.md#scrub): teacher–student max/min distillation.

The teacher is a frozen copy of the input model (eval mode, no gradients). Each epoch e
(0-based) runs, when e ≤ ``msteps`` (the reference's ``epoch <= msteps``: msteps + 1 max-step
passes at most; −1: none), a *max-step* pass over the forget set that maximizes
KL_T(student‖teacher) (we minimize its negative), then a *min-step* pass over the retain set
minimizing γ·CE + β·KL_T. KL_T is Hinton's distillation loss at temperature T,
``kl_div(log_softmax(s/T), softmax(t/T), batchmean)·T²`` (SCRUB's ``DistillKL``; in math
notation this is KL(teacher‖student), which SCRUB's paper calls d(student, teacher)).
Both passes share one optimizer, as in SCRUB's code; forget batches use ``forget_batch_size``,
by default the retain batch size as the reference feeds them (``null``); a smaller value gives a
small forget set more max steps per pass. Batches carry ``forget`` (all True on max-step batches).
Our runs are measured in steps (base.py): an "epoch" is one max pass (while e ≤ msteps) plus one
min pass, and the run stops when its step budget is spent, wherever that falls.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .base import LoopUnlearner, register


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    s = F.log_softmax(student_logits.float() / t, dim=1)
    p = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(s, p, reduction="batchmean") * (t * t)


@register
class Scrub(LoopUnlearner):
    name = "scrub"
    _teacher: torch.nn.Module | None = None

    def prepare(self, model, task, runtime):
        self._teacher = copy.deepcopy(model).eval()
        for p in self._teacher.parameters():
            p.requires_grad_(False)

    def batches(self, task, epoch, gen):
        if epoch <= int(self.hp["msteps"]):
            size = self.hp["forget_batch_size"] or self.batch_size
            for b in task.forget.batches(int(size), shuffle=True, generator=gen):
                b.forget = torch.ones(len(b.y), dtype=torch.bool)
                yield b
        yield from task.retain.batches(self.batch_size, shuffle=True, generator=gen)

    def loss(self, model, x, batch, epoch):
        logits = model(x)
        with torch.no_grad():
            teacher = self._teacher(x)
        kl = distill_kl(logits, teacher, float(self.hp["temperature"]))
        if batch.forget is not None and bool(batch.forget.all()):
            return -kl
        ce = F.cross_entropy(logits, batch.y.to(logits.device))
        return float(self.hp["gamma"]) * ce + float(self.hp["beta"]) * kl

    def finish(self):
        self._teacher = None
        super().finish()
