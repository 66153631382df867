"""The ``unlearning`` stage: the engine's RUM pipeline (or a plain unlearner) on a copy of the base
version's weights, with the job's policy, proxy values, excluded rows, seed and recipe. Rows of
requests whose reason says their labels are wrong (the policy's ``corrective.reasons``) go to the
policy's corrective step first (worker/engine/rum.py).

A run in which the accuracy guard undid every step that had work to do (each came back as its
input model) changed nothing: publishing it would complete the requests, and issue their erasure
certificates, for a model that is the one they asked to change. The stage raises
:class:`NothingForgotten` instead, and the job fails as any failed job does (its requests go back
to pending, and fail once they ran out of attempts), with a message that says what to do."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from worker.engine.catalog import GuardOutcome

from ..proxy_cache import CachedProxy
from .loading import Loaded
from .progress import Progress
from .refining import Sets


class NothingForgotten(RuntimeError):
    """Every step of the run that had a method to apply was undone by the accuracy guard."""


def undone_steps(result) -> list | None:
    """The steps the guard undid, when it undid every step that ran a method (None otherwise; also
    None when no step ran one: a policy of ``none``, or rows only in bins the policy leaves as they
    are, changes nothing by design)."""
    ran = [s for s in result.steps if s.method != "none" and s.run.get("guard")]
    if ran and all(s.run["guard"].get("outcome") == GuardOutcome.INPUT for s in ran):
        return ran
    return None


@dataclass
class Unlearned:
    result: Any  # worker.engine.rum's result: method, thresholds, bins and their steps
    model: Any  # the new weights (torch module, in eval mode)


def unlearn(progress: Progress, loaded: Loaded, proxy: CachedProxy, sets: Sets) -> Unlearned:
    from worker.engine import rum

    inputs = loaded.inputs
    corrective = loaded.policy.corrective
    wrong = loaded.record.corrective_rows(list(corrective.reasons))
    result = rum.run_unlearning(copy.deepcopy(inputs.base), inputs.data, sets.forget_rows, proxy.values,
                                loaded.engine_policy, inputs.runtime, progress.run_context(),
                                excluded_rows=sets.excluded_or_none, seed=loaded.policy.seed, recipe=inputs.recipe,
                                corrective_rows=wrong or None,
                                corrective=rum.PlainConfig(**corrective.engine_config()) if wrong else None,
                                max_cost_share=loaded.policy.calibration.cost_cap)
    undone = undone_steps(result)
    if undone is not None:
        steps = "; ".join(f"{s.bin.level} ({s.n_forget} rows): {s.method}, lr tried "
                          + ", ".join(f"{lr:.3g}" for lr in s.run.get("lr_tried") or []) for s in undone)
        raise NothingForgotten(
            f"nothing was forgotten: the accuracy guard undid every step ({steps}); each rate tried cost more "
            "retain or held-out accuracy than the policy allows, so the model is unchanged and no version is "
            f"published. Calibrate the model (POST /v1/models/{loaded.record.model.id}/calibrations) or give "
            "its policy a smaller lr_scale or budget")
    return Unlearned(result, result.model.eval())


__all__ = ["NothingForgotten", "Unlearned", "undone_steps", "unlearn"]
