"""Write the benchmark datasets in the dataset-file format (docs/api.md#dataset-file).

    python -m bench.datasets [--out DIR] [--which digits,fashion_mnist,breast_cancer]
        [--fashion-train N] [--fashion-test N]

* ``digits.npz``: scikit-learn's digits, uint8 (N,1,8,8) scaled x·255/16, the seed-0 split
  1,197 train / 200 holdout / 400 test with ids ``d{index:04d}`` — the very split of the test
  fixtures (both call :func:`worker.engine.sample_data.digits_arrays`).
* ``fashion_mnist.npz``: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
  (IDX files, possibly gzipped, under /usr/share/datasets/fashion-mnist/), uint8 (N,1,28,28).
  Holdout = the last 5,000 rows of the 60k train split, train = the first 55,000, test = the
  10k test split; ids ``f{index}`` with the index into the 60k train split.
  With ``--fashion-train N`` the train split is the first N of those 55,000 rows and the holdout
  keeps the 55k:5k ratio (the last ceil(N/11) rows, at most 5,000); ``--fashion-test M`` keeps
  the first M test rows. The file is then named ``fashion_mnist_n{N}.npz`` (or ``_t{M}``).
  The 3,500-row held-out subset of the benchmarks is ``--fashion-train 3500 --fashion-test 2000``
  (``fashion_mnist_n3500_t2000.npz``: 3,500 train / 319 holdout / 2,000 test).
* ``breast_cancer.npz``: scikit-learn's breast cancer (569 rows, 30 features, 2 classes) as
  float32 (N, 30), standardized with the *train* split's mean and std (so no ``--mean/--std`` is
  needed at load), split by a seed-0 permutation: 400 train / 69 holdout / 100 test; ids
  ``b{index}`` with the index into ``load_breast_cancer()``.

The output directory defaults to ``data/`` (gitignored).
"""

from __future__ import annotations

import argparse
import gzip
import math
import sys
from pathlib import Path

import numpy as np

from worker.engine.datafile import validate_arrays
from worker.engine.sample_data import digits_arrays

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}
FASHION_HOLDOUT = 5000
DATASETS = ("digits", "fashion_mnist", "breast_cancer")
BREAST_CANCER_SPLIT = (400, 69, 100)  # train / holdout / test of the 569 rows
INSTALL_HINT = "Fashion-MNIST not found; install it with: apt-get install -y dataset-fashion-mnist"
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (plain or ``.gz``): magic 0x0000 <dtype> <ndim>, big-endian dims, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} values for dims {dims.tolist()}")
    return data.reshape(dims).astype(dtype.newbyteorder("="))


def find_fashion(directory: Path = FASHION_DIR) -> dict[str, Path] | None:
    out = {}
    for key, stem in FASHION_FILES.items():
        for cand in (directory / stem, directory / f"{stem}.gz"):
            if cand.exists():
                out[key] = cand
                break
        else:
            return None
    return out


def fashion_arrays(n_train: int | None = None, n_test: int | None = None,
                   directory: Path = FASHION_DIR) -> dict[str, np.ndarray]:
    files = find_fashion(directory)
    if files is None:
        raise FileNotFoundError(INSTALL_HINT)
    x_tr, y_tr = read_idx(files["x_train"]), read_idx(files["y_train"])
    x_te, y_te = read_idx(files["x_test"]), read_idx(files["y_test"])
    n_all = len(y_tr)
    n_hold = FASHION_HOLDOUT if n_train is None else min(FASHION_HOLDOUT, math.ceil(n_train / 11))
    pool = n_all - FASHION_HOLDOUT
    n_train = pool if n_train is None else n_train
    if not 1 <= n_train <= pool:
        raise ValueError(f"--fashion-train: must be in [1, {pool}], got {n_train}")
    n_test = len(y_te) if n_test is None else n_test
    if not 1 <= n_test <= len(y_te):
        raise ValueError(f"--fashion-test: must be in [1, {len(y_te)}], got {n_test}")
    tr = np.arange(n_train)
    ho = np.arange(n_all - n_hold, n_all)
    return {
        "x_train": x_tr[tr][:, None], "y_train": y_tr[tr].astype(np.int64),
        "x_holdout": x_tr[ho][:, None], "y_holdout": y_tr[ho].astype(np.int64),
        "x_test": x_te[:n_test][:, None], "y_test": y_te[:n_test].astype(np.int64),
        "ids_train": np.array([f"f{i}" for i in tr]),
    }


def breast_cancer_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Breast cancer in the dataset-file layout: float32 (N, 30) standardized by train statistics."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = d.data.astype(np.float64)
    y = d.target.astype(np.int64)
    p = np.random.default_rng(seed).permutation(len(y))
    n_tr, n_ho, n_te = BREAST_CANCER_SPLIT
    tr, ho, te = p[:n_tr], p[n_tr : n_tr + n_ho], p[n_tr + n_ho : n_tr + n_ho + n_te]
    mean, std = x[tr].mean(0), x[tr].std(0)
    std[std == 0] = 1.0

    def z(rows: np.ndarray) -> np.ndarray:
        return ((x[rows] - mean) / std).astype(np.float32)

    return {
        "x_train": z(tr), "y_train": y[tr], "x_holdout": z(ho), "y_holdout": y[ho],
        "x_test": z(te), "y_test": y[te], "ids_train": np.array([f"b{i}" for i in tr]),
    }


def write(arrays: dict[str, np.ndarray], path: Path) -> dict:
    summary = validate_arrays(arrays).summary()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.datasets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("data"), help="output directory (default: data/)")
    ap.add_argument("--which", default="digits,fashion_mnist", help="comma-separated: " + ", ".join(DATASETS))
    ap.add_argument("--fashion-train", type=int, default=None, help="first N of the 55k train rows")
    ap.add_argument("--fashion-test", type=int, default=None, help="first M of the 10k test rows")
    args = ap.parse_args(argv)
    which = [w.strip() for w in args.which.split(",") if w.strip()]
    unknown = sorted(set(which) - set(DATASETS))
    if unknown:
        ap.error(f"--which: unknown dataset(s) {unknown}")
    status = 0
    for name in which:
        if name == "digits":
            path = args.out / "digits.npz"
            summary = write(digits_arrays(0), path)
        elif name == "breast_cancer":
            path = args.out / "breast_cancer.npz"
            summary = write(breast_cancer_arrays(0), path)
        else:
            suffix = (f"_n{args.fashion_train}" if args.fashion_train else "") + (
                f"_t{args.fashion_test}" if args.fashion_test else "")
            path = args.out / f"fashion_mnist{suffix}.npz"
            try:
                summary = write(fashion_arrays(args.fashion_train, args.fashion_test), path)
            except FileNotFoundError as exc:
                print(exc, file=sys.stderr)
                status = 1
                continue
        print(f"{path}: {summary}")
    return status


if __name__ == "__main__":
    sys.exit(main())
