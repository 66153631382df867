"""The ``auditing`` stage: how the new version compares with its base (and, when the policy asks,
with a model retrained from scratch without the forget set): accuracy on the forget, retain and
test sets, membership inference, ToW, the per-bin audit, per-class accuracy, the true-label
confidences, and the guardrails that decide whether ``production`` moves."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .loading import Loaded
from .progress import Progress
from .refining import Sets
from .unlearning import Unlearned

MAX_CONFIDENCE_TEST = 2000  # test rows whose confidence goes in the report (a fixed-seed subsample)
METRIC_KEYS = ("acc_forget", "acc_retain", "acc_test", "mia", "mia_entropy")


@dataclass
class AuditResult:
    before: dict[str, float]  # METRIC_KEYS of the base version
    after: dict[str, float]  # ... of the new version
    reference: dict[str, float] | None  # ... of the retrained reference (policy audit.reference = retrain)
    tow: float | None  # ToW of after (and of before) against the reference; ToW on the MIA
    tow_mia: float | None
    tow_before: float | None
    bins_before: list[dict]  # the engine's per-bin audit of the base and new versions
    bins_after: list[dict]
    per_class: dict[str, Any]  # {"classes", "before", "after", "reference"}: test accuracy per class
    confidence: dict[str, list[float]]  # true-label confidence: forget rows and a test subsample
    guardrails: dict[str, Any]  # the limits, the drops, and "passed"

    @property
    def passed(self) -> bool:
        return bool(self.guardrails["passed"])

    def metrics(self) -> dict[str, Any]:
        """The comparison as the version's ``metrics`` keep it."""
        return {"before": self.before, "after": self.after, "reference": self.reference, "tow": self.tow,
                "tow_mia": self.tow_mia, "tow_before": self.tow_before}


def audit(progress: Progress, loaded: Loaded, sets: Sets, unlearned: Unlearned) -> AuditResult:
    from worker.engine import metrics, rum
    from worker.engine.unlearners import UnlearningTask, get_unlearner

    policy, inputs = loaded.policy, loaded.inputs
    base, after, runtime, data = inputs.base, unlearned.model, inputs.runtime, inputs.data
    reference_model = None
    if policy.audit.reference == "retrain":
        task = UnlearningTask(forget=sets.forget, retain=sets.retain, num_classes=data.num_classes,
                              seed=policy.seed, recipe=inputs.recipe)
        reference_model = get_unlearner("retrain").unlearn(copy.deepcopy(base), task, runtime,
                                                           progress.run_context(0.0, 0.8)).eval()
        progress.check()
    scores: dict[str, dict | None] = {}
    for key, model in (("before", base), ("after", after), ("reference", reference_model)):
        if model is None:
            scores[key] = None
            continue
        measured = metrics.audit(model, sets.forget, sets.retain, sets.test, runtime)
        scores[key] = {k: measured[k] for k in METRIC_KEYS}
        progress.check()
    reference = scores["reference"]

    bins = unlearned.result.bins
    bins_before = rum.bin_audit(base, data, bins, runtime, retain=sets.retain)
    bins_after = rum.bin_audit(after, data, bins, runtime, retain=sets.retain)
    progress.check()

    return AuditResult(
        before=scores["before"], after=scores["after"], reference=reference,
        tow=metrics.tow(scores["after"], reference) if reference else None,
        tow_mia=metrics.tow_mia(scores["after"], reference) if reference else None,
        tow_before=metrics.tow(scores["before"], reference) if reference else None,
        bins_before=bins_before, bins_after=bins_after,
        per_class=_per_class(data.num_classes, sets, runtime, base, after, reference_model),
        confidence=_confidences(sets, runtime, base, after),
        guardrails=_guardrails(policy, scores["before"], scores["after"]))


def _per_class(num_classes: int, sets: Sets, runtime, base, after, reference_model) -> dict[str, Any]:
    from worker.engine.runtime import predict

    classes = list(range(num_classes))
    y_test = sets.test.y.cpu()

    def accuracy_per_class(model) -> list[float | None]:
        predicted = predict(model, sets.test, runtime).argmax(1)
        return [float((predicted[y_test == c] == c).float().mean()) if bool((y_test == c).any()) else None
                for c in classes]

    return {"classes": classes, "before": accuracy_per_class(base), "after": accuracy_per_class(after),
            "reference": accuracy_per_class(reference_model) if reference_model is not None else None}


def _confidences(sets: Sets, runtime, base, after) -> dict[str, list[float]]:
    import torch

    from worker.engine import metrics
    from worker.engine.data import View

    n_test = len(sets.test)
    test_sample = sets.test
    if n_test > MAX_CONFIDENCE_TEST:
        pick = np.sort(np.random.default_rng(0).choice(n_test, MAX_CONFIDENCE_TEST, replace=False))
        test_sample = View(sets.test.split, sets.test.index[torch.from_numpy(pick)])

    def confidence(model, view) -> list[float]:
        probabilities = metrics.probabilities(model, view, runtime)
        return probabilities.gather(1, view.y.cpu().view(-1, 1)).squeeze(1).double().tolist()

    return {"forget_before": confidence(base, sets.forget), "forget_after": confidence(after, sets.forget),
            "test_before": confidence(base, test_sample), "test_after": confidence(after, test_sample)}


def _guardrails(policy, before: dict, after: dict) -> dict[str, Any]:
    limits = policy.guardrails
    test_drop = before["acc_test"] - after["acc_test"]
    retain_drop = before["acc_retain"] - after["acc_retain"]
    passed = _within(test_drop, limits.max_test_drop) and _within(retain_drop, limits.max_retain_drop)
    return {"max_test_drop": limits.max_test_drop, "max_retain_drop": limits.max_retain_drop,
            "test_drop": test_drop, "retain_drop": retain_drop, "passed": passed}


def _within(drop: float, limit: float) -> bool:
    return not math.isfinite(drop) or drop <= limit + 1e-12


__all__ = ["MAX_CONFIDENCE_TEST", "AuditResult", "audit"]
