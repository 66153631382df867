"""``scrub`` (SCRUB, Kurmanji et al.; ALGORITHMS §4.4): teacher–student max/min distillation.

The teacher is a frozen copy of the input model (eval mode, no gradients). Each epoch e
(0-based) runs, when e < ``msteps``, a *max-step* pass over the forget set that maximizes
KL_T(student‖teacher) (we minimize its negative), then a *min-step* pass over the retain set
minimizing γ·CE + β·KL_T. KL_T is Hinton's distillation loss at temperature T,
``kl_div(log_softmax(s/T), softmax(t/T), batchmean)·T²`` (SCRUB's ``DistillKL``; in math
notation this is KL(teacher‖student), which SCRUB's paper calls d(student, teacher)).
Both passes share one optimizer, as in SCRUB's code; forget batches use ``forget_batch_size``
(SCRUB's ``del_batch_size``), smaller than the retain batch so a small forget set still gets
several max steps. Batches carry ``forget`` (all True on max-step batches).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .base import LoopUnlearner, check_number, register


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    s = F.log_softmax(student_logits.float() / t, dim=1)
    p = F.softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(s, p, reduction="batchmean") * (t * t)


@register
class Scrub(LoopUnlearner):
    name = "scrub"
    defaults = {
        **LoopUnlearner.defaults, "max_retain_drop": 0.05, "epochs": 5, "lr": 0.02, "msteps": 2, "temperature": 4.0,
        "beta": 0.5, "gamma": 1.0, "forget_batch_size": 32,
    }

    _teacher: torch.nn.Module | None = None

    def validate(self):
        super().validate()
        for key in ("beta", "gamma"):
            check_number(self.hp, key, low=0)
        check_number(self.hp, "temperature", low=0, low_open=True)
        check_number(self.hp, "msteps", low=0, integer=True)
        check_number(self.hp, "forget_batch_size", low=1, integer=True)

    def prepare(self, model, task, runtime):
        self._teacher = copy.deepcopy(model).eval()
        for p in self._teacher.parameters():
            p.requires_grad_(False)

    def batches(self, task, epoch, gen):
        if epoch < int(self.hp["msteps"]):
            for b in task.forget.batches(int(self.hp["forget_batch_size"]), shuffle=True, generator=gen):
                b.forget = torch.ones(len(b.y), dtype=torch.bool)
                yield b
        yield from task.retain.batches(int(self.hp["batch_size"]), shuffle=True, generator=gen)

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
