"""The ``refining`` stage: the forget, retain, excluded and test sets as the engine takes them.

RUM's refinement of the forget set into bins by memorization level happens inside the engine's
``run_unlearning`` (worker/engine/rum.py), which reports it in its result; this stage fixes the
sets it works on. The retain set is every training row neither in the forget set nor forgotten by
an earlier job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .loading import Loaded


@dataclass
class Sets:
    forget_rows: Any  # torch.LongTensor of training rows, sorted
    excluded_rows: Any  # torch.LongTensor: rows earlier jobs forgot (may be empty)
    forget: Any  # worker.engine.data.View over the forget rows
    retain: Any  # View over the retain rows
    test: Any  # View over the test split

    @property
    def excluded_or_none(self):
        """The excluded rows, or None when there are none (what the engine takes)."""
        return self.excluded_rows if len(self.excluded_rows) else None


def refine(loaded: Loaded) -> Sets:
    import torch

    data, n_train = loaded.inputs.data, loaded.inputs.n_train
    forget_rows = torch.tensor(loaded.record.forget_set.rows, dtype=torch.long)
    excluded_rows = torch.tensor(loaded.record.forget_set.excluded, dtype=torch.long)
    keep = torch.ones(n_train, dtype=torch.bool)
    keep[forget_rows] = False
    if len(excluded_rows):
        keep[excluded_rows] = False
    return Sets(forget_rows, excluded_rows, data.view("train", forget_rows),
                data.view("train", keep.nonzero().squeeze(1)), data.view("test"))


__all__ = ["Sets", "refine"]
