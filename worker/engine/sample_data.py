"""Small real datasets in the dataset-file layout, shared by the tests and the benchmarks.

numpy and scikit-learn only (no torch), so the benchmark's dataset writer and the test fixtures
build the *same* split from one implementation.
"""

from __future__ import annotations

import numpy as np

DIGITS_SPLIT = (1197, 200, 400)  # train / holdout / test of scikit-learn's 1,797 digits


def digits_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Digits in the dataset-file layout: 1,197 train / 200 holdout / 400 test, uint8 (N,1,8,8).

    Pixels (0..16) are scaled to 0..255 (``round(x * 255 / 16)``); the split is a seeded
    permutation (``default_rng(seed)``); training ids are ``"d{index:04d}"`` with the index into
    ``load_digits()``, so ids are stable across seeds.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    p = np.random.default_rng(seed).permutation(len(y))
    n_tr, n_ho, _ = DIGITS_SPLIT
    tr, ho, te = p[:n_tr], p[n_tr : n_tr + n_ho], p[n_tr + n_ho :]
    return {
        "x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te],
        "x_holdout": x[ho], "y_holdout": y[ho],
        "ids_train": np.array([f"d{i:04d}" for i in tr]),
    }
