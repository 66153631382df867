"""Benchmark scenarios: which rows a user asks to forget, and what the training set looked like.

A scenario is built on the engine's :class:`~worker.engine.data.UnlearningData` (normalized
tensors) and returns a :class:`Scenario`: the data the *original* model is trained on (modified
for ``mislabeled`` and ``poisoned``), the forget rows, a description dict for the JSON rows and,
for ``poisoned``, the triggered test view and :meth:`Scenario.asr`.

* ``mixed`` — RUM's mixed forget set (§4.1): equal parts high / mid / low memorization by the
  proxy of the original (:func:`worker.engine.refine.build_forget_set`). The data is unchanged;
  the forget rows depend on the trained original, so the builder takes the proxy values.
* ``random`` — the same number of rows, drawn uniformly.
* ``mislabeled`` — ``fraction`` of the training rows (seeded) get a different label, drawn
  uniformly among the other classes; the forget set is exactly those rows. A model that
  memorizes them loses test accuracy; unlearning should win it back (compare with the retrain
  reference, trained on the clean rest).
* ``poisoned`` — a backdoor: ``fraction`` of the training rows (never rows already of the target
  class) get a trigger and the ``target`` label; the forget set is exactly those rows. The
  trigger is stamped in normalized space with the *maximum* of the clean train split (per
  channel for images, per feature for tabular data), so on uint8 images it is the white value
  ``(1 − mean) / std`` whatever the normalization:

  - images (N, C, H, W): a ``patch`` × ``patch`` square (default 3 × 3) in the bottom-right
    corner, every channel at its maximum;
  - tabular (N, D): the last ``n_features`` features (default 3) set to their maximum plus
    one standard deviation (just outside the range seen in clean data).

  The attack success rate (ASR) is the share of test rows whose true class is not the target
  that the model classifies as the target once the trigger is stamped on them.

Everything is seeded by ``seed``; the inputs are never modified in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from worker.engine.data import Split, UnlearningData, View
from worker.engine.refine import build_forget_set
from worker.engine.runtime import Runtime, predict

SCENARIOS = ("mixed", "random", "mislabeled", "poisoned")
PROXY_SCENARIOS = ("mixed", "random")  # forget rows chosen from the trained original's proxy
DEFAULT_FRACTION = {"mislabeled": 0.05, "poisoned": 0.03}
PATCH = 3
TABULAR_TRIGGER_FEATURES = 3


@dataclass
class Scenario:
    """One benchmark situation: train the original on ``data``, then forget ``forget_rows``."""

    name: str
    data: UnlearningData
    forget_rows: torch.Tensor
    info: dict = field(default_factory=dict)
    triggered_test: View | None = None  # poisoned: test rows not of the target class, triggered
    target: int | None = None

    @property
    def has_asr(self) -> bool:
        return self.triggered_test is not None

    def asr(self, model: nn.Module, runtime: Runtime) -> float:
        """Attack success rate: share of triggered non-target test rows predicted as the target."""
        if self.triggered_test is None or self.target is None:
            raise ValueError(f"asr: scenario {self.name!r} has no trigger")
        pred = predict(model, self.triggered_test, runtime).argmax(1)
        return float((pred == self.target).float().mean().item())


def _with_train(data: UnlearningData, x: torch.Tensor, y: torch.Tensor) -> UnlearningData:
    """A copy of ``data`` whose train split is (x, y); ids, test and holdout are shared."""
    return UnlearningData(Split(x, y), data.test, data.holdout, data.ids, data.num_classes, data.mean, data.std)


def _count(fraction: float, n: int, name: str) -> int:
    if not 0 < fraction < 1:
        raise ValueError(f"{name}: fraction must be in (0, 1), got {fraction}")
    return max(1, round(fraction * n))


# --------------------------------------------------------------------------- mixed / random


def by_proxy(data: UnlearningData, proxy: np.ndarray, forget_size: int, kind: str = "mixed", *,
             seed: int = 0) -> Scenario:
    """``mixed`` or ``random``: ``forget_size`` rows (rounded down to a multiple of 3) by the proxy."""
    if kind not in PROXY_SCENARIOS:
        raise ValueError(f"kind: must be one of {PROXY_SCENARIOS}, got {kind!r}")
    n_per_bin = int(forget_size) // 3
    if n_per_bin < 1:
        raise ValueError(f"forget_size: need at least 3 rows (one per bin), got {forget_size}")
    rows = build_forget_set(proxy, n_per_bin, kind, seed=seed)
    return Scenario(kind, data, rows, {"scenario": kind, "forget_size": len(rows)})


def mixed(data: UnlearningData, proxy: np.ndarray, forget_size: int, *, seed: int = 0) -> Scenario:
    return by_proxy(data, proxy, forget_size, "mixed", seed=seed)


def random(data: UnlearningData, proxy: np.ndarray, forget_size: int, *, seed: int = 0) -> Scenario:
    return by_proxy(data, proxy, forget_size, "random", seed=seed)


# --------------------------------------------------------------------------- mislabeled


def mislabeled(data: UnlearningData, fraction: float = DEFAULT_FRACTION["mislabeled"], *,
               seed: int = 0) -> Scenario:
    """Flip ``fraction`` of the train labels to another class (uniform among the others)."""
    y = data.train.y.cpu()
    n, c = len(y), data.num_classes
    k = _count(fraction, n, "mislabeled")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=k, replace=False))
    shift = rng.integers(1, c, size=k)  # 1..C-1: never the same class
    new_y = y.clone()
    new_y[rows] = (y[rows] + torch.from_numpy(shift)) % c
    rows_t = torch.from_numpy(rows).long()
    modified = _with_train(data, data.train.x, new_y.to(data.train.y.device))
    info = {"scenario": "mislabeled", "fraction": fraction, "forget_size": k,
            "original_labels": y[rows].tolist()}
    return Scenario("mislabeled", modified, rows_t, info)


# --------------------------------------------------------------------------- poisoned


def trigger_value(x: torch.Tensor) -> torch.Tensor:
    """The trigger's value per channel (images) or per trigger feature (tabular), from clean ``x``."""
    if x.ndim == 4:
        return x.amax(dim=(0, 2, 3))  # (C,): the brightest value of each channel ("white")
    if x.ndim == 2:
        feats = x[:, -TABULAR_TRIGGER_FEATURES:]
        return feats.amax(0) + feats.std(0)  # just beyond the clean range
    raise ValueError(f"poisoned: inputs must be (N, C, H, W) or (N, D), got {tuple(x.shape)}")


def stamp(x: torch.Tensor, value: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """A copy of ``x`` with the trigger: bottom-right ``patch``² square, or the last features."""
    out = x.clone()
    value = value.to(out.device, out.dtype)
    if out.ndim == 4:
        if patch > min(out.shape[2], out.shape[3]):
            raise ValueError(f"poisoned: patch {patch} does not fit {tuple(out.shape[2:])} inputs")
        out[:, :, -patch:, -patch:] = value.view(1, -1, 1, 1)
    else:
        out[:, -len(value):] = value.view(1, -1)
    return out


def poisoned(data: UnlearningData, fraction: float = DEFAULT_FRACTION["poisoned"], *, target: int = 0,
             seed: int = 0, patch: int = PATCH) -> Scenario:
    """Stamp the trigger on ``fraction`` of the train rows (none of class ``target``), relabel them."""
    if not 0 <= target < data.num_classes:
        raise ValueError(f"target: must be a class in [0, {data.num_classes}), got {target}")
    x, y = data.train.x, data.train.y
    y_cpu = y.cpu()
    n = len(y_cpu)
    k = _count(fraction, n, "poisoned")
    candidates = (y_cpu != target).nonzero().squeeze(1).numpy()
    if k > len(candidates):
        raise ValueError(f"poisoned: {k} rows asked, only {len(candidates)} are not of class {target}")
    rng = np.random.default_rng(seed)
    rows = torch.from_numpy(np.sort(rng.choice(candidates, size=k, replace=False))).long()
    value = trigger_value(x)
    new_x = x.clone()
    new_x[rows.to(x.device)] = stamp(x[rows.to(x.device)], value, patch)
    new_y = y.clone()
    new_y[rows.to(y.device)] = target
    modified = _with_train(data, new_x, new_y)

    test_rows = (data.test.y.cpu() != target).nonzero().squeeze(1)
    tx = stamp(data.test.x[test_rows.to(data.test.x.device)], value, patch)
    triggered = Split(tx, data.test.y[test_rows.to(data.test.y.device)])
    view = View(triggered, torch.arange(len(test_rows)))
    info = {"scenario": "poisoned", "fraction": fraction, "forget_size": k, "target": target,
            "trigger": (f"{patch}x{patch} bottom-right square at the channel max" if x.ndim == 4 else
                        f"last {TABULAR_TRIGGER_FEATURES} features at max + 1 std"),
            "trigger_value": [round(float(v), 4) for v in value], "n_asr_test": len(test_rows),
            "original_labels": y_cpu[rows].tolist()}
    return Scenario("poisoned", modified, rows, info, triggered_test=view, target=target)


def build(name: str, data: UnlearningData, *, seed: int = 0, fraction: float | None = None,
          target: int = 0, proxy: np.ndarray | None = None, forget_size: int | None = None) -> Scenario:
    """Dispatch by name. ``mixed`` / ``random`` need ``proxy`` and ``forget_size``."""
    if name in PROXY_SCENARIOS:
        if proxy is None or forget_size is None:
            raise ValueError(f"{name}: needs the original's proxy values and forget_size")
        return by_proxy(data, proxy, forget_size, name, seed=seed)
    if name == "mislabeled":
        return mislabeled(data, DEFAULT_FRACTION[name] if fraction is None else fraction, seed=seed)
    if name == "poisoned":
        return poisoned(data, DEFAULT_FRACTION[name] if fraction is None else fraction, target=target, seed=seed)
    raise ValueError(f"scenario: unknown {name!r}; known: {list(SCENARIOS)}")
