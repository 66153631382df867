"""Validation of uploaded files and JSON fields, without torch and without ever unpickling.

Every check raises a :class:`~service.api.problems.Problem` naming the field. Files are validated
where they were staged on disk (see :mod:`service.core.artifacts`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.api.problems import Problem, invalid, unsupported
from worker.engine.datafile import CONTROL_CHARACTERS, DatasetArrays, inspect_npz, read_dataset_file
from worker.engine.errors import DatasetError, DatasetTooLarge
from worker.engine.events import read_events

# Extensions of formats that unpickle on load: refused by name, and by content below.
PICKLE_EXTENSIONS = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}
# A safetensors header is ~100 bytes per tensor: 8 MiB and 65,536 tensors are far past any
# classifier, and parse in milliseconds.
MAX_HEADER_BYTES = 8 << 20
MAX_TENSORS = 65_536
SAFETENSORS_KEYS = {"dtype", "shape", "data_offsets"}
# JSON form fields (architecture, policy, recipe, mean, std): small documents.
MAX_JSON_BYTES = 64 << 10
MAX_JSON_DEPTH = 32
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a .npz is a zip (the second: an empty one)
NAME_MAX = 200


def check_name(value: str | None, field: str = "name") -> str:
    value = (value or "").strip()
    if not value:
        raise invalid(field, "must not be empty")
    if len(value) > NAME_MAX:
        raise invalid(field, f"must be at most {NAME_MAX} characters")
    if CONTROL_CHARACTERS.search(value):
        raise invalid(field, "must not contain control characters")
    return value


def check_extension(field: str, filename: str | None, expected: str) -> None:
    name = (filename or "").lower()
    if name.endswith(PICKLE_EXTENSIONS):
        raise unsupported(field, f"{filename!r} looks like a pickle-based format, which is never loaded; "
                                 f"upload a {expected} file")
    if filename and not name.endswith(expected):
        raise unsupported(field, f"expected a {expected} file, got {filename!r}")


def _refuse_pickles(field: str, head: bytes, expected: str) -> None:
    if head[:1] == b"\x80":
        raise unsupported(field, f"the file is a Python pickle, which is never loaded; upload a {expected} file")
    if head[:4] == b"PK\x03\x04" and expected == ".safetensors":
        raise unsupported(field, "the file is a zip archive (torch.save format), which is never loaded; "
                                 "save the state dict with safetensors")


def _refuse_non_npz(field: str, path: Path) -> None:
    """Pickles (415), then anything that is not a zip: np.load would take a bare .npy (and hand back an
    array, not an archive) or call other bytes pickled data."""
    with path.open("rb") as f:
        head = f.read(4)
    _refuse_pickles(field, head, ".npz")
    if head not in ZIP_MAGIC:
        raise invalid(field, "not a .npz file (a .npz is a zip archive of .npy arrays, as np.savez writes)")


def parse_json_field(field: str, raw: str | None, *, required: bool = False) -> Any:
    """A JSON form field: at most MAX_JSON_BYTES, nested at most MAX_JSON_DEPTH deep, and no control
    character in any key or string (PostgreSQL's JSON cannot hold NUL)."""
    if raw is None or raw == "":
        if required:
            raise invalid(field, "is required")
        return None
    if len(raw) > MAX_JSON_BYTES:
        raise invalid(field, f"is {len(raw)} characters of JSON; at most {MAX_JSON_BYTES} are accepted")
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise invalid(field, f"nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise invalid(field, f"is not valid JSON ({exc.msg} at position {exc.pos})") from None
    check_json_text(value, field)
    return value


def json_depth(raw: str) -> int:
    """How deep brackets nest, counted before parsing (the parser recurses: 100,000 brackets
    would exhaust its stack). Brackets inside strings count too: an over-estimate is harmless."""
    depth = deepest = 0
    for char in raw:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def check_json_text(value: Any, field: str) -> None:
    """Refuse control characters in every key and string of a parsed JSON value, naming the path."""
    stack = [(field, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if CONTROL_CHARACTERS.search(item):
                raise invalid(path, "must not contain control characters")
        elif isinstance(item, dict):
            for key, sub in item.items():
                if CONTROL_CHARACTERS.search(key):
                    raise invalid(path, "keys must not contain control characters")
                stack.append((f"{path}.{key}", sub))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", sub) for i, sub in enumerate(item))


# --------------------------------------------------------------------------- datasets


def read_dataset(path: Path, field: str, max_samples: int, max_bytes: int) -> DatasetArrays:
    """Validate a dataset file: its headers first (nothing inflates past ``max_bytes``), then its
    arrays."""
    _refuse_non_npz(field, path)
    try:
        inspect_npz(path, max_bytes=max_bytes)
        return read_dataset_file(path, max_samples=max_samples)
    except DatasetError as exc:
        raise _dataset_problem(field, exc) from None


def _dataset_problem(field: str, exc: DatasetError) -> Problem:
    if isinstance(exc, DatasetTooLarge):
        return Problem(413, "Content too large", f"{field}: {str(exc).partition(': ')[2]}", kind="too-large",
                       field=field)
    msg = str(exc)
    key, sep, rest = msg.partition(": ")
    if sep and key.replace("_", "").replace(".", "").isalnum() and key != field:
        return invalid(f"{field}.{key}", rest)
    return invalid(field, rest if sep and key == field else msg)


def check_normalization(mean: Any, std: Any, input_shape: tuple[int, ...]) -> tuple[list[float] | None, ...]:
    """``mean``/``std``: lists of per-channel floats (one value per channel, or one for all)."""
    if (mean is None) != (std is None):
        raise invalid("std" if std is None else "mean", "mean and std must be given together")
    if mean is None:
        return None, None
    channels = input_shape[0] if len(input_shape) == 3 else 1
    out = []
    for field, vals in (("mean", mean), ("std", std)):
        if isinstance(vals, int | float) and not isinstance(vals, bool):
            vals = [vals]
        if not isinstance(vals, list) or not vals or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in vals):
            raise invalid(field, "must be a JSON list of finite numbers")
        if len(vals) not in (1, channels):
            need = "1 value" if channels == 1 else f"1 or {channels} values (one per channel)"
            raise invalid(field, f"needs {need}, got {len(vals)}")
        out.append([float(v) for v in vals])
    if any(v <= 0 for v in out[1]):
        raise invalid("std", "values must be > 0")
    return out[0], out[1]


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class WeightsSummary:
    tensors: int
    parameters: int
    dtypes: list[str]


def read_safetensors_header(path: Path, field: str = "weights") -> WeightsSummary:
    """Check a ``.safetensors`` file from its header alone: the header is JSON, every tensor has a
    known dtype, a shape and offsets matching its byte size, and the tensors tile the data area."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        _refuse_pickles(field, head, ".safetensors")
        if len(head) < 8:
            raise invalid(field, "not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise invalid(field, f"not a safetensors file (header length {n} does not fit a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            raise invalid(field, "not a safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise invalid(field, "not a safetensors file (the header is not a JSON object)")
    if len(header) > MAX_TENSORS + 1:
        raise invalid(field, f"{len(header) - 1} tensors; at most {MAX_TENSORS} are accepted")
    data_size = size - 8 - n
    spans, params, dtypes = [], 0, set()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != SAFETENSORS_KEYS:
            raise invalid(field, f"tensor {name!r}: needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise invalid(field, f"tensor {name!r}: unknown dtype {dtype!r}")
        # type() is int, not isinstance: JSON's true and false are ints to Python
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise invalid(field, f"tensor {name!r}: shape must be a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise invalid(field, f"tensor {name!r}: data_offsets out of the file's data ({data_size} bytes)")
        count = math.prod(shape)
        if offsets[1] - offsets[0] != count * SAFETENSORS_DTYPES[dtype]:
            raise invalid(field, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}")
        spans.append(tuple(offsets))
        params += count
        dtypes.add(dtype)
    if not spans:
        raise invalid(field, "the safetensors file holds no tensor")
    pos = 0
    for start, end in sorted(spans):
        if start != pos:
            raise invalid(field, "tensor data overlaps or leaves holes (not a valid safetensors file)")
        pos = end
    if pos != data_size:
        raise invalid(field, f"{data_size - pos} trailing bytes after the last tensor")
    return WeightsSummary(tensors=len(spans), parameters=params, dtypes=sorted(dtypes))


def check_architecture(spec: Any) -> dict:
    """The architecture spec's shape: ``{"name": str, "kwargs": {...}}``. Whether the name is
    registered and the weights fit it is checked by the registration task (it needs torch)."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        raise invalid("architecture", 'must be a JSON object like {"name": "small_cnn", "kwargs": {}}')
    unknown = sorted(set(spec) - {"name", "kwargs"})
    if unknown:
        raise invalid("architecture", f"unknown field(s) {unknown}; expected name and kwargs")
    if not isinstance(spec.get("name"), str) or not spec["name"].strip():
        raise invalid("architecture.name", "must be a non-empty string")
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise invalid("architecture.kwargs", "must be a JSON object")
    return {"name": spec["name"].strip(), "kwargs": kwargs}


def check_events(path: Path, ids_train: np.ndarray, max_bytes: int, field: str = "events") -> None:
    _refuse_non_npz(field, path)
    try:
        inspect_npz(path, max_bytes=max_bytes, label=field)
        read_events(path, ids_train)
    except DatasetTooLarge as exc:
        raise _dataset_problem(field, exc) from None
    except DatasetError as exc:
        msg = str(exc)
        key, sep, rest = msg.partition(": ")
        raise (invalid(key, rest) if sep and key.startswith("events") else invalid(field, msg)) from None
