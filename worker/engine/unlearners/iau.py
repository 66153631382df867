"""``iau`` (IAU, Influence Approximation Unlearning; docs/methods.md#iau): one corrected ascent step.

g = ∇θ mean-CE(retain) − ∇θ mean-CE(forget), each a full pass over its set accumulated over
minibatches with batch-size weights (so it is the gradient of the mean over the whole set, as
the reference's full-batch pass), with the model in eval mode (BatchNorm statistics frozen; the
reference CNN has no BN). Then ONE step of a fresh ``Adam(lr)``: θ − lr·g/(|g|+eps), i.e. about
θ + lr·sign(ḡ_F − ḡ_R) per coordinate: every entry moves by at most ``lr``.

``steps`` > 1 (ours, default 1) repeats "recompute g at the current θ, step the same Adam";
each step still moves every entry by at most ``lr`` (Adam's bias-corrected ratio is ≤ 1 in
magnitude up to rounding when gradients keep their sign, and ≈ 1 otherwise).

IAU is meant for models trained with its gradient-restriction penalty
(``TrainConfig(gr_alpha=0.005)``, :func:`~worker.engine.training.gradient_restriction`), which
bounds per-sample gradients so that one step approximates removal; the paper reports that it
works better on such models, and on models trained without it (what the service usually
receives) expect weaker results. On digits the earlier epoch-based search of the
defaults measured no clear gain (small_cnn width 32, 2 seeds: score 0.982 plain vs 0.986
GR-trained at lr 3e-4 × 1 step; best over an lr × steps grid 0.989 plain vs 0.987 GR) — digits
may be too easy to show it.

**The step scales with the model** (ours, the default): the reference's fixed Adam step moves
*every* coordinate by ``lr`` whatever the model, which is nothing on a large ResNet and wrecks a
small CNN (IAU took test accuracy to 0.17 on a 3,500-row image set with the old constant). With
``lr`` null, each tensor moves along its own gradient by ``step_size`` × ‖θ_t‖ (a relative L2
step per tensor, so the displacement is a share of the weights' own size, the direction the
influence direction ḡ_F − ḡ_R). ``lr`` set gives the reference's Adam step instead.

**Within the retain guard**: after each step the retain probe (base.py's :class:`RetainGuard`
semantics, ``max_retain_drop``) is measured; a step that breaks the limit is undone and retried
at half the size, up to ``backtrack`` times, after which the model as it was before that step is
returned (``last_run["guard"]["outcome"]`` says ``within``, ``restored`` or ``input``). The paper's
weighting λ of the retain term could not be established ([Choice]); we use the code's means with λ = 1.
"""

from __future__ import annotations

import torch

from ..catalog import GuardOutcome
from ..runtime import RunContext, seed_everything
from .base import RetainGuard, Unlearner, register
from .masking import gradient_sum, trainable


@register
class IAU(Unlearner):
    name = "iau"
    last_run: dict | None = None

    def unlearn(self, model, task, runtime, ctx=None):
        ctx = ctx or RunContext()
        seed_everything(task.seed)
        model = runtime.prepare(model)
        params = trainable(model)
        recipe = task.the_recipe()
        absolute = self.hp["lr"] is not None
        opt = (torch.optim.Adam([p for _, p in params], lr=float(self.hp["lr"]), eps=float(self.hp["eps"]))
               if absolute else None)
        steps = int(self.hp["steps"])
        bs = int(self.hp["batch_size"] or recipe.batch_size)
        n_r, n_f = len(task.retain), len(task.forget)
        guard = None
        if self.hp["max_retain_drop"] is not None and n_r:
            guard = RetainGuard(model, task.retain, runtime, float(self.hp["max_retain_drop"]), seed=task.seed,
                                reference=task.reference, holdout=task.holdout)
        sizes, outcome = [], GuardOutcome.WITHIN
        for step in range(steps):
            # progress: the retain pass dominates, so split each step by set size
            part = ctx.sub(step / steps, (step + 1) / steps)
            cut = n_r / max(n_r + n_f, 1)
            g_r = gradient_sum(model, task.retain, runtime, batch_size=bs, average=True, ctx=part) if n_r else {}
            part.report(cut)
            g_f = gradient_sum(model, task.forget, runtime, batch_size=bs, average=True, ctx=part) if n_f else {}
            direction = {}
            for n, p in params:
                g = torch.zeros_like(p, dtype=torch.float32)
                if n in g_r:
                    g += g_r[n]
                if n in g_f:
                    g -= g_f[n]
                direction[n] = g
            if absolute:
                for n, p in params:
                    p.grad = direction[n].to(p.dtype)
                opt.step()
                opt.zero_grad(set_to_none=True)
                sizes.append(float(self.hp["lr"]))
            else:
                size = self._relative_step(params, direction, guard)
                sizes.append(size)
                if size == 0.0:
                    outcome = GuardOutcome.INPUT if step == 0 else GuardOutcome.RESTORED
                    break
            part.report(1.0)
        run = {"steps_done": len(sizes), "step_sizes": sizes,
               "cost_share": len(sizes) * (n_r + n_f) / max(recipe.steps * recipe.batch_size, 1)}
        if guard is not None:
            report = guard.finish()  # absolute mode: restore the input if the steps broke the limit
            if outcome != GuardOutcome.WITHIN:
                report["outcome"] = outcome
            run["guard"] = report
        else:
            run["guard"] = {"outcome": GuardOutcome.OFF}
        self.last_run = run
        model.eval()
        return model

    def _relative_step(self, params, direction, guard) -> float:
        """θ_t ← θ_t − s·‖θ_t‖·d_t/‖d_t‖ per tensor; halve s while the guard's limit is broken.

        Returns the step size used, or 0.0 when every try broke the limit (the model is then as
        it was before the step)."""
        before = {n: p.detach().clone() for n, p in params}
        size = float(self.hp["step_size"])
        for _ in range(int(self.hp["backtrack"]) + 1):
            with torch.no_grad():
                for n, p in params:
                    d = direction[n]
                    norm = d.norm()
                    if norm > 0:
                        p.copy_(before[n] - (size * before[n].float().norm() / norm * d).to(p.dtype))
            if guard is None or guard.check():
                return size
            size /= 2
        with torch.no_grad():
            for n, p in params:
                p.copy_(before[n])
        return 0.0
