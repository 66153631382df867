"""Datasets as in-memory tensors with sample ids, views by id, and seeded batch loaders.

Our datasets are small enough to live in memory (Fashion-MNIST is 55 MB as uint8), so a view is a
tensor of row indices and a loader is a seeded permutation of them: no ``DataLoader`` workers,
fully deterministic, and on CUDA the whole split is copied to the GPU once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .datafile import DatasetArrays, read_dataset_file
from .errors import DatasetError


@dataclass
class Split:
    """One split of a dataset: normalized float inputs and int64 labels on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> Split:
        if self.x.device == torch.device(device):
            return self
        pin = torch.device(device).type == "cuda" and self.x.device.type == "cpu"
        x, y = (self.x.pin_memory(), self.y.pin_memory()) if pin else (self.x, self.y)
        return Split(x.to(device, non_blocking=pin), y.to(device, non_blocking=pin))


@dataclass
class View:
    """Rows ``index`` of a split. ``labels`` overrides the split's labels (random-label unlearning)."""

    split: Split
    index: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def y(self) -> torch.Tensor:
        return self.labels if self.labels is not None else self.split.y[self.index.to(self.split.y.device)]

    @property
    def x(self) -> torch.Tensor:
        return self.split.x[self.index.to(self.split.x.device)]

    def to(self, device: torch.device | str) -> View:
        labels = self.labels.to(device) if self.labels is not None else None
        return View(self.split.to(device), self.index.to(device), labels)

    def head(self, n: int) -> View:
        return View(self.split, self.index[:n], self.labels[:n] if self.labels is not None else None)

    def with_labels(self, labels: torch.Tensor) -> View:
        return View(self.split, self.index, labels)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Yield batches; with ``shuffle`` the order comes from ``generator`` (seeded by the caller)."""
        n = len(self.index)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        device = self.split.x.device
        for start in range(0, stop, batch_size):
            pos = order[start : start + batch_size]
            rows = self.index[pos].to(device)
            y = self.labels[pos.to(self.labels.device)] if self.labels is not None else self.split.y[rows]
            yield Batch(self.split.x[rows], y, pos)


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    pos: torch.Tensor  # positions within the view (for per-sample recorders)
    forget: torch.Tensor | None = None  # bool per row when a batch mixes forget and retain rows


def concat(views: Sequence[View]) -> View:
    """One view over several views of the same split, keeping label overrides."""
    split = views[0].split
    if any(v.split is not split for v in views):
        raise ValueError("concat: views must share one split")
    index = torch.cat([v.index for v in views])
    if all(v.labels is None for v in views):
        return View(split, index)
    labels = torch.cat([v.y.to(index.device) for v in views])
    return View(split, index, labels)


@dataclass
class UnlearningData:
    """A dataset file loaded for the engine: splits, ids and the id → row map of the train split."""

    train: Split
    test: Split
    holdout: Split | None
    ids: np.ndarray
    num_classes: int
    mean: list[float] | None = None
    std: list[float] | None = None
    _row_of: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._row_of:
            self._row_of = {str(i): r for r, i in enumerate(self.ids)}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def rows(self, sample_ids: Sequence[str | int]) -> torch.Tensor:
        """Row indices of ``sample_ids`` in the train split; unknown ids raise :class:`DatasetError`."""
        missing = [s for s in sample_ids if str(s) not in self._row_of]
        if missing:
            raise DatasetError(f"sample_ids: {len(missing)} unknown id(s), e.g. {missing[:5]}")
        return torch.tensor([self._row_of[str(s)] for s in sample_ids], dtype=torch.long)

    def view(self, split: str = "train", rows: torch.Tensor | None = None) -> View:
        s = {"train": self.train, "test": self.test, "holdout": self.holdout}[split]
        if s is None:
            raise DatasetError(f"x_{split}: this dataset has no {split} split")
        return View(s, torch.arange(len(s)) if rows is None else rows)

    def forget_retain(self, forget_rows: torch.Tensor) -> tuple[View, View]:
        """Forget view (the given rows) and retain view (every other train row)."""
        keep = torch.ones(len(self.train), dtype=torch.bool)
        keep[forget_rows] = False
        return self.view("train", forget_rows), self.view("train", keep.nonzero().squeeze(1))

    def to(self, device: torch.device | str) -> UnlearningData:
        return UnlearningData(
            self.train.to(device), self.test.to(device),
            self.holdout.to(device) if self.holdout is not None else None,
            self.ids, self.num_classes, self.mean, self.std, self._row_of,
        )


def _to_float(x: np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if mean is None:
        return t
    channels = t.shape[1]
    m = torch.tensor(mean, dtype=torch.float32)
    s = torch.tensor(std, dtype=torch.float32)
    if len(m) not in (1, channels) or len(s) != len(m):
        raise DatasetError(f"mean/std: need 1 or {channels} values each, got {len(m)} and {len(s)}")
    if (s <= 0).any():
        raise DatasetError("std: every value must be > 0")
    shape = (1, -1) + (1,) * (t.ndim - 2) if t.ndim == 4 else (1, -1)
    if t.ndim == 2 and len(m) == 1:
        shape = (1, 1)
    return (t - m.view(shape)) / s.view(shape)


def from_arrays(
    arrays: DatasetArrays, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> UnlearningData:
    """Tensors from validated arrays. uint8 inputs are scaled to [0, 1], then (x - mean) / std."""
    if (mean is None) != (std is None):
        raise DatasetError("mean/std: give both or neither")

    def split(name: str) -> Split | None:
        if name not in arrays.x:
            return None
        return Split(_to_float(arrays.x[name], mean, std), torch.from_numpy(arrays.y[name]))

    return UnlearningData(
        train=split("train"), test=split("test"), holdout=split("holdout"), ids=arrays.ids_train,
        num_classes=arrays.num_classes, mean=list(mean) if mean else None, std=list(std) if std else None,
    )


def load_dataset(
    path: str | Path, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    num_classes: int | None = None,
) -> UnlearningData:
    """Load and validate a dataset file (see :mod:`worker.engine.datafile`)."""
    return from_arrays(read_dataset_file(path, num_classes=num_classes), mean, std)
