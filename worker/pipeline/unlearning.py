"""The ``unlearning`` stage: the engine's RUM pipeline (or a plain unlearner) on a copy of the base
version's weights, with the job's policy, proxy values, excluded rows, seed and recipe. Rows of
requests whose reason says their labels are wrong (the policy's ``corrective.reasons``) go to the
policy's corrective step first (worker/engine/rum.py)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ..proxy_cache import CachedProxy
from .loading import Loaded
from .progress import Progress
from .refining import Sets


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
    return Unlearned(result, result.model.eval())


__all__ = ["Unlearned", "unlearn"]
