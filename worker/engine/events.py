"""Learning events (docs/proxies-and-metrics.md#learning-events): per-sample running means recorded
during training.

At every minibatch of the original training, the logits of the train-mode forward pass on that
batch give, per example, p_y, max_k p_k, Σ_k p_k log p_k (negative entropy) and 1[argmax = y].
The file keeps their running means over all appearances. Higher values mean *less* memorized;
the proxies module turns them around.

This module needs numpy only at import time (the API process reads events uploads); the
recorder uses tensor methods on what the training loop hands it.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DatasetError

EVENT_KEYS = ("confidence", "max_conf", "neg_entropy", "bi_acc")


@dataclass
class LearningEvents:
    """Running sums per training row; ``means()`` gives the per-sample averages."""

    sums: np.ndarray  # (n, 4) float64, columns EVENT_KEYS
    count: np.ndarray  # (n,) int64

    @classmethod
    def empty(cls, n: int) -> LearningEvents:
        return cls(np.zeros((n, len(EVENT_KEYS))), np.zeros(n, dtype=np.int64))

    def update(self, rows, logits, y) -> None:
        """Record one batch: ``rows`` are train-split row indices, ``logits`` the train-mode output."""
        logits = logits.detach().float()
        logp = logits.log_softmax(1)
        p = logp.exp()
        py = p.gather(1, y.view(-1, 1)).squeeze(1)
        negent = (p * logp).nan_to_num(0.0).sum(1)
        correct = (logits.argmax(1) == y).float()
        vals = np.stack([t.cpu().numpy() for t in (py, p.max(1).values, negent, correct)], axis=1)
        r = rows.cpu().numpy()
        np.add.at(self.sums, r, vals)
        np.add.at(self.count, r, 1)

    def means(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            m = self.sums / self.count[:, None]
        return {k: m[:, i].astype(np.float32) for i, k in enumerate(EVENT_KEYS)}

    def save(self, path: str | Path, ids: np.ndarray) -> None:
        np.savez(path, ids=np.asarray(ids).astype(str), count=self.count, **self.means())


def read_events(source: str | Path | BinaryIO, ids_train: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Read an events file; with ``ids_train`` the rows are reordered to the dataset's order.

    Raises :class:`DatasetError` naming the problem (missing keys, lengths, unknown ids, NaN).
    """
    try:
        with np.load(source, allow_pickle=False) as npz:
            missing = [k for k in ("ids", "count", *EVENT_KEYS) if k not in npz.files]
            if missing:
                raise DatasetError(f"events: missing key(s) {', '.join(missing)}")
            out = {k: npz[k] for k in ("ids", "count", *EVENT_KEYS)}
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"events: not a readable .npz archive without pickles ({exc})") from exc
    n = len(out["ids"])
    for k in ("count", *EVENT_KEYS):
        if out[k].shape != (n,):
            raise DatasetError(f"events.{k}: expected shape ({n},), got {out[k].shape}")
    ids = out["ids"].astype(str)
    if len(np.unique(ids)) != n:
        raise DatasetError("events.ids: duplicate ids")
    seen = out["count"] > 0
    for k in EVENT_KEYS:
        out[k] = out[k].astype(np.float32)
        if not np.isfinite(out[k][seen]).all():
            raise DatasetError(f"events.{k}: NaN or infinite values for recorded samples")
    if ids_train is not None:
        pos = {s: i for i, s in enumerate(ids)}
        ids_train = np.asarray(ids_train).astype(str)
        absent = [str(s) for s in ids_train if s not in pos]
        if absent:
            raise DatasetError(f"events.ids: {len(absent)} training id(s) have no events, e.g. {absent[:5]}")
        order = np.array([pos[s] for s in ids_train], dtype=np.int64)
        out = {k: v[order] for k, v in out.items()}
        ids = ids_train
    out["ids"] = ids
    return out
