"""``iau`` (IAU, Influence Approximation Unlearning; ALGORITHMS §6): one corrected ascent step.

g = ∇θ mean-CE(retain) − ∇θ mean-CE(forget), each a full pass over its set accumulated over
minibatches with batch-size weights (so it is the gradient of the mean over the whole set, as
the reference's full-batch pass), with the model in eval mode (BatchNorm statistics frozen; the
reference CNN has no BN). Then ONE step of a fresh ``Adam(lr)``: θ − lr·g/(|g|+eps), i.e. about
θ + lr·sign(ḡ_F − ḡ_R) per coordinate (§6.2, §7.9): every entry moves by at most ``lr``.

``steps`` > 1 (ours, default 1) repeats "recompute g at the current θ, step the same Adam";
each step still moves every entry by at most ``lr`` (Adam's bias-corrected ratio is ≤ 1 in
magnitude up to rounding when gradients keep their sign, and ≈ 1 otherwise).

IAU is meant for models trained with its gradient-restriction penalty
(``TrainConfig(gr_alpha=0.005)``, :func:`~worker.engine.training.gradient_restriction`), which
bounds per-sample gradients so that one step approximates removal; the paper reports that it
works better on such models, and on models trained without it (what the service usually
receives) expect weaker results (§6.2 notes). On digits we measured no clear gain
(bench/results/TUNING.md, small_cnn width 32, 2 seeds: score 0.982 plain vs 0.986 GR-trained
at lr 3e-4 × 1 step; best over an lr × steps grid 0.989 plain vs 0.987 GR) — digits may be too
easy to show it.

Default lr: the reference's 1e-3 moves *every* coordinate by ~1e-3, which on our small CNNs
(25k–95k parameters, BatchNorm) drops test accuracy to ~0.8 with or without GR training; 3e-4
is the tuned default (``bench.tune_unlearners``). The safe step shrinks as models grow, since
the displacement is lr per coordinate whatever the gradient's size (§7.9): tune lr per model.
The paper's weighting λ of the retain term is [GAP]; we use the code's means with λ = 1.
"""

from __future__ import annotations

import torch

from ..runtime import RunContext, seed_everything
from .base import Unlearner, check_number, register
from .masking import gradient_sum, trainable


@register
class IAU(Unlearner):
    name = "iau"
    defaults = {"lr": 3e-4, "steps": 1, "batch_size": 256, "eps": 1e-8}

    def validate(self):
        super().validate()
        check_number(self.hp, "steps", low=1, integer=True)
        check_number(self.hp, "eps", low=0, low_open=True)

    def unlearn(self, model, task, runtime, ctx=None):
        ctx = ctx or RunContext()
        seed_everything(task.seed)
        model = runtime.prepare(model)
        params = trainable(model)
        opt = torch.optim.Adam([p for _, p in params], lr=float(self.hp["lr"]), eps=float(self.hp["eps"]))
        steps, bs = int(self.hp["steps"]), int(self.hp["batch_size"])
        n_r, n_f = len(task.retain), len(task.forget)
        for step in range(steps):
            # progress: the retain pass dominates, so split each step by set size
            part = ctx.sub(step / steps, (step + 1) / steps)
            cut = n_r / max(n_r + n_f, 1)
            g_r = gradient_sum(model, task.retain, runtime, batch_size=bs, average=True, ctx=part) if n_r else {}
            part.report(cut)
            g_f = gradient_sum(model, task.forget, runtime, batch_size=bs, average=True, ctx=part) if n_f else {}
            for n, p in params:
                g = torch.zeros_like(p, dtype=torch.float32)
                if n in g_r:
                    g += g_r[n]
                if n in g_f:
                    g -= g_f[n]
                p.grad = g.to(p.dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
            part.report(1.0)
        model.eval()
        return model
