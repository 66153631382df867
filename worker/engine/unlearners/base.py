"""The unlearner contract and the shared SGD-loop base class.

An unlearner is configured with hyperparameters (merged over its class ``defaults``; unknown
names raise :class:`ConfigError`) and called as ``unlearn(model, task, runtime, ctx)``. It
returns the unlearned model (usually the same object, updated in place; ``retrain`` returns a new
one). ``LoopUnlearner`` turns the shared loop of :mod:`worker.engine.training` into a method
with three hooks: which batches an epoch sees, the loss of a batch, and an optional gradient edit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ..catalog import GuardOutcome
from ..data import Batch, View
from ..errors import ConfigError
from ..hparams import LOOP, SCHEMA, check_hparams, default_hparams
from ..recipe import Recipe
from ..runtime import RunContext, Runtime, predict, seed_everything
from ..training import accuracy, fit, make_optimizer, make_scheduler

REGISTRY: dict[str, type[Unlearner]] = {}


@dataclass
class UnlearningTask:
    """What to forget and what to keep. Views live on the runtime's device or on CPU."""

    forget: View
    retain: View
    num_classes: int
    seed: int = 0
    # The model the retain guard measures drops against; None = the model as it enters this call.
    # RUM passes the model as it entered the *first* bin, so the guard's budget is not spent anew
    # in every bin.
    reference: nn.Module | None = None
    # How the original was trained: budgets and learning rates are relative to it. None = the
    # engine's default recipe on |forget| + |retain| rows (see worker/engine/recipe.py).
    recipe: Recipe | None = None
    # Held-out rows (the dataset's holdout split, never test): the guard also watches accuracy
    # there, since on a memorizing model retain accuracy stays near 1 while generalization drops.
    holdout: View | None = None
    # Estimated accuracy and mean confidence (p of the label) of a retrain on the forget rows
    # (worker/engine/targets.py; None: no estimate, e.g. no holdout split). A loop with
    # ``stop: "accuracy"`` or ``"confidence"`` stops once the forget rows are down to it.
    forget_target: dict[str, float] | None = None
    # The most optimizer steps this call may spend in all its attempts (run_unlearning's share of
    # the job's cost cap). The first attempt always runs; a guard retry gets what is left (see
    # LoopUnlearner). None: no limit.
    max_steps: int | None = None

    def the_recipe(self) -> Recipe:
        return self.recipe if self.recipe is not None else Recipe.infer(max(1, len(self.forget) + len(self.retain)))


class Unlearner:
    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **hparams: Any):
        # One schema for the API and the engine (worker/engine/hparams.py): unknown keys, types and
        # bounds are refused here exactly as at registration.
        self.hp: dict[str, Any] = check_hparams(self.name, hparams, defaults=type(self).defaults)
        self.validate()

    def validate(self) -> None:
        """Checks beyond the schema's (none for the built-ins); raise ConfigError naming the field."""

    def unlearn(
        self, model: nn.Module, task: UnlearningTask, runtime: Runtime, ctx: RunContext | None = None
    ) -> nn.Module:
        raise NotImplementedError


def register(cls: type[Unlearner]) -> type[Unlearner]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in SCHEMA:  # the built-ins' defaults come from the schema
        cls.defaults = default_hparams(cls.name)
    REGISTRY[cls.name] = cls
    return cls


def get_unlearner(name: str, **hparams: Any) -> Unlearner:
    if name not in REGISTRY:
        raise ConfigError(f"method: unknown unlearner {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name](**hparams)


@dataclass(frozen=True)
class LoopPlan:
    """A loop's resolved work: the recipe-relative defaults turned into numbers for one task."""

    steps: int | None  # optimizer steps (None: ``epochs`` full passes, the explicit-epochs mode)
    epochs: int
    lr: float
    batch_size: int
    optimizer: str
    weight_decay: float
    recipe_steps: int  # the original's optimizer steps (the unit of ``budget``)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "epochs": self.epochs if self.steps is None else None, "lr": self.lr,
                "batch_size": self.batch_size, "optimizer": self.optimizer, "weight_decay": self.weight_decay,
                "recipe_steps": self.recipe_steps}


class LoopUnlearner(Unlearner):
    """An unlearner that is a short run of the shared loop.

    **Work and step size are relative to the original's recipe** (``task.recipe``): the loop runs
    ``budget`` × (the original's optimizer steps) steps at ``lr_scale`` × (the original's learning
    rate), with the original's batch size, optimizer and weight decay, annealed by a cosine over
    the steps. So a model trained ten times longer, or on ten times the rows, gets ten times the
    steps and the same share of a retrain. Explicit ``steps`` (absolute), ``epochs`` (full passes
    over the method's batches, the old mode), ``lr``, ``batch_size``, ``optimizer`` and
    ``weight_decay`` override the recipe-relative values.

    Subclasses set ``defaults`` and override ``loss``; ``batches`` defaults to one shuffled pass
    over the retain set; ``prepare`` may compute masks or copies before the loop; ``after_backward``
    may edit gradients. During a run ``self.plan`` holds the resolved :class:`LoopPlan` and
    ``self.fraction()`` the share of the run done (for schedules inside a loss).

    Every loop runs inside the :class:`RetainGuard` (``max_retain_drop``, on by default for every
    method): it ends within the limit, or returns the last state that was, or the input model, and
    says which in ``last_run["guard"]``. A run that kept nothing within the limit was too hot for
    this model (a learning rate that transfers badly from where the defaults were chosen): it is
    run again from the input at a quarter of the learning rate, up to ``retries`` times (2 by
    default), paid from ``task.max_steps`` (the job's cost cap, from ``run_unlearning``): with the
    plan's steps, or with what the cap leaves if that is less but at least a quarter of them, else
    not at all (``last_run["retry_skipped"]`` says so); ``last_run`` lists the rates and steps of
    every attempt and their total.
    """

    defaults: ClassVar[dict[str, Any]] = {key: spec.default for key, spec in LOOP.items()}
    #: Stop early after this many consecutive guard checks outside the limit (None: never early;
    #: the end of the run still restores the last state within it).
    guard_patience: ClassVar[int | None] = 4
    #: What the last run did: the plan, steps done, cost share, the guard's outcome.
    last_run: dict[str, Any] | None = None
    plan: LoopPlan | None = None
    _steps_done: int = 0

    def resolve(self, task: UnlearningTask) -> LoopPlan:
        """Turn the recipe-relative hyperparameters into this task's numbers."""
        hp, recipe = self.hp, task.the_recipe()
        lr = float(hp["lr"]) if hp["lr"] is not None else float(hp["lr_scale"]) * recipe.lr
        batch = int(hp["batch_size"]) if hp["batch_size"] is not None else recipe.batch_size
        steps = self.planned_steps(recipe)
        # explicit epochs: full passes; otherwise an upper bound, the loop stops after ``steps``
        epochs = int(hp["epochs"]) if steps is None else 1_000_000
        return LoopPlan(steps=steps, epochs=epochs, lr=lr, batch_size=batch,
                        optimizer=hp["optimizer"] or recipe.optimizer,
                        weight_decay=float(hp["weight_decay"] if hp["weight_decay"] is not None
                                           else recipe.weight_decay),
                        recipe_steps=recipe.steps)

    def planned_steps(self, recipe: Recipe) -> int | None:
        """Optimizer steps of one attempt on ``recipe`` (None: explicit ``epochs``, counted as run)."""
        hp = self.hp
        if hp["epochs"] is not None:
            return None
        return int(hp["steps"]) if hp["steps"] is not None else recipe.steps_for(float(hp["budget"]))

    @property
    def batch_size(self) -> int:
        """The resolved batch size (during a run), else the explicit one or 128."""
        if self.plan is not None:
            return self.plan.batch_size
        return int(self.hp["batch_size"] or 128)

    def fraction(self) -> float:
        """Share of this run's steps (or epochs) done so far, in [0, 1]."""
        plan = self.plan
        if plan is None or plan.steps is None:
            return 0.0
        return min(1.0, self._steps_done / max(plan.steps, 1))

    def prepare(self, model: nn.Module, task: UnlearningTask, runtime: Runtime) -> None:
        """Called once before the loop (e.g. to compute a saliency mask)."""

    def batches(self, task: UnlearningTask, epoch: int, gen: torch.Generator) -> Iterable[Batch]:
        return task.retain.batches(self.batch_size, shuffle=True, generator=gen)

    def loss(self, model: nn.Module, x: torch.Tensor, batch: Batch, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def after_backward(self, model: nn.Module) -> None:
        """Edit gradients in place after backward (e.g. multiply by a mask)."""

    def finish(self) -> None:
        """Called after the loop, also on error or cancellation: drop per-run state (teachers, masks)."""

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The loop's optimizer from the plan (optimizer, lr, weight decay) and ``momentum``.

        Override to change it (masked methods move weight decay into the masked gradient).
        """
        plan = self.plan
        return make_optimizer(model.parameters(), plan.optimizer, plan.lr, self.hp["momentum"], plan.weight_decay)

    def has_after_backward(self) -> bool:
        return type(self).after_backward is not LoopUnlearner.after_backward

    def _count_step(self, model: nn.Module) -> None:
        self._steps_done += 1
        if self.has_after_backward():
            self.after_backward(model)

    def unlearn(
        self, model: nn.Module, task: UnlearningTask, runtime: Runtime, ctx: RunContext | None = None
    ) -> nn.Module:
        """Run the loop; if it ends with nothing within the guard (the input model back), run it
        again from the input at a quarter of the learning rate, up to ``retries`` times."""
        model = runtime.prepare(model)
        ctx = ctx or RunContext()
        base_plan = self.resolve(task)
        attempts = 1 + int(self.hp["retries"]) if self.hp.get("max_retain_drop") is not None else 1
        steps_total, tried, steps_tried, skipped, last_steps = 0, [], [], None, 0
        for attempt in range(attempts):
            plan = replace(base_plan, lr=base_plan.lr * RETRY_LR_FACTOR**attempt)
            if attempt and task.max_steps is not None:
                # a retry is paid from what the job's cost cap leaves: the plan's steps, or fewer
                # (at least a quarter of them; explicit epochs cannot be shortened: all or nothing)
                left = task.max_steps - steps_total
                need = base_plan.steps if base_plan.steps is not None else last_steps
                least = need if base_plan.steps is None else max(1, need // MIN_RETRY_SHARE)
                if left < least:
                    skipped = (f"a retry needs {least} more steps at least; the job's cost cap leaves "
                               f"{max(left, 0)}")
                    break
                if base_plan.steps is not None and left < need:
                    plan = replace(plan, steps=left)
            self.plan = plan
            part = ctx.sub(attempt / attempts, (attempt + 1) / attempts) if attempts > 1 else ctx
            model, run = self._attempt(model, task, runtime, part)
            steps_total += run["steps_done"]
            last_steps = run["steps_done"]
            tried.append(self.plan.lr)
            steps_tried.append(run["steps_done"])
            if run["guard"]["outcome"] != GuardOutcome.INPUT:
                break
        run.update(attempts=len(tried), lr_tried=tried, steps_tried=steps_tried, steps_total=steps_total,
                   cost_share=steps_total / max(base_plan.recipe_steps, 1))
        if skipped is not None:
            run["retry_skipped"] = skipped
        self.last_run = run
        if len(tried) < attempts:  # the attempts had slices of the progress bar; the work is done
            ctx.report(1.0)
        return model

    def _attempt(self, model: nn.Module, task: UnlearningTask, runtime: Runtime,
                 ctx: RunContext) -> tuple[nn.Module, dict[str, Any]]:
        """One run of the loop with ``self.plan``, inside the guard."""
        gen = seed_everything(task.seed)
        # ``prepare`` may poll ``self._ctx.check()`` (it runs before the loop reports any progress).
        self._task, self._ctx, self._steps_done = task, ctx, 0
        plan = self.plan
        try:
            guard = None
            if self.hp.get("max_retain_drop") is not None and len(task.retain):
                # measured before ``prepare``: a method that edits the model there (DEL's reset)
                # can still be undone
                guard = RetainGuard(model, task.retain, runtime, float(self.hp["max_retain_drop"]),
                                    seed=task.seed, reference=task.reference, patience=self.guard_patience,
                                    holdout=task.holdout)
            self.prepare(model, task, runtime)
            opt = self.make_optimizer(model)
            span = plan.steps if plan.steps is not None else plan.epochs
            sched = make_scheduler(opt, self.hp["schedule"], span, self.hp["eta_min_frac"])
            every = max(1, -(-(plan.steps or 40) // 4))  # about four checks per run, and one at the end
            stat = self.hp.get("stop", "budget")
            target = (task.forget_target or {}).get(stat) if stat != "budget" and len(task.forget) else None
            monitor = (TargetStop(model, task.forget, runtime, stat, target, guard, every) if target is not None
                       else guard)
            if target is not None and monitor.start <= target:
                monitor.reached_at = 0  # already where a retrain would be: nothing to do
            else:
                model = fit(
                    model, epochs=plan.epochs, batches=lambda e: self.batches(task, e, gen), loss_fn=self.loss,
                    optimizer=opt, scheduler=sched, runtime=runtime, ctx=ctx, after_backward=self._count_step,
                    monitor=monitor, monitor_every=monitor.every if target is not None else every,
                    max_steps=plan.steps,
                )
            run: dict[str, Any] = {**plan.to_dict(), "steps_done": self._steps_done}
            if target is not None:
                run["target"] = monitor.report()
            run["guard"] = guard.finish() if guard is not None else {"outcome": GuardOutcome.OFF}
            return model.eval(), run
        finally:
            self._task = self._ctx = None
            self.finish()


class TargetStop:
    """[Ours] Stops a loop once the forget rows' accuracy (``stat = "accuracy"``) or mean
    confidence in their label (``"confidence"``) is at or below ``target``, the estimate of a
    retrain's (worker/engine/targets.py): the budget becomes a ceiling and the forget set ends
    where a retrain would put it, not past it. Measures the forget rows ``TARGET_CHECKS`` times per
    run and passes every ``guard_every // every``-th call on to the guard, so the guard keeps its
    own rhythm."""

    def __init__(self, model: nn.Module, forget: View, runtime: Runtime, stat: str, target: float,
                 guard: RetainGuard | None, guard_every: int):
        self.model, self.forget, self.runtime, self.stat = model, forget, runtime, stat
        self.target, self.guard = target, guard
        self.every = max(1, guard_every * 4 // TARGET_CHECKS)
        self.ratio = max(1, guard_every // self.every)
        self.calls, self.reached_at = 0, None
        self.start = self.last = self.measure()

    def measure(self) -> float:
        if self.stat == "accuracy":
            return accuracy(self.model, self.forget, self.runtime)
        p = predict(self.model, self.forget, self.runtime).softmax(1)
        return p.gather(1, self.forget.y.cpu().view(-1, 1)).mean().item()

    def __call__(self) -> bool:
        self.calls += 1
        keep_going = True
        if self.guard is not None and self.calls % self.ratio == 0:
            keep_going = self.guard()
        self.last = self.measure()
        if self.last <= self.target:
            self.reached_at = self.calls * self.every
            return False
        return keep_going

    def report(self) -> dict[str, Any]:
        return {"stat": self.stat, "target": round(self.target, 4), "before": round(self.start, 4),
                "at_stop": round(self.last, 4), "reached_at_step": self.reached_at}


TARGET_CHECKS = 16  # forget-accuracy checks per run under ``stop: "target"``
PROBE_ROWS = 256  # rows per guard probe (retain, holdout)
RETRY_LR_FACTOR = 0.25  # a run that kept nothing within the guard is retried at this times its lr
MIN_RETRY_SHARE = 4  # a retry shortened by the job's cost cap runs at least 1/this of the plan's steps


class RetainGuard:
    """Keeps a loop within ``max_drop`` of accuracy, without stopping it from forgetting.

    [Ours] Users' first complaint about peer tools is defaults that wreck the model (ascent
    diverging, SCRUB's max-steps running away). Each check measures accuracy on a fixed seeded
    probe of ``probe_size`` retain rows and, when the task has one, on the held-out rows (the
    dataset's holdout split; never the test split, so the audit's test accuracy stays clean): on a
    memorizing model retain accuracy stays near 1 while generalization falls, which only held-out
    rows show. Each is compared with the ``reference`` model (the model as it entered RUM) or the
    input. A state within the limit on every probe is remembered. A state outside it is *not* a
    reason to stop: a transient dip that recovers (DEL's reset, the first steps of relabeling) is
    not damage. The loop stops early only after ``patience`` consecutive checks outside the limit
    (None: never). :meth:`finish` measures the final state: within the limit it is kept
    (``"within"``), else the last state that was within it is restored (``"restored"``) or, if none
    was, the input model (``"input"``). Turn it off with ``max_retain_drop: null`` (``"off"``).
    """

    def __init__(self, model: nn.Module, retain: View, runtime: Runtime, max_drop: float, *,
                 probe_size: int | None = None, seed: int = 0, reference: nn.Module | None = None,
                 patience: int | None = 4, holdout: View | None = None):
        self.model, self.runtime, self.max_drop, self.patience = model, runtime, max_drop, patience
        probe_size = probe_size or PROBE_ROWS
        self.probes = [_probe(retain, probe_size, seed)]
        if holdout is not None and len(holdout):
            self.probes.append(_probe(holdout, probe_size, seed + 1))
        start = self._measure()
        self.before = self._measure(reference) if reference is not None else start
        # the input is the fallback even if it already sits below the reference (an earlier bin)
        self.good, self.good_acc, self.good_check = self._state(), start, 0
        self.checks = self.outside = self.streak = 0
        self.worst = list(start)

    def _measure(self, model: nn.Module | None = None) -> list[float]:
        return [accuracy(model if model is not None else self.model, p, self.runtime) for p in self.probes]

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _within(self, acc: list[float]) -> bool:
        return all(b - a <= self.max_drop for b, a in zip(self.before, acc, strict=True))

    def check(self) -> bool:
        """Measure the model now; remember it if it is within the limit. True = within."""
        self.checks += 1
        acc = self._measure()
        self.worst = [min(w, a) for w, a in zip(self.worst, acc, strict=True)]
        if self._within(acc):
            self.good, self.good_acc, self.good_check, self.streak = self._state(), acc, self.checks, 0
            return True
        self.outside += 1
        self.streak += 1
        return False

    def __call__(self) -> bool:
        """One check during the loop; False = stop now (persistent damage)."""
        return self.check() or self.patience is None or self.streak < self.patience

    def finish(self) -> dict[str, Any]:
        """Measure the final state, restore the last good one if needed; what happened, as a dict."""
        acc = self._measure()
        self.worst = [min(w, a) for w, a in zip(self.worst, acc, strict=True)]
        if self._within(acc):
            outcome, final = GuardOutcome.WITHIN, acc
        else:
            self.model.load_state_dict(self.good)
            outcome = GuardOutcome.RESTORED if self.good_check > 0 else GuardOutcome.INPUT
            final = self.good_acc
        report = {"outcome": outcome, "max_drop": self.max_drop, "checks": self.checks + 1,
                  "checks_outside": self.outside + (outcome != GuardOutcome.WITHIN),
                  "retain_probe_reference": self.before[0], "retain_probe_worst": self.worst[0],
                  "retain_probe_after": final[0]}
        if len(self.probes) > 1:
            report.update(holdout_probe_reference=self.before[1], holdout_probe_worst=self.worst[1],
                          holdout_probe_after=final[1])
        return report


def _probe(view: View, size: int, seed: int) -> View:
    """A fixed seeded sample of ``size`` rows of ``view``."""
    g = torch.Generator().manual_seed(seed + 104729)
    pick = torch.randperm(len(view), generator=g)[:size]
    return View(view.split, view.index[pick.to(view.index.device)],
                view.labels[pick.to(view.labels.device)] if view.labels is not None else None)
