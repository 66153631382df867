"""Dataset file validation, normalization, views by id and deterministic loaders."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch

from worker.engine.data import concat, from_arrays, load_dataset
from worker.engine.datafile import blank_train_rows, read_dataset_file, validate_arrays
from worker.engine.errors import DatasetError


def _npz(arrays: dict, **kw) -> io.BytesIO:
    buf = io.BytesIO()
    np.savez(buf, **arrays, **kw)
    buf.seek(0)
    return buf


def test_round_trip_through_file(digits_raw, tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, **digits_raw)
    data = load_dataset(path, mean=[0.5], std=[0.5])
    assert data.num_classes == 10
    assert data.input_shape == (1, 8, 8)
    assert len(data.train) == 1197 and len(data.test) == 400 and len(data.holdout) == 200
    assert data.train.x.dtype == torch.float32
    # uint8 → [0,1] → (x − 0.5) / 0.5 ∈ [−1, 1]
    assert data.train.x.min() >= -1.0 and data.train.x.max() <= 1.0 and data.train.x.min() < -0.99
    assert list(data.ids[:2]) == list(digits_raw["ids_train"][:2])


def test_default_ids_are_row_numbers(digits_raw):
    arrays = {k: v for k, v in digits_raw.items() if k != "ids_train"}
    data = from_arrays(validate_arrays(arrays))
    assert data.ids[0] == "0" and data.ids[-1] == str(len(data.train) - 1)
    assert data.rows(["5", 7]).tolist() == [5, 7]


def test_integer_ids_are_strings(digits_raw):
    arrays = dict(digits_raw, ids_train=np.arange(1000, 1000 + len(digits_raw["y_train"])))
    data = from_arrays(validate_arrays(arrays))
    assert data.rows([1003]).tolist() == [3]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("y_test"), "missing required key(s): y_test"),
        (lambda a: a.update(x_train=a["x_train"].astype(np.float64)), "x_train: dtype must be uint8 or float32"),
        (lambda a: a.update(x_test=a["x_test"][:, 0]), "x_test: shape must be"),
        (lambda a: a.update(y_train=a["y_train"][:-1]), "y_train: has 1196 labels for 1197 samples"),
        (lambda a: a.update(y_train=a["y_train"].astype(np.float32)), "y_train: must be a 1-D integer array"),
        (lambda a: a.update(y_test=np.where(np.arange(400) == 3, -1, a["y_test"])), "y_test: labels must be >= 0"),
        (lambda a: a.update(ids_train=np.where(np.arange(1197) == 1, a["ids_train"][0], a["ids_train"])),
         "ids_train: duplicate ids"),
        (lambda a: a.update(ids_train=a["ids_train"][:5]), "ids_train: must be 1-D with 1197 entries"),
        (lambda a: a.pop("y_holdout"), "x_holdout and y_holdout must be given together"),
        (lambda a: a.update(x_holdout=np.zeros((3, 1, 9, 9), np.uint8), y_holdout=np.zeros(3, np.int64)),
         "x_holdout: sample shape"),
    ],
)
def test_bad_files_name_the_problem(digits_raw, change, message):
    arrays = dict(digits_raw)
    change(arrays)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_dataset_file(_npz(arrays))


def test_label_out_of_declared_range(digits_raw):
    with pytest.raises(DatasetError, match=r"y_\w+: label 9 out of range \[0, 5\)"):
        validate_arrays(dict(digits_raw), num_classes=5)


def test_nan_inputs_rejected(digits_raw):
    arrays = {k: (v.astype(np.float32) if k.startswith("x_") else v) for k, v in digits_raw.items()}
    arrays["x_test"][0, 0, 0, 0] = np.nan
    with pytest.raises(DatasetError, match="x_test: contains NaN"):
        validate_arrays(arrays)


def test_pickled_arrays_are_refused(digits_raw):
    arrays = dict(digits_raw, ids_train=np.array([object()] * 1197, dtype=object))
    with pytest.raises(DatasetError, match="ids_train: pickled"):
        read_dataset_file(_npz(arrays))


def test_not_an_npz():
    with pytest.raises(DatasetError, match="file: not a readable .npz"):
        read_dataset_file(io.BytesIO(b"\x80\x04K\x01."))  # a pickle, not a zip


def test_sample_limit(digits_raw):
    with pytest.raises(DatasetError, match="exceed the limit of 100"):
        validate_arrays(dict(digits_raw), max_samples=100)


def test_unknown_sample_ids_named(digits):
    with pytest.raises(DatasetError, match=r"sample_ids: 2 unknown id\(s\)"):
        digits.rows(["d9999", "nope", digits.ids[0]])


def test_bad_normalization(digits_raw):
    with pytest.raises(DatasetError, match="std: every value must be > 0"):
        from_arrays(validate_arrays(digits_raw), mean=[0.5], std=[0.0])
    with pytest.raises(DatasetError, match="mean/std: need 1 or 1 values"):
        from_arrays(validate_arrays(digits_raw), mean=[0.5, 0.5, 0.5], std=[1, 1, 1])


def test_forget_retain_views_partition_train(digits, forget_rows):
    forget, retain = digits.forget_retain(forget_rows)
    assert len(forget) + len(retain) == len(digits.train)
    assert not set(forget.index.tolist()) & set(retain.index.tolist())
    assert torch.equal(forget.y, digits.train.y[forget_rows])


def test_loaders_are_seeded_and_cover_every_row(digits):
    view = digits.view("train")

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([b.pos for b in view.batches(100, shuffle=True, generator=g)])

    a, b, c = order(1), order(1), order(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(len(view)))
    batches = list(view.batches(100, drop_last=True))
    assert all(len(bt.y) == 100 for bt in batches) and len(batches) == len(view) // 100


def test_label_override_and_concat(digits, forget_rows):
    forget, retain = digits.forget_retain(forget_rows)
    relabeled = forget.with_labels(torch.zeros(len(forget), dtype=torch.long))
    both = concat([relabeled, retain.head(10)])
    assert len(both) == len(forget) + 10
    assert (both.y[: len(forget)] == 0).all()
    assert torch.equal(both.y[len(forget):], retain.head(10).y)
    seen = torch.cat([bt.y for bt in both.batches(16)])
    assert torch.equal(seen, both.y)


@pytest.mark.parametrize("compressed", [False, True])
def test_blank_train_rows_blanks_only_those_rows_and_keeps_the_file_valid(digits_raw, compressed):
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **digits_raw)
    buf.seek(0)
    out = blank_train_rows(buf, [7, 2, 7])
    with np.load(io.BytesIO(out), allow_pickle=False) as f:
        now = {k: f[k] for k in f.files}
    assert now.keys() == digits_raw.keys()
    keep = ~np.isin(np.arange(len(digits_raw["y_train"])), [2, 7])
    for k, before in digits_raw.items():
        assert now[k].dtype == before.dtype and now[k].shape == before.shape, k
        if k in ("x_train", "y_train"):
            assert not now[k][[2, 7]].any() and np.array_equal(now[k][keep], before[keep]), k
        else:
            assert np.array_equal(now[k], before), k
    with zipfile.ZipFile(io.BytesIO(out)) as zf:
        assert {i.compress_type != zipfile.ZIP_STORED for i in zf.infolist()} == {compressed}
    read_dataset_file(io.BytesIO(out))
    with pytest.raises(DatasetError, match="past the"):
        blank_train_rows(_npz(digits_raw), [len(digits_raw["y_train"])])
