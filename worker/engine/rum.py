"""RUM, the Refined-Unlearning Meta-algorithm (docs/methods.md#rum), and the plain one-shot path.

One entry point, :func:`run_unlearning`, runs a *policy*:

* :class:`PlainConfig` — one unlearner on the whole forget set S, retain = D_train \\ (S ∪ excluded);
* :class:`RumConfig` — refine S into memorization bins (:func:`worker.engine.refine.refine`) and
  unlearn them in sequence low → high, each bin with its own unlearner (``none`` allowed) and
  hyperparameters. Bin k sees, as in the paper's code,
  ``R_k = D_train \\ (S_1 ∪ … ∪ S_k ∪ excluded)``: done bins and the current one are out, *later
  bins are still in*. ``excluded`` are rows the caller already removed from the model's training
  data (the service's cumulative forget set of earlier jobs); they never enter a retain set.

Rows whose *labels are wrong* (``corrective_rows``: the service passes the rows of requests whose
reason is ``mislabeled`` or ``poisoned``) are not refined: a retrain disagrees with every one of
them whatever its memorization, so they go first, as one step of their own (level
``corrective``, index -1) with the corrective policy (:func:`default_corrective_config`: random labels
taken from the model's runner-up class). The rest of S then runs through the policy.

The result carries the model and one :class:`StepReport` per unlearned bin (rows, retain size,
method, hyperparameters, seconds, proxy range). :func:`bin_audit` gives per-bin forget accuracy
and MIA of any model for the job report.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .data import UnlearningData, View
from .errors import ConfigError, EngineError
from .metrics import MAX_SHADOW, mia_feature, probabilities
from .policies import (  # noqa: F401  (re-exported: the policy half of the engine's API)
    CORRECTIVE_INDEX,
    DEFAULT_RUM_QUANTILES,
    DEFAULT_RUM_STEPS,
    JOB_COST_CAP,
    BinStep,
    PlainConfig,
    Policy,
    RumConfig,
    default_corrective_config,
    default_rum_config,
    parse_policy,
    rum_same_method,
)
from .recipe import Recipe
from .refine import (
    Bin,
    bin_by_cuts,
    check_thresholds,
    known,
    proxy_array,
    proxy_thresholds,
    row_tensor,
)
from .runtime import RunContext, Runtime, predict
from .targets import holdout_difficulty, proxy_quantiles, rank_matched
from .unlearners import Unlearner, UnlearningTask

# --------------------------------------------------------------------------- running a policy


@dataclass
class StepReport:
    """What one step did: a RUM bin, or the single step of a plain policy (bin index 0, level 'all')."""

    bin: Bin
    method: str
    hparams: dict[str, Any]
    n_retain: int
    seconds: float
    run: dict[str, Any] = field(default_factory=dict)  # what the unlearner reported (e.g. the guard)

    @property
    def n_forget(self) -> int:
        return len(self.bin)

    def to_dict(self) -> dict:
        return {**self.bin.to_dict(), "method": self.method, "hparams": dict(self.hparams),
                "n_retain": self.n_retain, "seconds": self.seconds, **self.run}


@dataclass
class UnlearningResult:
    model: nn.Module
    method: str  # "rum" or the plain unlearner's name
    config: dict
    steps: list[StepReport]
    seconds: float
    thresholds: list[float] | None = None  # RUM cut points used, on the proxy scale
    recipe: Recipe | None = None  # what the budgets were relative to

    @property
    def cost_share(self) -> float:
        """Planned work as a share of the original's training (sum over steps of their ``cost_share``)."""
        return float(sum(s.run.get("cost_share", 0.0) for s in self.steps))

    @property
    def bins(self) -> list[Bin]:
        """The unlearned bins (non-empty, low → high), e.g. for :func:`bin_audit`."""
        return [s.bin for s in self.steps]

    def summary(self) -> dict:
        return {"method": self.method, "config": self.config, "seconds": self.seconds,
                "thresholds": self.thresholds, "cost_share": self.cost_share,
                "recipe": self.recipe.to_dict() if self.recipe is not None else None,
                "steps": [s.to_dict() for s in self.steps]}


def _sync(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def _rows_except(n: int, *drop: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    for d in drop:
        if d is not None and len(d):
            keep[d] = False
    return keep.nonzero().squeeze(1)


def run_unlearning(
    model: nn.Module,
    data: UnlearningData,
    forget_rows: torch.Tensor | np.ndarray | Sequence[int],
    proxy_values: np.ndarray | torch.Tensor | None,
    policy: Policy,
    runtime: Runtime,
    ctx: RunContext | None = None,
    *,
    excluded_rows: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    seed: int = 0,
    recipe: Recipe | None = None,
    after_step: Callable[[int, nn.Module], None] | None = None,
    corrective_rows: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    corrective: PlainConfig | None = None,
    max_cost_share: float | None = JOB_COST_CAP,
) -> UnlearningResult:
    """Unlearn ``forget_rows`` (train-split rows) from ``model`` with ``policy``.

    ``proxy_values`` (one per training row, higher = more memorized) is required for RUM and
    only used for reporting otherwise. ``excluded_rows`` never enter a retain set (a row both in
``forget_rows`` and ``excluded_rows`` is still unlearned: dedupe upstream). Progress goes
    to ``ctx`` (one equal slice per step); cancellation is checked between steps and, through
    the unlearners' loop, once per batch. Bin k runs with seed ``seed + k`` (the corrective step
    with ``seed + 999``). ``recipe`` is how
    the original was trained (:mod:`worker.engine.recipe`); the unlearners' step budgets and
    learning rates are relative to it (None: the default recipe on the training set's size).
    ``after_step(j, model)`` is called after step j (calibration scores and prunes there).
    ``corrective_rows`` (a subset of ``forget_rows``; others are ignored) are rows whose label is
    wrong: they are unlearned first, in one step, with ``corrective`` (None:
    :func:`default_corrective_config`), and the policy gets the rest.
    ``max_cost_share`` caps the whole call's optimizer steps at that share of the original's (or
    at the policy's plan, if that is more): every step's first attempt runs, and a guard retry is
    paid from what the steps before it spent and the steps after it plan leave, shortened to fit
    down to a quarter of its plan, else skipped (None: no cap; retries can then cost up to
    ``retries`` times a step's plan again).
    """
    ctx = ctx or RunContext(stage="unlearning")
    n = len(data.train)
    policy.validate()
    forget = torch.unique(row_tensor(forget_rows, n))
    if len(forget) == 0:
        raise ConfigError("forget_rows: the forget set is empty")
    excluded = row_tensor(excluded_rows, n, "excluded_rows") if excluded_rows is not None else None
    values = proxy_array(proxy_values) if proxy_values is not None else None
    if values is not None and len(values) != n:
        raise ConfigError(f"proxy: expected {n} values (one per training row), got {len(values)}")
    if values is not None:
        known(values, forget.numpy())  # a row whose learning events were redacted is never unlearned again

    plan: list[tuple[Bin, Unlearner]] = []
    rest = forget
    config = policy.to_dict()
    if corrective_rows is not None:
        wrong = torch.unique(row_tensor(corrective_rows, n, "corrective_rows"))
        wrong = wrong[torch.isin(wrong, forget)]
        if len(wrong):
            fix = (corrective if corrective is not None else default_corrective_config()).validate()
            plan.append((_whole_bin(wrong, values, CORRECTIVE_INDEX, "corrective"), fix.unlearner()))
            rest = forget[~torch.isin(forget, wrong)]
            config["corrective"] = fix.to_dict()
    cuts = None
    if isinstance(policy, RumConfig) and (len(rest) or values is not None):
        if values is None:
            raise ConfigError("proxy: RUM needs proxy values to refine the forget set")
        k = len(policy.bins)
        cuts = (check_thresholds(policy.thresholds) if policy.thresholds is not None
                else proxy_thresholds(values, bins=k, quantiles=policy.quantiles))
        unlearners = policy.unlearners()
        if len(rest):
            plan += [(b, unlearners[b.index]) for b in bin_by_cuts(rest, values, cuts)]
    elif len(rest):
        plan.append((_whole_bin(rest, values), policy.unlearner()))

    recipe = recipe if recipe is not None else Recipe.infer(n)
    holdout = data.view("holdout") if data.holdout is not None and len(data.holdout.y) else None
    steps: list[StepReport] = []
    done: list[torch.Tensor] = []
    t_start = time.perf_counter()
    # Guarded unlearners compare retain accuracy with the model as it entered RUM, not with each
    # bin's starting point (else three bins could each spend the whole budget).
    guarded = len(plan) > 1 and any(u.hp.get("max_retain_drop") is not None for _, u in plan)
    reference = copy.deepcopy(model).eval() if guarded else None
    estimate = _retrain_estimate(model, holdout, values, forget, runtime,
                                 any(u.hp.get("stop", "budget") != "budget" for _, u in plan))
    planned = [_planned_steps(u, recipe) for _, u in plan]
    cap = None if max_cost_share is None else max(round(max_cost_share * recipe.steps), sum(planned))
    spent = 0
    for j, (b, unlearner) in enumerate(plan):
        ctx.check()
        done.append(b.rows)
        retain_rows = _rows_except(n, torch.cat(done), excluded)
        # a corrective step's rows have wrong labels: a retrain's estimate on them means nothing
        target = estimate(b.rows) if estimate is not None and b.index >= 0 else None
        task = UnlearningTask(forget=data.view("train", b.rows), retain=data.view("train", retain_rows),
                              num_classes=data.num_classes, seed=seed + (b.index if b.index >= 0 else 999),
                              reference=reference,
                              recipe=recipe, holdout=holdout, forget_target=target,
                              max_steps=None if cap is None else cap - spent - sum(planned[j + 1:]))
        sub = ctx.sub(j / len(plan), (j + 1) / len(plan), ctx.stage)
        _sync(runtime)
        t0 = time.perf_counter()
        model = unlearner.unlearn(model, task, runtime, sub)
        _sync(runtime)
        _check_finite(model, f"bins[{b.index}] ({unlearner.name})", task.retain, runtime)
        seconds = time.perf_counter() - t0
        sub.report(1.0)
        run = dict(getattr(unlearner, "last_run", None) or {})
        steps.append(StepReport(b, unlearner.name, dict(unlearner.hp), len(retain_rows), seconds, run))
        spent += round(float(run.get("cost_share", 0.0)) * recipe.steps)
        if after_step is not None:
            after_step(j, model)
    return UnlearningResult(model=model, method=policy.method, config=config, steps=steps,
                            seconds=time.perf_counter() - t_start, thresholds=cuts, recipe=recipe)


def _planned_steps(unlearner: Unlearner, recipe: Recipe) -> int:
    """Optimizer steps a step plans on ``recipe`` (0 where it is not known before it runs: explicit
    epochs, or a method outside the shared loop; what it spent still counts against the cap)."""
    planned = getattr(unlearner, "planned_steps", None)
    return (planned(recipe) or 0) if planned is not None else 0


def _retrain_estimate(model: nn.Module, holdout: View | None, values: np.ndarray | None, forget: torch.Tensor,
                      runtime: Runtime, wanted: bool) -> Callable[[torch.Tensor], dict[str, float]] | None:
    """rows ↦ the estimated accuracy and mean confidence of a retrain on them
    (worker/engine/targets.py), from the model as it entered; None without a holdout split or
    proxy values, or when no step stops at a target."""
    if not wanted or holdout is None or values is None:
        return None
    quantiles = proxy_quantiles(values)[forget.numpy()]
    correct, p_true = holdout_difficulty(model, holdout, runtime)
    acc, conf = rank_matched(correct, quantiles), rank_matched(p_true, quantiles)
    pos = {r: i for i, r in enumerate(forget.tolist())}

    def estimate(rows: torch.Tensor) -> dict[str, float]:
        idx = [pos[r] for r in rows.tolist()]
        return {"accuracy": float(acc[idx].mean()), "confidence": float(conf[idx].mean())}

    return estimate


def _check_finite(model: nn.Module, where: str, probe: View, runtime: Runtime) -> None:
    """Never hand back a model with NaN or infinite weights, or finite weights so large that its
    outputs overflow (a diverged ascent, an absurd learning rate with the retain guard off): the
    job fails with the reason instead of publishing it."""
    hint = "lower the learning rate or keep max_retain_drop on"
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise EngineError(f"{where}: unlearning produced non-finite weights ({name} has NaN or inf); {hint}")
    if len(probe) and not torch.isfinite(predict(model, probe.head(256), runtime)).all():
        raise EngineError(f"{where}: unlearning produced a model whose outputs are not finite; {hint}")


def _whole_bin(forget: torch.Tensor, values: np.ndarray | None, index: int = 0, level: str = "all") -> Bin:
    """One step's rows as a 'bin' (the plain path's whole forget set, or the corrective rows), with
    proxy stats when known."""
    v = known(values, forget.numpy()) if values is not None else np.full(1, np.nan)
    return Bin(index, level, forget, -np.inf, np.inf, float(v.min()), float(np.median(v)), float(v.mean()),
               float(v.max()))


# --------------------------------------------------------------------------- per-bin audit


def bin_audit(
    model: nn.Module,
    data: UnlearningData,
    bins: Sequence[Bin],
    runtime: Runtime,
    *,
    retain: View | None = None,
    mia: bool = True,
    max_shadow: int = MAX_SHADOW,
    seed: int = 0,
) -> list[dict]:
    """Forget accuracy and SVC MIA efficacy (confidence feature) of ``model`` on each bin.

    The attack is fitted once (shadow-in: the first retain rows; shadow-out: the first test rows,
    as :func:`worker.engine.metrics.svc_mia_efficacy`) and applied to every bin, so per-bin
    numbers are comparable with each other and with the whole-set audit
    (docs/proxies-and-metrics.md#membership-inference-mia). ``retain`` defaults to
    D_train \\ ∪ bins; pass D_train \\ (S ∪ excluded) for a service job.
    """
    n = len(data.train)
    if retain is None:
        retain = data.view("train", _rows_except(n, *[b.rows for b in bins]))
    test = data.view("test")
    clf = None
    if mia:
        from sklearn.svm import SVC

        m = min(len(test), len(retain), max_shadow)
        if m > 0:
            sin, sout = retain.head(m), test.head(m)
            x = np.concatenate([mia_feature(probabilities(model, sin, runtime), sin.y, "confidence"),
                                mia_feature(probabilities(model, sout, runtime), sout.y, "confidence")])
            y = np.concatenate([np.ones(m), np.zeros(m)])
            perm = np.random.default_rng(seed).permutation(len(y))
            clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x[perm], y[perm])
    out = []
    for b in bins:
        view = data.view("train", b.rows)
        row = {"index": b.index, "level": b.level, "n": len(b.rows)}
        if len(view) == 0:
            row.update(acc_forget=float("nan"), mia=float("nan"))
        else:
            p = probabilities(model, view, runtime)
            row["acc_forget"] = (p.argmax(1) == view.y.cpu()).float().mean().item()
            if mia:
                row["mia"] = float(1.0 - clf.predict(mia_feature(p, view.y, "confidence")).mean()) if clf else float(
                    "nan")
        out.append(row)
    return out


__all__ = [
    "DEFAULT_RUM_QUANTILES", "DEFAULT_RUM_STEPS", "BinStep", "PlainConfig", "Policy", "RumConfig", "StepReport",
    "UnlearningResult", "bin_audit", "default_rum_config", "parse_policy", "run_unlearning", "rum_same_method",
]
