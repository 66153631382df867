"""Memorization proxies (docs/proxies-and-metrics.md#proxies): one score per training row, higher =
more memorized.

Proxies, by name (:data:`PROXIES` holds their metadata; :func:`check_proxy` validates a
policy's choice):

- ``confidence``, ``max_conf``, ``entropy``, ``bi_acc``: running means of p_y, max_k p_k,
  Σ_k p_k log p_k and 1[argmax = y] recorded during the original training
  (:class:`~worker.engine.events.LearningEvents`). They need the events.
- ``confidence_final``, ``max_conf_final``, ``entropy_final``, ``bi_acc_final``: the same four
  statistics from one eval-mode pass of the *final* model — the fallback when no events were
  uploaded. [Ours] They see only the end of training, so easy and memorized examples look alike
  (both are fit); expect them to be weaker than the event means.
- ``holdout_retrain`` (alias ``ho_ret``): fine-tune a copy on the *holdout* split and
  take the symmetric KL between the two models' predictions. Post hoc, needs a holdout split.
- ``loss_curvature`` (alias ``curvature_final``): CURE's input-space curvature of the
  loss, post hoc on the final model.

Orientation is done in exactly one place, :func:`orient`
(docs/proxies-and-metrics.md#orientation-higher-means-more-memorized): the learning-event
statistics are anti-correlated with memorization, so they are turned around there (1 − p_y,
1 − max p, entropy = −Σ p log p, error = 1 − accuracy); the KL and curvature scores already grow
with memorization. Every other function in this module works on raw statistics.

Default (:func:`default_proxy`): ``confidence`` when events exist (the best proxy on our digits
benchmark at 0.04% of the estimator's cost: docs/benchmarks.md), else ``holdout_retrain`` (the
papers' one proxy that needs only the final weights; docs/proxies-and-metrics.md#default-proxy).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .catalog import PROXY_ALIASES
from .data import Batch, UnlearningData, View
from .errors import CheckpointError, ConfigError, DatasetError
from .events import EVENT_KEYS, LearningEvents, read_events, redacted
from .runtime import RunContext, Runtime, predict, seed_everything
from .training import fit, make_optimizer

EventsLike = LearningEvents | Mapping[str, np.ndarray] | str | Path

# The one orientation table: score = offset + sign · raw statistic.
#   raw statistic                          offset sign   score
_ORIENTATION: dict[str, tuple[float, float]] = {
    "confidence": (1.0, -1.0),       # p_y                → 1 − p_y
    "max_conf": (1.0, -1.0),         # max_k p_k          → 1 − max p
    "neg_entropy": (0.0, -1.0),      # Σ_k p_k log p_k    → entropy −Σ p log p
    "bi_acc": (1.0, -1.0),           # 1[argmax = y]      → error rate
    "holdout_retrain": (0.0, 1.0),   # symmetric KL       → itself
    "loss_curvature": (0.0, 1.0),    # ||∇ℓ(x+z) − ∇ℓ(x)|| → itself
}


def orient(statistic: str, raw: np.ndarray) -> np.ndarray:
    """Map a raw statistic to a memorization score (higher = more memorized), as float64."""
    offset, sign = _ORIENTATION[statistic]
    return offset + sign * np.asarray(raw, dtype=np.float64)


@dataclass
class ProxyResult:
    """Scores of one proxy: ``values[r]`` belongs to train row ``r`` (higher = more memorized)."""

    name: str
    values: np.ndarray
    seconds: float
    source: str  # "events": recorded during training; "final": computed from the final model
    params: dict[str, Any] = field(default_factory=dict)


ProxyFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class ProxyInfo:
    """What a proxy needs and costs. ``cost``: free | forward | gradients | finetune (cheapest first)."""

    name: str
    statistic: str  # key of the orientation table
    source: str  # "events" or "final"
    needs_events: bool
    needs_holdout: bool
    cost: str
    defaults: dict[str, Any]
    description: str
    fn: ProxyFn = field(repr=False, compare=False)


PROXIES: dict[str, ProxyInfo] = {}
ALIASES = PROXY_ALIASES  # defined with the torch-free catalog the API validates against


def available_proxies() -> list[str]:
    return list(PROXIES)


def default_proxy(has_events: bool, has_holdout: bool = True) -> str:
    """``confidence`` with learning events, else ``holdout_retrain``.

    [Choice] Without events *and* without a holdout split, no paper proxy applies; we fall back to
    ``loss_curvature`` (post hoc, needs neither).
    """
    if has_events:
        return "confidence"
    return "holdout_retrain" if has_holdout else "loss_curvature"


def check_proxy(
    name: str, hparams: Mapping[str, Any] | None = None, *, has_events: bool | None = None,
    has_holdout: bool | None = None,
) -> ProxyInfo:
    """Validate a policy's proxy: known name (or alias), known hyperparameters, and its inputs.

    ``has_events`` / ``has_holdout`` are checked only when given (``None`` = not known yet).
    Raises :class:`ConfigError` naming the field.
    """
    canonical = ALIASES.get(name, name) if isinstance(name, str) else None
    if canonical not in PROXIES:
        raise ConfigError(f"proxy: unknown proxy {name!r}; known: {available_proxies()}")
    info = PROXIES[canonical]
    unknown = sorted(set(hparams or {}) - set(info.defaults))
    if unknown:
        raise ConfigError(
            f"proxy_params: unknown for proxy {canonical!r}: {unknown}; known: {sorted(info.defaults)}"
        )
    for key, value in (hparams or {}).items():
        _check_value(canonical, key, value)
    if info.needs_events and has_events is False:
        raise ConfigError(
            f"proxy: {canonical!r} needs learning events recorded during training; this model has none "
            f"(use {default_proxy(False, has_holdout is not False)!r} or a *_final proxy)"
        )
    if info.needs_holdout and has_holdout is False:
        raise ConfigError(f"proxy: {canonical!r} needs a holdout split (x_holdout/y_holdout); this dataset has none")
    return info


_POSITIVE_INT = {"ft_epochs", "batch_size", "patience"}
_NON_NEGATIVE = {"ft_lr", "momentum", "weight_decay", "seed"}


def _check_value(proxy: str, key: str, value: Any) -> None:
    def bad(why: str) -> ConfigError:
        return ConfigError(f"proxy_params.{key}: {why} for proxy {proxy!r}, got {value!r}")

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    if key in _POSITIVE_INT and not (number(value) and value == int(value) and value >= 1):
        raise bad("must be an integer >= 1")
    if key in _NON_NEGATIVE and not (number(value) and value >= 0):
        raise bad("must be a number >= 0")
    if key == "h":
        values = value if isinstance(value, list | tuple) else [value]
        if not values or not all(number(v) and v > 0 for v in values):
            raise bad("must be a number > 0 or a non-empty list of them")


def compute_proxy(
    name: str, model: nn.Module, data: UnlearningData, runtime: Runtime, events: EventsLike | None = None,
    ctx: RunContext | None = None, **hparams: Any,
) -> ProxyResult:
    """Score every training row of ``data`` with proxy ``name`` (higher = more memorized).

    ``events`` is a :class:`LearningEvents`, the dict :func:`read_events` returns, or the path
    of an events file; rows are aligned to ``data.ids``. A row whose events were redacted
    (retention: :data:`~worker.engine.events.REDACTED`) scores NaN: consumers ignore it in
    whole-training-set statistics and refuse it in a forget set (worker/engine/refine.py).
    ``model`` is moved to the runtime's device but never modified. Progress goes to
    ``ctx.report``, cancellation via ``ctx.check``.
    """
    info = check_proxy(name, hparams)
    ctx = ctx or RunContext(stage="proxies")
    ctx.check()
    hp = {**info.defaults, **hparams}
    start = time.perf_counter()
    blank = np.zeros(len(data.train), dtype=bool)
    if info.needs_events:
        if events is None:
            raise ConfigError(f"proxy: {info.name!r} needs learning events recorded during training; none given")
        means, blank = _event_means(events, data)
        raw = info.fn(means, info.statistic)
    else:
        raw = info.fn(model, data, runtime, ctx, **hp)
    values = orient(info.statistic, raw)
    if values.shape != (len(data.train),) or not np.isfinite(values[~blank]).all():
        bad = int((~np.isfinite(values[~blank])).sum()) if values.shape == (len(data.train),) else -1
        error = DatasetError if info.needs_events else CheckpointError  # bad events file, or a model giving NaN
        raise error(f"proxy {info.name!r}: expected {len(data.train)} finite scores ({bad} not finite)")
    ctx.report(1.0)
    return ProxyResult(info.name, values, time.perf_counter() - start, info.source, hp)


# --------------------------------------------------------------------------- learning events


def _event_means(events: EventsLike, data: UnlearningData) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per-row means aligned with ``data``'s train rows, and the mask of redacted rows (their means
    are NaN); rows never recorded raise DatasetError."""
    ids = np.asarray(data.ids).astype(str)
    if isinstance(events, str | Path):
        events = read_events(events, ids, redacted_ok=True)
    if isinstance(events, LearningEvents):
        means, count = events.means(), events.count
    else:
        means, count = dict(events), events.get("count")
        if "ids" in means:
            ev_ids = np.asarray(means["ids"]).astype(str)
            if len(ev_ids) != len(ids) or not np.array_equal(ev_ids, ids):
                pos = {s: i for i, s in enumerate(ev_ids)}
                absent = [s for s in ids if s not in pos]
                if absent:
                    raise DatasetError(f"events.ids: {len(absent)} training id(s) have no events, e.g. {absent[:5]}")
                order = np.array([pos[s] for s in ids], dtype=np.int64)
                means = {k: np.asarray(v)[order] for k, v in means.items()}
                count = means.get("count")
    missing = [k for k in EVENT_KEYS if k not in means]
    if missing:
        raise DatasetError(f"events: missing key(s) {', '.join(missing)}")
    n = len(ids)
    for k in EVENT_KEYS:
        if np.shape(means[k]) != (n,):
            raise DatasetError(f"events.{k}: expected {n} rows (one per training row), got {np.shape(means[k])}")
    if count is not None and np.shape(count) != (n,):
        raise DatasetError(f"events.count: expected {n} rows (one per training row), got {np.shape(count)}")
    blank = redacted(count) if count is not None else np.zeros(n, dtype=bool)
    if count is not None and (np.asarray(count)[~blank] <= 0).any():
        unseen = int((np.asarray(count)[~blank] <= 0).sum())
        raise DatasetError(f"events.count: {unseen} training row(s) were never recorded during training")
    means = {k: np.where(blank, np.nan, np.asarray(means[k], dtype=np.float64)) for k in EVENT_KEYS}
    return means, blank


def _from_events(means: Mapping[str, np.ndarray], statistic: str) -> np.ndarray:
    return np.asarray(means[statistic], dtype=np.float64)


# --------------------------------------------------------------------------- one pass, final model


def _final_stats(model: nn.Module, data: UnlearningData, runtime: Runtime, ctx: RunContext,
                 batch_size: int) -> dict[str, np.ndarray]:
    """The four event statistics from one eval-mode pass of the final model.

    It reuses the recorder's formulas: a :class:`LearningEvents` that sees every row once.
    """
    model = runtime.prepare(model)
    view = data.view("train")
    rec = LearningEvents.empty(len(view))
    logits = predict(model, view, runtime, batch_size=batch_size)
    ctx.check()
    rec.update(view.index.cpu(), logits, view.y.cpu())
    return rec.means()


def _from_final(model, data, runtime, ctx, *, batch_size: int, statistic: str) -> np.ndarray:
    return np.asarray(_final_stats(model, data, runtime, ctx, int(batch_size))[statistic], dtype=np.float64)


# --------------------------------------------------------------------------- holdout retraining


def _holdout_retrain(
    model: nn.Module, data: UnlearningData, runtime: Runtime, ctx: RunContext, *, ft_lr: float, ft_epochs: int,
    patience: int, momentum: float, weight_decay: float, batch_size: int, seed: int,
) -> np.ndarray:
    """Symmetric KL between θ and θ fine-tuned on the holdout split
    (docs/proxies-and-metrics.md#holdout-retraining).

    [Deviation] The reference fine-tunes on the *test* split; we use the
    dataset's holdout split and never read the test split, so reported test accuracy stays clean.
    Fine-tuning: CE, SGD(ft_lr, momentum, wd), constant LR, train mode (BN statistics adapt, as in
    any fine-tuning), at most ``ft_epochs`` epochs, stop when the epoch's mean train loss has not
    improved for ``patience`` epochs. Scoring: both models in eval mode, probabilities clamped
    ≥ 1e-10, ½[KL(p‖q) + KL(q‖p)] = ½ Σ_k (p_k − q_k)(log p_k − log q_k).
    ``batch_size`` 256 is the RUM recipe's batch size.
    """
    if data.holdout is None:
        raise DatasetError(
            "x_holdout: holdout_retrain needs a holdout split (x_holdout/y_holdout in the dataset file); "
            "the test split is never used in its place"
        )
    ft_epochs, patience, batch_size, seed = int(ft_epochs), int(patience), int(batch_size), int(seed)
    holdout = View(data.holdout, torch.arange(len(data.holdout)))
    model = runtime.prepare(model)
    train_view = data.view("train")
    tuned = copy.deepcopy(model)
    gen = seed_everything(seed)
    opt = make_optimizer(tuned.parameters(), "sgd", ft_lr, momentum, weight_decay)
    epoch_loss: list[float] = []

    def loss_fn(m: nn.Module, x: torch.Tensor, b: Batch, epoch: int) -> torch.Tensor:
        loss = F.cross_entropy(m(x), b.y)
        epoch_loss.append(loss.item() * len(b.y))
        return loss

    ft_ctx = ctx.sub(0.0, 0.8)
    best, stale = math.inf, 0
    for epoch in range(ft_epochs):
        epoch_loss.clear()
        fit(tuned, epochs=1, batches=lambda e: holdout.batches(batch_size, shuffle=True, generator=gen),
            loss_fn=loss_fn, optimizer=opt, runtime=runtime, ctx=ft_ctx.sub(epoch / ft_epochs, (epoch + 1) / ft_epochs))
        mean_loss = sum(epoch_loss) / len(holdout)
        if mean_loss < best:
            best, stale = mean_loss, 0
        else:
            stale += 1
            if stale >= patience:
                break
    ctx.report(0.8)
    p = predict(model, train_view, runtime).float().softmax(1).clamp_min(1e-10)
    ctx.report(0.9)
    q = predict(tuned, train_view, runtime).float().softmax(1).clamp_min(1e-10)
    return (0.5 * ((p - q) * (p.log() - q.log())).sum(1)).double().numpy()


# --------------------------------------------------------------------------- loss curvature


def _loss_curvature(
    model: nn.Module, data: UnlearningData, runtime: Runtime, ctx: RunContext, *, h: float | Sequence[float],
    batch_size: int,
) -> np.ndarray:
    """CURE's input-space loss curvature per training example, eval mode, float32
    (docs/proxies-and-metrics.md#loss-curvature).

    g = ∇_x ℓ(x, y); z = h · sign(g) / ||sign(g)||₂; curv = ||∇_x [ℓ(x + z, y) − ℓ(x, y)]||₂ with
    z held constant (sign has zero derivative), i.e. ||∇ℓ(x+z) − ∇ℓ(x)||₂: one gradient pass
    plus one more per h, no double backward. ℓ is the per-example loss (summed over the batch, so a
    score does not depend on the batch it is in; CURE's batch-mean loss only rescales by 1/B).
    With several ``h`` values the scores are averaged.

    [Choice] The paper (Garg et al.) averages the curvature over *training* (every epoch);
    we compute it post hoc on the final model only, so it needs no training hooks. ``h`` is in
    the units of the model's inputs (after normalization); the reference's h = 0.01 is in
    [0, 1] pixel units (normalization inside its model).
    """
    hs = [float(h)] if isinstance(h, int | float) else [float(v) for v in h]
    batch_size = int(batch_size)
    model = runtime.prepare(model)
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # only input gradients are needed
        p.requires_grad_(False)
    view = data.view("train")
    out = torch.zeros(len(view), dtype=torch.float64)
    n_batches = max(1, math.ceil(len(view) / batch_size))
    try:
        for i, b in enumerate(view.batches(batch_size)):
            ctx.check()
            x = runtime.inputs(b.x).float().requires_grad_(True)
            y = b.y.to(x.device)
            loss = F.cross_entropy(model(x), y, reduction="sum")
            g = torch.autograd.grad(loss, x)[0]
            s = g.sign().flatten(1)
            norm = s.norm(dim=1).clamp_min(1e-12)  # an all-zero gradient gives z = 0, curvature 0
            direction = (s / norm[:, None]).view_as(x)
            acc = torch.zeros(len(y), dtype=torch.float64, device=x.device)
            for hv in hs:
                xp = (x.detach() + hv * direction).requires_grad_(True)
                gp = torch.autograd.grad(F.cross_entropy(model(xp), y, reduction="sum"), xp)[0]
                acc += (gp - g).flatten(1).norm(dim=1).double()  # ∇_x[ℓ(x+z) − ℓ(x)] = ∇ℓ(x+z) − g
            out[b.pos] = (acc / len(hs)).cpu()
            ctx.report((i + 1) / n_batches * 0.99)
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return out.numpy()


# --------------------------------------------------------------------------- registry


def _register(info: ProxyInfo) -> None:
    PROXIES[info.name] = info


for _stat, _name, _what in (
    ("confidence", "confidence", "p_y"),
    ("max_conf", "max_conf", "max_k p_k"),
    ("neg_entropy", "entropy", "Σ_k p_k log p_k"),
    ("bi_acc", "bi_acc", "1[argmax = y]"),
):
    _register(ProxyInfo(
        _name, _stat, "events", needs_events=True, needs_holdout=False, cost="free", defaults={},
        description=f"mean of {_what} over training (learning events), turned around", fn=_from_events,
    ))
for _stat, _name, _what in (
    ("confidence", "confidence_final", "p_y"),
    ("max_conf", "max_conf_final", "max_k p_k"),
    ("neg_entropy", "entropy_final", "Σ_k p_k log p_k"),
    ("bi_acc", "bi_acc_final", "1[argmax = y]"),
):
    def _fn(model, data, runtime, ctx, *, batch_size: int, _s: str = _stat) -> np.ndarray:
        return _from_final(model, data, runtime, ctx, batch_size=batch_size, statistic=_s)

    _register(ProxyInfo(
        _name, _stat, "final", needs_events=False, needs_holdout=False, cost="forward",
        defaults={"batch_size": 1024}, description=f"{_what} of the final model (one eval pass), turned around",
        fn=_fn,
    ))
_register(ProxyInfo(
    "holdout_retrain", "holdout_retrain", "final", needs_events=False, needs_holdout=True, cost="finetune",
    defaults={"ft_lr": 0.1, "ft_epochs": 30, "patience": 4, "momentum": 0.9, "weight_decay": 5e-4,
              "batch_size": 256, "seed": 0},
    description="symmetric KL between the model and a copy fine-tuned on the holdout split", fn=_holdout_retrain,
))
_register(ProxyInfo(
    "loss_curvature", "loss_curvature", "final", needs_events=False, needs_holdout=False, cost="gradients",
    defaults={"h": 0.01, "batch_size": 256},
    description="CURE input-space loss curvature of the final model", fn=_loss_curvature,
))
