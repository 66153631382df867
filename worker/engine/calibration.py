"""Calibration: find the unlearning policy that works on *this* model, once, against a real retrain.

Defaults tuned on one dataset do not transfer to another size, model or recipe. A calibration
spends a few retrainings once per model to pick the policy that later deletion jobs use:

1. **Two calibration forget sets**, disjoint and alike: RUM's mixed construction (high, mid and
   low memorization by the proxy, ``forget_fraction`` of the training rows in all) drawn twice,
   each subset split between the two sets by alternating proxy rank (:func:`paired_mixed_sets`).
   Set A is searched on; set B only checks the winner.
2. **One retrain reference** on D \\ (A ∪ B) with the model's recipe (it never saw either set;
   see :class:`_Reference` for why one serves both).
3. **A search** with Optuna (seeded TPE sampler, median pruner on the ToW after the last step,
   before the attack is fitted; at most ``n_trials`` trials and never more than ``max_retrains``
   retrain-equivalents of planned work in all, the reference and the check included) over
   the policy space: ``rum`` = the cut points, the mid bin's choice between nothing and a light
   fine-tune, the high bin's method, and each one's step budget and learning rate (relative to
   the recipe; worker/engine/search_space.py), or ``plain`` = one method on the whole set. The
   objective is (ToW + ToW-MIA) / 2 against the reference on set A, less any work done past
   ``cost_cap`` (:func:`penalized`). A trial whose planned work exceeds ``cost_cap`` (share of a
   retrain per deletion job) is pruned before it runs. The first trials are the warm starts
   (``warm_starts`` there): the default pipeline, so the search never reports worse than the
   default on A, then every other high-bin method at its defaults.
4. **The check**: the winner and the default pipeline on set B against the same reference. Unless
   the winner beats the default there by ``check_margin`` = 0.5 / √|B| (the largest standard
   error of an accuracy measured on |B| rows: a smaller gain is within the check set's noise),
   the default is what is recommended (``chosen = "default"``), and the report says so. On
   digits (the tuning set) winners that gained 0.037 and 0.041 on a 72-row check set lost 0.07
   and 0.04 on the evaluated set (docs/benchmarks.md).

Trials go to ``storage`` (an SQLAlchemy URL for Optuna's RDB storage; None = in memory) under
``study_name``: a restarted calibration resumes its finished trials, and workers can share them.
The reference is recomputed on restart (training is seeded, so it is the same model).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import metrics
from .data import UnlearningData
from .errors import ConfigError
from .policies import JOB_COST_CAP, parse_policy
from .recipe import Recipe
from .refine import forget_subsets, proxy_array, row_tensor
from .rum import run_unlearning
from .runtime import RunContext, Runtime
from .search_space import (
    SPACES,
    as_params,
    default_policy,
    planned_cost,
    suggest_policy,
    warm_starts,
)
from .unlearners import UnlearningTask, get_unlearner

EVAL_ROWS = 1000  # retain and test rows scored per trial (fixed seeded subsets)


@dataclass
class CalibrationSettings:
    forget_fraction: float = 0.06  # size of each calibration forget set, share of the training rows
    n_trials: int = 16  # upper bound on Optuna trials
    cost_cap: float = JOB_COST_CAP  # largest work of one deletion job, share of a retrain
    max_retrains: float = 3.0  # whole calibration budget, in retrain-equivalents of planned work
    space: str = "rum"
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, prefix: str = "calibration") -> CalibrationSettings:
        d = dict(d or {})
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{prefix}: unknown field(s) {unknown}; known: {sorted(known)}")
        s = cls(**d)
        _check(s.forget_fraction, f"{prefix}.forget_fraction", 0.001, 0.3)
        _check(s.n_trials, f"{prefix}.n_trials", 1, 500, integer=True)
        _check(s.cost_cap, f"{prefix}.cost_cap", 0.001, 1.0)
        _check(s.max_retrains, f"{prefix}.max_retrains", 2.0, 50.0)
        _check(s.seed, f"{prefix}.seed", 0, 2**31 - 1, integer=True)
        if s.space not in SPACES:
            raise ConfigError(f"{prefix}.space: must be one of {list(SPACES)}, got {s.space!r}")
        return s


def _check(v: Any, name: str, low: float, high: float, *, integer: bool = False) -> None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high
    if ok and integer:
        ok = v == int(v)
    if not ok:
        raise ConfigError(f"{name}: must be {'an integer' if integer else 'a number'} in [{low:g}, {high:g}], "
                          f"got {v!r}")


@dataclass
class Score:
    """One policy on one calibration set against its reference."""

    score: float
    tow: float
    tow_mia: float
    cost_share: float  # planned work, share of the original's training steps
    seconds_share: float  # measured wall time, share of the reference's retrain
    audit: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CalibrationResult:
    policy: dict[str, Any]  # recommended engine policy (``rum.parse_policy`` input)
    chosen: str  # "calibrated" or "default" (the winner did not beat the default on the check set)
    winner: dict[str, Any]
    search: Score  # the winner on set A
    check: Score  # the winner on set B
    default_search: Score
    default_check: Score
    trials: list[dict[str, Any]]
    seconds: float
    retrain_seconds: float
    settings: CalibrationSettings
    recipe: Recipe
    sets: dict[str, int]
    reference: dict[str, dict[str, float]] = field(default_factory=dict)  # its audit on each set
    check_margin: float = 0.0  # what the winner had to gain over the default on the check set

    @property
    def cost_retrains(self) -> float:
        return self.seconds / self.retrain_seconds if self.retrain_seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "chosen": self.chosen, "winner": self.winner,
                "search": self.search.to_dict(), "check": self.check.to_dict(),
                "default_search": self.default_search.to_dict(), "default_check": self.default_check.to_dict(),
                "trials": self.trials, "seconds": self.seconds, "retrain_seconds": self.retrain_seconds,
                "cost_retrains": self.cost_retrains, "settings": self.settings.to_dict(),
                "recipe": self.recipe.to_dict(), "sets": self.sets, "reference": self.reference,
                "check_margin": self.check_margin}


# --------------------------------------------------------------------------- calibration sets


def paired_mixed_sets(
    proxy_values: np.ndarray, size: int, *, seed: int = 0, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint mixed forget sets of ``size`` rows each (train rows, sorted).

    RUM's high / mid / low subsets (:func:`worker.engine.refine.forget_subsets`) with twice the
    rows, each split by alternating proxy rank, so the two sets are alike. ``exclude`` rows
    (already forgotten) are never drawn.
    """
    values = proxy_array(proxy_values)
    available = ~np.isnan(values)  # a row without a value (learning events redacted) was forgotten already
    if exclude is not None and len(exclude):
        available[exclude.cpu().numpy()] = False
    rows = np.flatnonzero(available)
    n_per_bin = max(1, size // 3)
    if 6 * n_per_bin > len(rows):
        raise ConfigError(f"calibration.forget_fraction: two sets of {3 * n_per_bin} rows do not fit in "
                          f"{len(rows)} available training rows")
    subsets = forget_subsets(values[rows], 2 * n_per_bin, seed=seed)
    a, b = [], []
    for sub in subsets.values():
        local = sub.numpy()
        ranked = local[np.argsort(values[rows][local], kind="stable")]
        a.append(rows[ranked[0::2]])
        b.append(rows[ranked[1::2]])
    return (torch.from_numpy(np.sort(np.concatenate(a))).long(),
            torch.from_numpy(np.sort(np.concatenate(b))).long())


# --------------------------------------------------------------------------- scoring


class _Reference:
    """The retrain reference of a calibration: the recipe on D \\ (A ∪ B ∪ excluded), and the
    fixed seeded retain and test rows every trial is scored on.

    One reference serves both calibration sets: for set A it is a model that never saw A (as a
    retrain without A) and also never saw B, which is 6% of the rows by default; its retain and
    test accuracies move by far less than the differences the search tells apart, and it costs
    one retraining instead of two.
    """

    def __init__(self, model: nn.Module, data: UnlearningData, out_rows: torch.Tensor, recipe: Recipe,
                 runtime: Runtime, seed: int, ctx: RunContext) -> None:
        n = len(data.train)
        keep = torch.ones(n, dtype=torch.bool)
        keep[out_rows] = False
        retain_rows = keep.nonzero().squeeze(1)
        g = torch.Generator().manual_seed(seed + 31)
        pick = retain_rows[torch.randperm(len(retain_rows), generator=g)[:EVAL_ROWS]].sort().values
        self.retain = data.view("train", pick)
        test = data.view("test")
        self.test = test.head(min(len(test), EVAL_ROWS))
        t0 = time.perf_counter()
        task = UnlearningTask(data.view("train", out_rows), data.view("train", retain_rows), data.num_classes,
                              seed=seed, recipe=recipe.with_n_train(len(retain_rows)))
        self.model = get_unlearner("retrain").unlearn(copy.deepcopy(model), task, runtime, ctx).eval()
        self.seconds = time.perf_counter() - t0


class _Evaluator:
    """Scores policies on one calibration set against the reference."""

    def __init__(self, model: nn.Module, data: UnlearningData, forget_rows: torch.Tensor, proxy: np.ndarray,
                 recipe: Recipe, runtime: Runtime, excluded: torch.Tensor | None, seed: int,
                 reference: _Reference, cost_cap: float | None = None) -> None:
        self.model, self.data, self.forget_rows, self.proxy = model, data, forget_rows, proxy
        self.cost_cap = cost_cap  # a job's cap: guard retries stop at it (run_unlearning)
        self.recipe, self.runtime, self.excluded, self.seed = recipe, runtime, excluded, seed
        self.ref = reference
        self.forget = data.view("train", forget_rows)
        self.reference_audit = self.audit(reference.model)

    def audit(self, model: nn.Module, mia: bool = True) -> dict[str, float]:
        return metrics.audit(model, self.forget, self.ref.retain, self.ref.test, self.runtime, mia=mia)

    def score(self, policy: Mapping[str, Any], ctx: RunContext | None = None,
              after_step: Callable[[int, nn.Module], None] | None = None) -> Score:
        parsed = parse_policy(policy)
        t0 = time.perf_counter()
        result = run_unlearning(copy.deepcopy(self.model), self.data, self.forget_rows, self.proxy, parsed,
                                self.runtime, ctx, excluded_rows=self.excluded, seed=self.seed, recipe=self.recipe,
                                after_step=after_step, max_cost_share=self.cost_cap)
        seconds = time.perf_counter() - t0
        return self.score_model(result.model, result.cost_share, seconds)

    def partial_tow(self, model: nn.Module) -> float:
        """ToW alone (no attack fitted): the cheap intermediate value the pruner sees."""
        return metrics.tow(self.audit(model, mia=False), self.reference_audit)

    def score_model(self, model: nn.Module, cost_share: float, seconds: float) -> Score:
        audit = self.audit(model)
        tow, tow_mia = metrics.tow(audit, self.reference_audit), metrics.tow_mia(audit, self.reference_audit)
        return Score(score=(tow + tow_mia) / 2, tow=tow, tow_mia=tow_mia, cost_share=cost_share,
                     seconds_share=seconds / self.ref.seconds if self.ref.seconds > 0 else float("nan"),
                     audit=audit)


# --------------------------------------------------------------------------- the calibration


def calibrate(
    model: nn.Module,
    data: UnlearningData,
    recipe: Recipe,
    proxy_values: np.ndarray,
    runtime: Runtime,
    ctx: RunContext | None = None,
    *,
    settings: CalibrationSettings | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    excluded_rows: torch.Tensor | np.ndarray | None = None,
) -> CalibrationResult:
    """Calibrate the unlearning policy of ``model`` (see the module docstring); the model is not changed."""
    import optuna

    settings = settings or CalibrationSettings()
    ctx = ctx or RunContext(stage="calibration")
    started = time.perf_counter()
    n = len(data.train)
    proxy = proxy_array(proxy_values)
    if len(proxy) != n:
        raise ConfigError(f"proxy: expected {n} values (one per training row), got {len(proxy)}")
    excluded = row_tensor(excluded_rows, n, "excluded_rows") if excluded_rows is not None else None
    model = copy.deepcopy(model).eval()
    size = max(3, round(settings.forget_fraction * n))
    set_a, set_b = paired_mixed_sets(proxy, size, seed=settings.seed, exclude=excluded)

    out = torch.cat([set_a, set_b] + ([excluded] if excluded is not None and len(excluded) else []))
    reference = _Reference(model, data, torch.unique(out), recipe, runtime, settings.seed,
                           ctx.sub(0.0, 0.3, "reference"))
    evaluator_a = _Evaluator(model, data, set_a, proxy, recipe, runtime, excluded, settings.seed, reference,
                             settings.cost_cap)
    evaluator_b = _Evaluator(model, data, set_b, proxy, recipe, runtime, excluded, settings.seed, reference,
                             settings.cost_cap)
    retrain_seconds = reference.seconds

    default = default_policy(settings.space)
    search_ctx = ctx.sub(0.3, 0.9, "search")
    sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=min(6, settings.n_trials))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    if not study.trials:
        for start in warm_starts(settings.space)[: settings.n_trials]:
            study.enqueue_trial(as_params(start, settings), skip_if_exists=True)
    # The budget is work in optimizer steps (in retrain-equivalents: deterministic, whatever the
    # machine's load): the reference, every trial that ran (the steps it spent, guard retries
    # included, or its plan if it was pruned while running), and a reserve for the next trial and
    # the two check runs, none of which can spend more than ``cost_cap`` (a run stops retrying at
    # it: run_unlearning's ``max_cost_share``). The search stops before a trial that could overdraw
    # it. Wall time is measured and reported (``cost_retrains``); on small models the audits'
    # forward passes make it larger.
    def planned_spent(study) -> float:
        return 1.0 + sum(t.user_attrs.get("cost_share", t.user_attrs.get("planned_cost", 0.0))
                         for t in study.trials if t.user_attrs.get("ran"))

    def budget_left(study) -> bool:
        return planned_spent(study) + 3 * settings.cost_cap <= settings.max_retrains + 1e-9

    scores: dict[str, Score] = {}

    def objective(trial) -> float:
        ctx.check()
        policy = suggest_policy(trial, settings)  # the first (enqueued) trial is the default
        trial.set_user_attr("policy", policy)
        cost = planned_cost(policy, recipe)
        trial.set_user_attr("planned_cost", cost)
        if cost > settings.cost_cap + 1e-9:
            raise optuna.TrialPruned(f"planned cost {cost:.3f} > cap {settings.cost_cap}")
        trial.set_user_attr("ran", True)

        n_steps = len(policy["bins"]) if settings.space == "rum" else 1

        def after_step(j: int, m: nn.Module) -> None:
            # One intermediate value, after the last step, before the attack is fitted (the
            # costliest part of scoring a small model): the ToW alone. Not after the middle bin:
            # the forgetting happens in the high bin, so the ToW there says little about a trial.
            if j == n_steps - 1:
                trial.report(evaluator_a.partial_tow(m), j)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"after bin {j}")

        done = len([t for t in study.trials if t.state.is_finished()])
        part = search_ctx.sub(min(done / settings.n_trials, 1.0), min((done + 1) / settings.n_trials, 1.0))
        s = evaluator_a.score(policy, part, after_step)
        scores[_key(policy)] = s
        for key in ("tow", "tow_mia", "cost_share", "seconds_share"):
            trial.set_user_attr(key, getattr(s, key))
        trial.set_user_attr("acc", {k: round(v, 4) for k, v in s.audit.items()})
        return penalized(s, settings.cost_cap)

    def stop_when_spent(study, trial) -> None:
        finished = [t for t in study.trials if t.state.is_finished()]
        if len(finished) >= settings.n_trials or not budget_left(study):
            study.stop()

    finished = len([t for t in study.trials if t.state.is_finished()])
    if finished < settings.n_trials and budget_left(study):
        study.optimize(objective, n_trials=settings.n_trials - finished, callbacks=[stop_when_spent],
                       catch=(ConfigError,))

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ConfigError("calibration: no trial completed (every trial was pruned or failed)")
    best = max(complete, key=lambda t: (round(t.value, 4), -t.user_attrs.get("planned_cost", 0.0)))
    # (a trial's value is already penalized for work past the cap, see :func:`penalized`)
    winner = best.user_attrs["policy"]

    check_ctx = ctx.sub(0.9, 1.0, "check")
    default_search = scores.get(_key(default)) or evaluator_a.score(default)
    winner_search = scores.get(_key(winner)) or evaluator_a.score(winner)
    winner_check = evaluator_b.score(winner, check_ctx.sub(0, 0.5))
    default_check = evaluator_b.score(default, check_ctx.sub(0.5, 1.0))
    margin = check_margin(len(set_b))
    better = penalized(winner_check, settings.cost_cap) >= penalized(default_check, settings.cost_cap) + margin
    chosen = "calibrated" if better and _key(winner) != _key(default) else "default"
    ctx.report(1.0, "check")
    return CalibrationResult(
        policy=winner if chosen == "calibrated" else default, chosen=chosen, winner=winner,
        search=winner_search, check=winner_check, default_search=default_search, default_check=default_check,
        trials=[_trial_row(t) for t in study.trials], seconds=time.perf_counter() - started,
        retrain_seconds=retrain_seconds, settings=settings, recipe=recipe,
        sets={"search_size": len(set_a), "check_size": len(set_b)}, check_margin=margin,
        reference={"search": evaluator_a.reference_audit, "check": evaluator_b.reference_audit},
    )


def check_margin(n_check: int) -> float:
    """The gain over the default a winner needs on a check set of ``n_check`` rows: 0.5 / √n, the
    standard error of an accuracy on n rows at its largest (p = 0.5)."""
    return 0.5 / math.sqrt(max(1, n_check))


def penalized(s: Score, cap: float) -> float:
    """The search's objective: (ToW + ToW-MIA) / 2 less the work done past the cost cap. The plan
    is checked before a trial runs and guard retries stop at the cap (run_unlearning), so only a
    step whose work is not known before it runs (explicit ``epochs``, IAU's line search) can pass
    it; the search should then prefer one that does not."""
    return s.score - max(0.0, s.cost_share - cap)


def _key(policy: Mapping[str, Any]) -> str:
    return json.dumps(policy, sort_keys=True)


def _trial_row(t) -> dict[str, Any]:
    return {"number": t.number, "state": t.state.name.lower(), "score": t.value,
            "tow": t.user_attrs.get("tow"), "tow_mia": t.user_attrs.get("tow_mia"),
            "planned_cost": t.user_attrs.get("planned_cost"), "cost_share": t.user_attrs.get("cost_share"),
            "seconds_share": t.user_attrs.get("seconds_share"), "policy": t.user_attrs.get("policy"),
            "seconds": (t.duration.total_seconds() if t.duration is not None else None)}


__all__ = ["CalibrationResult", "CalibrationSettings", "Score", "calibrate", "default_policy", "paired_mixed_sets",
           "planned_cost", "suggest_policy", "warm_starts"]
