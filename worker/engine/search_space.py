"""The calibration's search space (worker/engine/calibration.py): which policies a trial may draw,
their planned cost, the warm starts, and the Optuna parameters that reproduce a given policy.

No model runs here: the unlearner registry is read only for each method's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .policies import default_rum_config
from .recipe import Recipe
from .unlearners import get_unlearner

if TYPE_CHECKING:
    from .calibration import CalibrationSettings

SPACES = ("rum", "plain")
# Methods the search may put in each RUM bin, low → high memorization. A retrain predicts low- and
# mid-memorization rows as the original does (RUM's finding; in every benchmark table of
# docs/benchmarks.md the reference keeps 99-100% of both bins on the tuning and the held-out sets), so
# the low bin is left as is and the mid bin only chooses between that and a light fine-tune:
# methods that push forget rows away there can only cost accuracy. All the forgetting happens in
# the high bin, which needs a method that acts on the forget rows. IAU and DEL cost a full pass per
# step or a long recovery and rarely fit a 10% cap: they stay selectable for ``plain``.
# A small space on purpose: with ~16 trials, TPE finds more in 8 dimensions than in 14.
BIN_METHODS = (
    ("none",),
    ("none", "finetune"),
    ("salun", "scrub", "random_label", "neggrad_plus", "finetune"),
)
PLAIN_METHODS = ("finetune", "neggrad_plus", "random_label", "salun", "scrub", "l1_sparse", "del", "iau")
# Which labels a relabeling method trains the forget rows toward: random ones (RUM's and SalUn's),
# or the class the model ranks next after the row's label (what a retrain tends to predict for a
# row it never saw; worker/engine/unlearners/random_label.py). Where a retrain still gets many
# high-memorization rows right (digits: 59-70%) runner-up labels over-forget; where it gets
# almost none right (Fashion-MNIST: 0-5%) they are what a retrain does. The calibration, which
# measures against a real retrain, chooses.
RELABELING = ("random_label", "salun")
LABEL_MODES = ("any", "runner_up")
LR_SCALE_RANGE = (0.02, 4.0)  # wide enough for every method's schema default (SCRUB's is 4)


def suggest_policy(trial, settings: CalibrationSettings) -> dict[str, Any]:
    """An engine policy drawn from the search space (Optuna's define-by-run API)."""
    cap = settings.cost_cap
    if settings.space == "plain":
        method = trial.suggest_categorical("method", PLAIN_METHODS)
        return {"method": method, "hparams": _suggest_hparams(trial, "", method, cap)}
    q1 = trial.suggest_float("q1", 0.1, 0.7)
    q2 = q1 + trial.suggest_float("q2_gap", 0.1, 0.9) * (0.99 - q1)
    bins = []
    for k in range(3):
        method = trial.suggest_categorical(f"bin{k}", BIN_METHODS[k])
        bins.append({"method": method, "hparams": _suggest_hparams(trial, f"bin{k}_", method, cap)})
    return {"method": "rum", "bins": bins, "quantiles": [round(q1, 4), round(q2, 4)]}


def _suggest_hparams(trial, prefix: str, method: str, cap: float) -> dict[str, Any]:
    if method == "none":
        return {}
    if method == "iau":
        return {"step_size": trial.suggest_float(f"{prefix}iau_step_size", 1e-3, 0.2, log=True)}
    hp: dict[str, Any] = {
        "budget": round(trial.suggest_float(f"{prefix}budget", cap / 40, cap, log=True), 5),
        "lr_scale": round(trial.suggest_float(f"{prefix}lr_scale", *LR_SCALE_RANGE, log=True), 5),
    }
    if method == "neggrad_plus":
        hp["alpha"] = round(trial.suggest_float(f"{prefix}alpha", 0.1, 0.99), 4)
    if method in RELABELING:
        mode = trial.suggest_categorical(f"{prefix}label_mode", LABEL_MODES)
        if mode != "any":  # the method's default: left out, so the default policy reads as it always did
            hp["label_mode"] = mode
    return hp


def planned_cost(policy: Mapping[str, Any], recipe: Recipe) -> float:
    """Planned work of a policy as a share of the original's training, before running it.

    Loop methods: their ``budget`` (a bin spends its budget whatever its size; an empty bin is
    skipped at run time, so this is an upper bound). IAU costs one pass over the training set per
    step. ``none`` is free. Masks and guard checks (forward passes) are not counted; the measured
    seconds are.
    """
    steps = policy["bins"] if policy.get("method") == "rum" else [policy]
    total = 0.0
    for step in steps:
        method, hp = step["method"], dict(step.get("hparams") or {})
        if method == "none":
            continue
        if method == "iau":
            total += int(hp.get("steps", 1)) / recipe.epochs
            continue
        unlearner = get_unlearner(method, **hp)
        total += float(unlearner.hp.get("budget") or 0.0)
    return total


def default_policy(space: str = "rum") -> dict[str, Any]:
    """The uncalibrated default in the form the search produces (the first trial of every study)."""
    if space == "plain":
        return {"method": "finetune", "hparams": {}}
    d = default_rum_config().to_dict()
    return {"method": "rum", "bins": d["bins"], "quantiles": d["quantiles"]}


def warm_starts(space: str = "rum") -> list[dict[str, Any]]:
    """The first trials of every study, before the sampler takes over: the default, then (``rum``)
    the default's shape with each other high-bin method at its own defaults, or (``plain``) each
    method; for ``rum`` also the default with the other choice of labels in the high bin (random
    labels where the default takes the runner-up class, and the reverse). Which method
    forgets best differs between models (on the held-out Fashion-MNIST rows SCRUB and random labels
    beat SalUn in the high bin; on digits SalUn wins), and a search of 16 trials that samples the
    method at random may never try the right one."""
    default = default_policy(space)
    if space == "plain":
        return [default] + [{"method": m, "hparams": {}} for m in PLAIN_METHODS if m != default["method"]]
    starts = [default]
    for method in BIN_METHODS[2]:
        if method != default["bins"][2]["method"]:
            bins = [dict(b) for b in default["bins"]]
            bins[2] = {"method": method, "hparams": {}}
            starts.append({**default, "bins": bins})
    if default["bins"][2]["method"] in RELABELING:  # and the default with the other choice of labels
        bins = [dict(b) for b in default["bins"]]
        hp = bins[2].get("hparams", {})
        other = next(m for m in LABEL_MODES if m != hp.get("label_mode", "any"))
        bins[2] = {"method": bins[2]["method"], "hparams": {**hp, "label_mode": other}}
        starts.append({**default, "bins": bins})
    return starts


def as_params(policy: Mapping[str, Any], settings: CalibrationSettings) -> dict[str, Any]:
    """The Optuna parameters that reproduce ``policy`` (to enqueue the warm starts)."""
    if settings.space == "plain":
        return {"method": policy["method"], **_hparam_params("", policy)}
    q1, q2 = policy["quantiles"]
    params: dict[str, Any] = {"q1": q1, "q2_gap": (q2 - q1) / (0.99 - q1)}
    for k, b in enumerate(policy["bins"]):
        params[f"bin{k}"] = b["method"]
        params.update(_hparam_params(f"bin{k}_", b))
    return params


def _hparam_params(prefix: str, step: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters :func:`_suggest_hparams` would draw for ``step`` (its hparams over the defaults)."""
    method = step["method"]
    if method == "none":
        return {}
    hp = get_unlearner(method, **step.get("hparams", {})).hp
    if method == "iau":
        return {f"{prefix}iau_step_size": hp["step_size"]}
    out = {f"{prefix}budget": hp["budget"], f"{prefix}lr_scale": hp["lr_scale"]}
    if method == "neggrad_plus":
        out[f"{prefix}alpha"] = hp["alpha"]
    if method in RELABELING:
        out[f"{prefix}label_mode"] = hp["label_mode"]
    return out


__all__ = ["BIN_METHODS", "LABEL_MODES", "LR_SCALE_RANGE", "PLAIN_METHODS", "RELABELING", "SPACES", "as_params",
           "default_policy", "planned_cost", "suggest_policy", "warm_starts"]
