"""Learning events (docs/proxies-and-metrics.md#learning-events): per-sample running means recorded
during training.

At every minibatch of the original training, the logits of the train-mode forward pass on that
batch give, per example, p_y, max_k p_k, Σ_k p_k log p_k (negative entropy) and 1[argmax = y].
The file keeps their running means over all appearances. Higher values mean *less* memorized;
the proxies module turns them around.

This module needs numpy only at import time (the API process reads events uploads, and
retention blanks the rows of erased samples: :func:`redact_events`); the recorder uses tensor
methods on what the training loop hands it.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DatasetError

EVENT_KEYS = ("confidence", "max_conf", "neg_entropy", "bi_acc")
# The one marker of a *redacted* row (retention, service/core/repo/retention.py): ``count`` is
# REDACTED and the four means are NaN. The row keeps its id, so the file still names every
# training id; it carries nothing about the sample. A count of 0 means "never recorded".
REDACTED = -1


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


def _load(source: str | Path | BinaryIO) -> dict[str, np.ndarray]:
    """Every array of an events file (no pickles), in the file's order; the required keys present,
    one value per id each."""
    try:
        with np.load(source, allow_pickle=False) as npz:
            missing = [k for k in ("ids", "count", *EVENT_KEYS) if k not in npz.files]
            if missing:
                raise DatasetError(f"events: missing key(s) {', '.join(missing)}")
            arrays = {k: npz[k] for k in npz.files}
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"events: not a readable .npz archive without pickles ({exc})") from exc
    n = len(arrays["ids"])
    for k in ("count", *EVENT_KEYS):
        if arrays[k].shape != (n,):
            raise DatasetError(f"events.{k}: expected shape ({n},), got {arrays[k].shape}")
    return arrays


def redacted(count: np.ndarray) -> np.ndarray:
    """The rows a retention purge blanked (boolean mask)."""
    return np.asarray(count) == REDACTED


def read_events(source: str | Path | BinaryIO, ids_train: np.ndarray | None = None, *,
                redacted_ok: bool = False) -> dict[str, np.ndarray]:
    """Read an events file; with ``ids_train`` the rows are reordered to the dataset's order.

    Raises :class:`DatasetError` naming the problem (missing keys, lengths, unknown ids, NaN).
    Rows marked :data:`REDACTED` (NaN means) are accepted only with ``redacted_ok`` (the worker
    reading a stored file); an upload records every row, so a negative count is refused there.
    """
    out = {k: v for k, v in _load(source).items() if k in ("ids", "count", *EVENT_KEYS)}
    n = len(out["ids"])
    ids = out["ids"].astype(str)
    if len(np.unique(ids)) != n:
        raise DatasetError("events.ids: duplicate ids")
    blank = redacted(out["count"])
    if (out["count"] < 0).any() and not (redacted_ok and (out["count"][~blank] >= 0).all()):
        raise DatasetError(f"events.count: {int((out['count'] < 0).sum())} negative count(s); every row must "
                           "count how often it was recorded (0 or more)")
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


def redact_events(source: str | Path | BinaryIO, sample_ids) -> tuple[bytes, int, int]:
    """The events file with the rows of ``sample_ids`` blanked (:data:`REDACTED` count, NaN means),
    as ``.npz`` bytes, how many rows were newly blanked and how many are blank now. Every other
    array and row is kept as it was (same ids, same order, same dtypes but for a count that could
    not hold -1, or integer means that cannot hold NaN); ids the file lacks are ignored, rows
    already blank stay blank. Retention calls it (service/core/repo/retention.py)."""
    arrays = _load(source)
    ids = arrays["ids"].astype(str)
    rows = np.flatnonzero(np.isin(ids, np.asarray(list(sample_ids), dtype=str)))
    count = arrays["count"]
    if not np.issubdtype(count.dtype, np.signedinteger):
        count = count.astype(np.int64)
    rows = rows[count[rows] != REDACTED]
    count = count.copy()
    count[rows] = REDACTED
    arrays["count"] = count
    for k in EVENT_KEYS:
        v = arrays[k] if np.issubdtype(arrays[k].dtype, np.floating) else arrays[k].astype(np.float64)
        v = v.copy()
        v[rows] = np.nan
        arrays[k] = v
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue(), len(rows), int(redacted(count).sum())
