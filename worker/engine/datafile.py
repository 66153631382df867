"""The dataset file contract (docs/api.md#dataset-file): validation with numpy only, no torch.

An ``.npz`` holds ``x_train``, ``y_train``, ``x_test``, ``y_test``, optionally ``x_holdout`` and
``y_holdout`` and ``ids_train``. ``x_*`` are uint8 or float32 of shape (N, C, H, W) or (N, D);
``y_*`` are integer labels in [0, num_classes). Pickled arrays are refused (``allow_pickle`` is
never set), so object arrays cannot be smuggled in.

The API process validates uploads with :func:`read_dataset_file`; the worker loads the same file
through :mod:`worker.engine.data`, which calls this module, so there is one set of rules.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DatasetError, DatasetTooLarge

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Labels are class indices: a label past this is a mistake (or an attack on the class count), not
# a classifier.
MAX_CLASSES = 100_000
MAX_MEMBERS = 64
# C0 and C1 control characters, NUL included: no text a user gives us (ids, names) holds one, and
# PostgreSQL cannot store NUL in text at all.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
OPTIONAL_KEYS = ("x_holdout", "y_holdout", "ids_train")
SPLITS = ("train", "test", "holdout")
MAX_ID_LENGTH = 256


@dataclass(frozen=True)
class DatasetArrays:
    """Validated arrays of a dataset file. ``ids_train`` is always an array of ``str``."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    ids_train: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x["train"].shape[1:])

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(s for s in SPLITS if s in self.x)

    def summary(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "dtype": str(self.x["train"].dtype),
            **{f"n_{s}": int(len(self.y[s])) for s in self.splits},
        }


def inspect_npz(path: str | Path, *, max_bytes: int, label: str = "file") -> int:
    """Check a ``.npz`` from its zip directory and its ``.npy`` headers, before any array is
    inflated: at most ``max_bytes`` once inflated (the sum of the sizes the zip declares), every
    member a plain (not pickled) array whose header's byte size fits what the zip declares for it.
    Returns the inflated size. A member cannot inflate past its declared size: the zip reader stops
    there, so a lying member fails as truncated instead of filling memory."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS:
                raise DatasetError(f"{label}: {len(infos)} members; a dataset file has at most {MAX_MEMBERS}")
            total = sum(i.file_size for i in infos)
            if total > max_bytes:
                raise DatasetTooLarge(f"{label}: inflates to {total} bytes, over the limit of {max_bytes} bytes")
            for info in infos:
                key = info.filename.removesuffix(".npy")
                with zf.open(info) as f:
                    shape, dtype = _npy_header(f, key)
                if dtype.hasobject:
                    raise DatasetError(f"{key}: pickled (object) arrays are not accepted")
                declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if declared > info.file_size:
                    raise DatasetError(f"{key}: the array header declares {declared} bytes, "
                                       f"the archive holds {info.file_size}")
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError) as exc:
        raise DatasetError(f"{label}: not a readable .npz archive ({exc})") from exc
    return total


def _npy_header(f, key: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise DatasetError(f"{key}: .npy format version {version} is not accepted (1.0 or 2.0)")
    except DatasetError:
        raise
    except (ValueError, SyntaxError, TypeError) as exc:
        raise DatasetError(f"{key}: not a .npy array ({exc})") from exc
    return shape, dtype


def read_dataset_file(
    source: str | Path | BinaryIO, *, max_samples: int | None = None, num_classes: int | None = None
) -> DatasetArrays:
    """Read and validate a dataset ``.npz``; raise :class:`DatasetError` naming the problem.

    ``num_classes`` defaults to ``max(label) + 1`` over all splits.
    """
    try:
        with np.load(source, allow_pickle=False) as npz:
            keys = set(npz.files)
            arrays = {}
            for k in REQUIRED_KEYS + OPTIONAL_KEYS:
                if k in keys:
                    try:
                        arrays[k] = npz[k]
                    except ValueError as exc:  # object arrays need pickle: refused
                        raise DatasetError(f"{k}: pickled (object) arrays are not accepted") from exc
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"file: not a readable .npz archive ({exc})") from exc
    return validate_arrays(arrays, max_samples=max_samples, num_classes=num_classes)


def validate_arrays(
    arrays: dict[str, np.ndarray], *, max_samples: int | None = None, num_classes: int | None = None
) -> DatasetArrays:
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise DatasetError(f"missing required key(s): {', '.join(missing)}")
    if ("x_holdout" in arrays) != ("y_holdout" in arrays):
        raise DatasetError("x_holdout and y_holdout must be given together")

    xs: dict[str, np.ndarray] = {}
    ys: dict[str, np.ndarray] = {}
    for split in SPLITS:
        if f"x_{split}" not in arrays:
            continue
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype not in (np.uint8, np.float32):
            raise DatasetError(f"x_{split}: dtype must be uint8 or float32, got {x.dtype}")
        if x.ndim not in (2, 4):
            raise DatasetError(f"x_{split}: shape must be (N, C, H, W) or (N, D), got {x.shape}")
        if len(x) == 0:
            raise DatasetError(f"x_{split}: no samples")
        if x.dtype == np.float32 and not np.isfinite(x).all():
            raise DatasetError(f"x_{split}: contains NaN or infinite values")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"y_{split}: must be a 1-D integer array, got {y.dtype} {y.shape}")
        if len(y) != len(x):
            raise DatasetError(f"y_{split}: has {len(y)} labels for {len(x)} samples in x_{split}")
        if (y < 0).any():
            raise DatasetError(f"y_{split}: labels must be >= 0, found {int(y.min())}")
        xs[split], ys[split] = x, y.astype(np.int64)

    shape = xs["train"].shape[1:]
    for split, x in xs.items():
        if x.shape[1:] != shape:
            raise DatasetError(f"x_{split}: sample shape {x.shape[1:]} differs from x_train's {shape}")
        if x.dtype != xs["train"].dtype:
            raise DatasetError(f"x_{split}: dtype {x.dtype} differs from x_train's {xs['train'].dtype}")
    if max_samples is not None:
        total = sum(len(x) for x in xs.values())
        if total > max_samples:
            raise DatasetError(f"file: {total} samples exceed the limit of {max_samples}")

    top = max(int(y.max()) for y in ys.values())
    if top >= MAX_CLASSES:
        bad = next(s for s in ys if int(ys[s].max()) >= MAX_CLASSES)
        raise DatasetError(f"y_{bad}: label {int(ys[bad].max())} is past the largest class index "
                           f"accepted ({MAX_CLASSES - 1})")
    if num_classes is None:
        num_classes = top + 1
    elif top >= num_classes:
        bad = next(s for s in ys if int(ys[s].max()) >= num_classes)
        raise DatasetError(f"y_{bad}: label {int(ys[bad].max())} out of range [0, {num_classes})")
    if num_classes < 2:
        raise DatasetError("y_train: at least two classes are needed")

    n = len(ys["train"])
    if "ids_train" in arrays:
        ids = arrays["ids_train"]
        if ids.ndim != 1 or len(ids) != n:
            raise DatasetError(f"ids_train: must be 1-D with {n} entries, got shape {ids.shape}")
        if not (np.issubdtype(ids.dtype, np.integer) or ids.dtype.kind == "U"):
            raise DatasetError(f"ids_train: must hold strings or integers, got {ids.dtype}")
        ids = ids.astype(str)
        if (np.char.str_len(ids) == 0).any():
            raise DatasetError("ids_train: empty ids are not allowed")
        if int(np.char.str_len(ids).max()) > MAX_ID_LENGTH:
            raise DatasetError(f"ids_train: ids longer than {MAX_ID_LENGTH} characters")
        controls = [str(i) for i in ids if CONTROL_CHARACTERS.search(str(i))]
        if controls:
            raise DatasetError(f"ids_train: ids must not contain control characters, e.g. {controls[:3]}")
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1][:5].tolist()
            raise DatasetError(f"ids_train: duplicate ids, e.g. {dup}")
    else:
        ids = np.arange(n).astype(str)
    return DatasetArrays(x=xs, y=ys, ids_train=ids, num_classes=num_classes)


def blank_train_rows(source: str | Path | BinaryIO, rows) -> bytes:
    """The dataset file with the training rows ``rows`` blanked, as ``.npz`` bytes: their features
    zero and their labels 0, so the file no longer holds what those samples were. Every other array
    and row stays as it was (same ids, same order, same dtypes; compressed if the file was), so
    the file still passes :func:`read_dataset_file`. The service records which rows are blank and
    keeps them out of every set the engine is given (service/core/repo/redaction.py)."""
    try:
        with np.load(source, allow_pickle=False) as npz:
            compressed = any(i.compress_type != zipfile.ZIP_STORED for i in npz.zip.infolist())
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"file: not a readable .npz archive without pickles ({exc})") from exc
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise DatasetError(f"missing required key(s): {', '.join(missing)}")
    rows = np.asarray(sorted(set(int(r) for r in rows)), dtype=np.int64)
    n = len(arrays["y_train"])
    if len(rows) and (rows[0] < 0 or rows[-1] >= n):
        raise DatasetError(f"rows: past the {n} training rows")
    for k in ("x_train", "y_train"):
        arrays[k] = arrays[k].copy()
        arrays[k][rows] = 0
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()
