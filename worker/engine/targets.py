"""How far to forget: an estimate of a retrain's accuracy on each forget row, without a retrain.

A model retrained without a row classifies it as it classifies an unseen row of the same
difficulty. The memorization proxy ranks the training rows by difficulty (higher = more
memorized); the original's confidence in the true label ranks the held-out rows the same way.
Matching the two ranks gives, for a forget row at proxy quantile q, the held-out rows at
difficulty quantile q: their accuracy under the original is the estimate. A window of
``window`` on each side of q smooths a small holdout split (the hardest rows of a 200-row
holdout are a handful).

Measured before any choice was made with it (retrain reference against this estimate in the high
bin of RUM's mixed forget sets, 1.0 against 1.0 in the low and mid bins everywhere): three digits
seeds 0.70 / 0.63 / 0.59 against 0.11 / 0.56 / 0.56 with no window; a Fashion-MNIST slice outside
the benchmark's rows 0.05 against 0.0. The unlearners use it as a stopping point
(``stop: "accuracy"`` or ``"confidence"``, worker/engine/unlearners/base.py), never as a label.
docs/unlearning.md#stopping-where-a-retrain-would-be has what it did on digits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data import View
from .runtime import Runtime, predict

WINDOW = 0.05  # half-width of the rank window, as a share of the holdout rows


def proxy_quantiles(values: np.ndarray) -> np.ndarray:
    """The quantile in (0, 1) of every training row's proxy value among all of them (ties averaged);
    rows without a value (NaN: learning events redacted) are left out and get NaN."""
    values = np.asarray(values, dtype=np.float64)
    have = ~np.isnan(values)
    if not have.all():
        out = np.full(len(values), np.nan)
        out[have] = proxy_quantiles(values[have])
        return out
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    # ties get the mean rank of their group, so equal proxies get equal estimates
    uniq, inverse = np.unique(values, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums[inverse] / counts[inverse] + 0.5) / max(len(values), 1)


def holdout_difficulty(model: nn.Module, holdout: View, runtime: Runtime) -> tuple[np.ndarray, np.ndarray]:
    """The original on the held-out rows, easiest first (by p of the true label): (correct 0/1, p_true)."""
    logits = predict(model, holdout, runtime)
    y = holdout.y.cpu()
    p_true = logits.softmax(1).gather(1, y.view(-1, 1)).squeeze(1).double()
    correct = (logits.argmax(1) == y).double()
    order = torch.argsort(-p_true, stable=True)
    return correct[order].numpy(), p_true[order].numpy()


def rank_matched(by_difficulty: np.ndarray, quantiles: np.ndarray, window: float = WINDOW) -> np.ndarray:
    """Per forget row (its proxy quantile): the mean of ``by_difficulty`` (a held-out statistic,
    easiest row first) over the held-out rows whose difficulty rank lies within ``window`` of the
    same quantile."""
    c = np.asarray(by_difficulty, dtype=np.float64)
    m = len(c)
    if m == 0:
        raise ValueError("holdout: no held-out rows to estimate from")
    cum = np.concatenate([[0.0], np.cumsum(c)])
    q = np.clip(np.asarray(quantiles, dtype=np.float64), 0.0, 1.0)
    lo = np.clip(np.floor((q - window) * m), 0, m - 1).astype(np.int64)
    hi = np.clip(np.ceil((q + window) * m), lo + 1, m).astype(np.int64)
    return (cum[hi] - cum[lo]) / (hi - lo)


__all__ = ["WINDOW", "holdout_difficulty", "proxy_quantiles", "rank_matched"]
