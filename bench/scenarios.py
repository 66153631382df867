"""Benchmark scenarios: which rows a user asks to forget, and what the training set looked like.

A scenario is built on the engine's :class:`~worker.engine.data.UnlearningData` (normalized
tensors) and returns a :class:`Scenario`: the data the *original* model is trained on (modified
for ``mislabeled`` and ``poisoned``), the forget rows, a description dict for the JSON rows and,
for ``poisoned``, the triggered test view and :meth:`Scenario.asr`.

* ``mixed`` — RUM's mixed forget set (docs/benchmarks.md): equal parts high / mid / low memorization by the
  proxy of the original (:func:`worker.engine.refine.build_forget_set`). The data is unchanged;
  the forget rows depend on the trained original, so the builder takes the proxy values.
* ``random`` — the same number of rows, drawn uniformly.
* ``mislabeled`` — ``fraction`` of the training rows (seeded) get a different label, drawn
  uniformly among the other classes; the forget set is exactly those rows. A model that
  memorizes them loses test accuracy; unlearning should win it back (compare with the retrain
  reference, trained on the clean rest).
* ``poisoned`` — a backdoor: ``fraction`` of the training rows (never rows already of the target
  class) get a trigger and the ``target`` label; the forget set is exactly those rows. The
  trigger (:class:`Trigger`, from the *clean* train split) is stamped in normalized space:

  - images (N, C, H, W): a ``patch`` × ``patch`` square (default 3 × 3) in the bottom-right
    corner, every channel at its maximum over the clean train split — on uint8 images the white
    value ``(1 − mean) / std`` whatever the normalization;
  - tabular (N, D): 3 features set just outside the range of the clean train split (max + 1 std
    or min − 1 std). Which features and which side are chosen so that the trigger is no natural
    evidence for the target: the features whose mean differs least between target and other rows,
    each pushed to the side *away* from the target's mean. (On breast cancer, the "worst" features
    at their maximum already say "malignant", so a clean model would follow such a trigger: the
    retrain reference's ASR was 0.90 with the last three features at max + 1 std, 0.00 now.)

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
# the forget rows' labels are wrong: the service treats such requests (reason mislabeled / poisoned)
# with its corrective policy (worker/engine/rum.py)
CORRECTIVE_SCENARIOS = ("mislabeled", "poisoned")
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
    trigger: Trigger | None = None

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


@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger in normalized input space: an image patch or a few tabular features."""

    value: torch.Tensor  # per channel (patch) or per trigger feature
    patch: int = PATCH  # images: side of the bottom-right square
    features: tuple[int, ...] = ()  # tabular: the trigger features

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` (N, C, H, W) or (N, D) with the trigger stamped on every row."""
        out = x.clone()
        value = self.value.to(out.device, out.dtype)
        if out.ndim == 4:
            if self.patch > min(out.shape[2], out.shape[3]):
                raise ValueError(f"poisoned: patch {self.patch} does not fit {tuple(out.shape[2:])} inputs")
            out[:, :, -self.patch:, -self.patch:] = value.view(1, -1, 1, 1)
        else:
            out[:, list(self.features)] = value.view(1, -1)
        return out

    def describe(self) -> str:
        if not self.features:
            return f"{self.patch}x{self.patch} bottom-right square at the channel max"
        return f"features {list(self.features)} just outside their clean range, away from the target"


def make_trigger(x: torch.Tensor, y: torch.Tensor, target: int, patch: int = PATCH,
                 n_features: int = TABULAR_TRIGGER_FEATURES) -> Trigger:
    """The trigger for clean train inputs ``x`` / labels ``y`` (see the module docstring)."""
    if x.ndim == 4:
        return Trigger(x.amax(dim=(0, 2, 3)).cpu(), patch=patch)  # (C,): each channel's "white"
    if x.ndim != 2:
        raise ValueError(f"poisoned: inputs must be (N, C, H, W) or (N, D), got {tuple(x.shape)}")
    x, y = x.cpu(), y.cpu()
    is_target = y == target
    gap = x[is_target].mean(0) - x[~is_target].mean(0)
    k = min(n_features, x.shape[1])
    feats = torch.sort(gap.abs().argsort(stable=True)[:k]).values
    f = x[:, feats]
    std = f.std(0)
    value = torch.where(gap[feats] < 0, f.amax(0) + std, f.amin(0) - std)
    return Trigger(value, features=tuple(int(i) for i in feats))


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
    trigger = make_trigger(x, y, target, patch)
    new_x = x.clone()
    new_x[rows.to(x.device)] = trigger.apply(x[rows.to(x.device)])
    new_y = y.clone()
    new_y[rows.to(y.device)] = target
    modified = _with_train(data, new_x, new_y)

    test_rows = (data.test.y.cpu() != target).nonzero().squeeze(1)
    tx = trigger.apply(data.test.x[test_rows.to(data.test.x.device)])
    triggered = Split(tx, data.test.y[test_rows.to(data.test.y.device)])
    view = View(triggered, torch.arange(len(test_rows)))
    info = {"scenario": "poisoned", "fraction": fraction, "forget_size": k, "target": target,
            "trigger": trigger.describe(), "trigger_features": list(trigger.features),
            "trigger_value": [round(float(v), 4) for v in trigger.value], "n_asr_test": len(test_rows),
            "original_labels": y_cpu[rows].tolist()}
    return Scenario("poisoned", modified, rows, info, triggered_test=view, target=target, trigger=trigger)


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
