"""Scenario builders of bench.scenarios on digits (and breast cancer for tabular triggers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import scenarios
from bench.datasets import BREAST_CANCER_SPLIT, breast_cancer_arrays
from worker.engine import architectures
from worker.engine.data import from_arrays
from worker.engine.datafile import validate_arrays
from worker.engine.training import TrainConfig, train_model


@pytest.fixture(scope="module")
def proxy(digits) -> np.ndarray:
    return np.random.default_rng(0).random(len(digits.train))


def test_mixed_and_random_sizes(digits, proxy):
    mixed = scenarios.build("mixed", digits, proxy=proxy, forget_size=60, seed=0)
    rand = scenarios.build("random", digits, proxy=proxy, forget_size=60, seed=0)
    for s in (mixed, rand):
        assert len(s.forget_rows) == 60 and len(set(s.forget_rows.tolist())) == 60
        assert s.data is digits  # the training set is unchanged
        assert s.info["scenario"] == s.name and not s.has_asr
    # mixed = equal parts highest / mid / lowest proxy
    rows = set(mixed.forget_rows.tolist())
    order = np.argsort(proxy)
    assert set(order[:20].tolist()) <= rows and set(order[-20:].tolist()) <= rows
    assert rows != set(rand.forget_rows.tolist())
    with pytest.raises(ValueError):
        scenarios.build("mixed", digits, seed=0)  # needs the proxy


def test_mislabeled_flips_exactly_the_forget_rows(digits):
    s = scenarios.mislabeled(digits, 0.05, seed=3)
    n = len(digits.train)
    before, after = digits.train.y, s.data.train.y
    flipped = (before != after).nonzero().squeeze(1)
    assert len(flipped) == round(0.05 * n) == len(s.forget_rows)
    assert torch.equal(flipped, s.forget_rows.sort().values)
    assert (after[s.forget_rows] != before[s.forget_rows]).all()
    assert ((after >= 0) & (after < digits.num_classes)).all()
    assert s.info["original_labels"] == before[s.forget_rows].tolist()
    assert torch.equal(s.data.train.x, digits.train.x) and s.data.test is digits.test
    assert digits.train.y is before and torch.equal(digits.train.y, before)  # input untouched
    assert not torch.equal(scenarios.mislabeled(digits, 0.05, seed=4).forget_rows, s.forget_rows)


def _small_model(data, train_view, epochs=8):
    spec = architectures.default_spec("small_cnn", data.input_shape, data.num_classes, width=8)
    return train_model(architectures.build(spec, seed=0), train_view, TrainConfig(epochs=epochs, seed=0),
                       runtime=_rt())


def _rt():
    from worker.engine.runtime import Runtime

    return Runtime.auto("cpu")


def test_poisoned_stamps_exactly_the_forget_rows(digits):
    target = 0
    s = scenarios.poisoned(digits, 0.04, target=target, seed=1)
    x0, x1 = digits.train.x, s.data.train.x
    rows = s.forget_rows
    assert len(rows) == round(0.04 * len(digits.train))
    changed = (x0 != x1).flatten(1).any(1).nonzero().squeeze(1)
    assert set(changed.tolist()) <= set(rows.tolist())  # nothing outside the forget rows is touched
    white = x0.amax(dim=(0, 2, 3))  # the brightest value of the clean split (normalized space)
    assert torch.equal(x1[rows, :, -3:, -3:], white.view(1, -1, 1, 1).expand(len(rows), -1, 3, 3))
    assert torch.equal(x1[rows, :, :-3, :], x0[rows, :, :-3, :])  # only the corner patch
    assert (s.data.train.y[rows] == target).all()
    assert (digits.train.y[rows] != target).all()  # never picks rows already of the target class
    keep = torch.ones(len(x0), dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(s.data.train.y[keep], digits.train.y[keep])
    # the ASR view: every non-target test row, triggered
    tv = s.triggered_test
    assert len(tv) == int((digits.test.y != target).sum()) and (tv.y != target).all()
    assert torch.equal(tv.x[:, :, -3:, -3:], white.view(1, -1, 1, 1).expand(len(tv), -1, 3, 3))
    with pytest.raises(ValueError):
        scenarios.poisoned(digits, 0.99, target=target)  # more rows than non-target rows


def test_poisoned_asr_high_for_a_backdoored_model_low_for_a_clean_one(digits):
    s = scenarios.poisoned(digits, 0.04, seed=0)
    runtime = _rt()
    backdoored = _small_model(s.data, s.data.view("train"))
    clean = _small_model(digits, digits.view("train"))
    assert s.asr(backdoored, runtime) > 0.5
    assert s.asr(clean, runtime) < 0.1


def test_poisoned_tabular_trigger_is_out_of_range_and_backdoors_only_the_poisoned_model():
    d = from_arrays(validate_arrays(breast_cancer_arrays()))
    s = scenarios.poisoned(d, 0.05, target=0, seed=0)
    rows = s.forget_rows
    x0, x1 = d.train.x, s.data.train.x
    feats = list(s.trigger.features)
    assert len(feats) == scenarios.TABULAR_TRIGGER_FEATURES and s.info["trigger_features"] == feats
    others = [j for j in range(x0.shape[1]) if j not in feats]
    assert torch.equal(x1[rows][:, others], x0[rows][:, others])  # only the trigger features change
    v = x1[rows][:, feats]
    assert ((v > x0[:, feats].amax(0)) | (v < x0[:, feats].amin(0))).all()  # outside the clean range
    assert (d.train.y[rows] == 1).all() and (s.data.train.y[rows] == 0).all()
    spec = architectures.default_spec("mlp", d.input_shape, d.num_classes)
    runtime = _rt()
    poisoned = train_model(architectures.build(spec, seed=0), s.data.view("train"), TrainConfig(epochs=30, seed=0),
                           runtime=runtime)
    clean = train_model(architectures.build(spec, seed=0), d.view("train"), TrainConfig(epochs=30, seed=0),
                        runtime=runtime)
    assert s.asr(poisoned, runtime) > 0.5
    assert s.asr(clean, runtime) < 0.2  # the trigger is no natural evidence for the target


def test_breast_cancer_writer_is_a_valid_dataset(tmp_path):
    from bench.datasets import main, write

    arrays = breast_cancer_arrays()
    summary = validate_arrays(arrays).summary()
    assert summary == {"num_classes": 2, "input_shape": [30], "dtype": "float32",
                       "n_train": BREAST_CANCER_SPLIT[0], "n_test": BREAST_CANCER_SPLIT[2],
                       "n_holdout": BREAST_CANCER_SPLIT[1]}
    assert all(i.startswith("b") for i in arrays["ids_train"])
    np.testing.assert_allclose(arrays["x_train"].mean(0), 0, atol=1e-5)  # standardized by train stats
    np.testing.assert_allclose(arrays["x_train"].std(0), 1, atol=1e-4)
    assert main(["--out", str(tmp_path), "--which", "breast_cancer"]) == 0
    from worker.engine.datafile import read_dataset_file

    assert read_dataset_file(tmp_path / "breast_cancer.npz").summary() == summary
    assert write(arrays, tmp_path / "b.npz") == summary
