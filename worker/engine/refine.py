"""Refinement: memorization bins of a forget set, forget-set builders, ES
(docs/proxies-and-metrics.md#refinement-memorization-bins and the sections after it).

* :func:`refine` splits a forget set into K bins (default 3) by cut points taken from the proxy's
  distribution over the **whole training set** (default: tertiles), so a bin means the same
  memorization band whatever the request, and a forget set made only of low-memorization rows
  lands in the low bin alone. Empty bins are skipped; the rest come ordered low → high.
* :func:`build_forget_set` reproduces the forget sets of RUM's experiments (``mem_fs_split`` /
  ``proxy_fs_split``): top-N (high), bottom-N (low), N closest to the median (mid), and their
  union (mixed), deduplicated; or a uniform random set of the same size.
* :func:`entanglement_score` is the entanglement score on the penultimate embedding.

Proxy values are always oriented **higher = more memorized** (:mod:`worker.engine.proxies` does
the orientation in one place); this module never flips signs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .data import View
from .errors import ConfigError, DatasetError
from .runtime import Runtime

DEFAULT_BINS = 3
LEVEL_NAMES = {1: ("all",), 2: ("low", "high"), 3: ("low", "mid", "high")}
FORGET_KINDS = ("mixed", "random", "high", "mid", "low")


def level_names(k: int) -> tuple[str, ...]:
    """Readable names of K bins, low → high: ``low/mid/high`` for K = 3, ``bin0..`` otherwise."""
    return LEVEL_NAMES.get(k, tuple(f"bin{i}" for i in range(k)))


@dataclass
class Bin:
    """One memorization bin of a forget set.

    ``index`` is the bin's position among *all* K bins (0 = lowest band), so it selects the
    per-bin step of a RUM config even when other bins were empty and skipped. The bin holds the
    forget rows whose proxy value v satisfies ``low < v <= high`` (``low = -inf`` for the first
    band, ``high = +inf`` for the last).
    """

    index: int
    level: str
    rows: torch.Tensor  # train-split rows (int64, CPU), in the order of the forget set
    low: float
    high: float
    proxy_min: float
    proxy_median: float
    proxy_mean: float
    proxy_max: float

    def __len__(self) -> int:
        return len(self.rows)

    def to_dict(self) -> dict:
        """JSON-friendly summary (no rows; infinities become None)."""
        def f(x: float) -> float | None:
            return None if not np.isfinite(x) else float(x)

        return {
            "index": self.index, "level": self.level, "n": len(self.rows), "low": f(self.low), "high": f(self.high),
            "proxy_min": f(self.proxy_min), "proxy_median": f(self.proxy_median),
            "proxy_mean": f(self.proxy_mean), "proxy_max": f(self.proxy_max),
        }


def proxy_array(values: np.ndarray | torch.Tensor | Sequence[float], name: str = "proxy") -> np.ndarray:
    """Proxy values as float64. NaN marks a row without a value (its learning events were redacted
    by retention: worker/engine/events.py): whole-training-set statistics ignore it and
    :func:`known` refuses it where a row's own value is needed. Infinities, or no value at all,
    are errors."""
    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    v = v.astype(np.float64).reshape(-1)
    if len(v) == 0:
        raise ConfigError(f"{name}: no values")
    if np.isinf(v).any() or np.isnan(v).all():
        raise ConfigError(f"{name}: {int((~np.isfinite(v)).sum())} NaN or infinite value(s)")
    return v


def known(values: np.ndarray, rows: np.ndarray, name: str = "proxy") -> np.ndarray:
    """``values[rows]``, refusing rows without a value (NaN: learning events redacted)."""
    v = values[rows]
    if np.isnan(v).any():
        missing = np.asarray(rows)[np.isnan(v)]
        raise DatasetError(f"{name}: {len(missing)} row(s) have no value, e.g. rows {missing[:5].tolist()}: their "
                           "learning events were redacted when retention purged every version that held them")
    return v


def row_tensor(rows: torch.Tensor | np.ndarray | Sequence[int], n: int, name: str = "forget_rows") -> torch.Tensor:
    r = torch.as_tensor(np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows), dtype=torch.long)
    r = r.reshape(-1)
    if len(r) and (int(r.min()) < 0 or int(r.max()) >= n):
        raise ConfigError(f"{name}: rows must lie in [0, {n}), got [{int(r.min())}, {int(r.max())}]")
    return r


def check_quantiles(quantiles: Sequence[float], field: str = "quantiles") -> list[float]:
    q = [float(x) for x in quantiles]
    if any(not (0.0 < x < 1.0) for x in q):
        raise ConfigError(f"{field}: every quantile must lie strictly between 0 and 1, got {q}")
    if any(b <= a for a, b in zip(q, q[1:])):
        raise ConfigError(f"{field}: quantiles must be strictly increasing, got {q}")
    return q


def check_thresholds(thresholds: Sequence[float], field: str = "thresholds") -> list[float]:
    t = [float(x) for x in thresholds]
    if not all(np.isfinite(t)):
        raise ConfigError(f"{field}: thresholds must be finite, got {t}")
    if any(b <= a for a, b in zip(t, t[1:])):
        raise ConfigError(f"{field}: thresholds must be strictly increasing, got {t}")
    return t


def proxy_thresholds(
    proxy_values: np.ndarray | torch.Tensor, *, bins: int = DEFAULT_BINS, quantiles: Sequence[float] | None = None
) -> list[float]:
    """K − 1 cut points on the proxy scale: quantiles of the whole-train distribution.

    Default quantiles are equal-mass (1/K, …, (K−1)/K), i.e. tertiles for K = 3. Ties in a
    discrete proxy (e.g. binary accuracy) may give equal cut points; the band between them is
    then empty and :func:`refine` skips it.
    """
    v = proxy_array(proxy_values)
    if quantiles is None:
        if bins < 1:
            raise ConfigError(f"bins: need at least 1 bin, got {bins}")
        quantiles = [i / bins for i in range(1, bins)]
    q = check_quantiles(quantiles)
    return [float(x) for x in np.quantile(v[~np.isnan(v)], q)] if q else []


def refine(
    forget_rows: torch.Tensor | np.ndarray | Sequence[int],
    proxy_values: np.ndarray | torch.Tensor,
    *,
    bins: int = DEFAULT_BINS,
    quantiles: Sequence[float] | None = None,
    thresholds: Sequence[float] | None = None,
) -> list[Bin]:
    """Split ``forget_rows`` (train-split rows) into memorization bins, ordered low → high.

    ``proxy_values`` has one value per *training* row (higher = more memorized). Cut points come
    from, in order of precedence: explicit ``thresholds`` on the proxy scale (K − 1 increasing
    values), explicit ``quantiles`` of the whole-train distribution, or ``bins`` equal-mass
    quantiles (tertiles by default). A row with value v goes to band k when
    ``t[k-1] < v <= t[k]`` (a value on a cut point goes to the lower band, so the tied minimum of
    a discrete proxy stays "low"). Empty bands are skipped; every row lands in exactly one bin.

    [Choice] The paper's binning rule for an arbitrary forget set is unknown (its code only
    shows top/median/bottom selection over the train set). We cut on the *training* distribution,
    not within S, so a bin is a fixed memorization band (what the product policy names) and a
    homogeneous request is not split artificially into three.
    """
    v = proxy_array(proxy_values)
    if thresholds is not None:
        cuts = check_thresholds(thresholds)
    else:
        cuts = proxy_thresholds(v, bins=bins, quantiles=quantiles)
    return bin_by_cuts(forget_rows, v, cuts)


def bin_by_cuts(
    forget_rows: torch.Tensor | np.ndarray | Sequence[int], proxy_values: np.ndarray | torch.Tensor,
    cuts: Sequence[float],
) -> list[Bin]:
    """:func:`refine` with given cut points (non-decreasing; equal cuts leave an empty, skipped band)."""
    v = proxy_array(proxy_values)
    rows = row_tensor(forget_rows, len(v))
    cuts = [float(c) for c in cuts]
    if any(b < a for a, b in zip(cuts, cuts[1:])):
        raise ConfigError(f"thresholds: cut points must be non-decreasing, got {cuts}")
    k = len(cuts) + 1
    names = level_names(k)
    vals = known(v, rows.numpy())
    band = np.searchsorted(np.asarray(cuts, dtype=np.float64), vals, side="left")
    edges = [-np.inf, *cuts, np.inf]
    out = []
    for i in range(k):
        sel = band == i
        if not sel.any():
            continue
        bv = vals[sel]
        out.append(Bin(
            index=i, level=names[i], rows=rows[torch.from_numpy(sel)], low=float(edges[i]), high=float(edges[i + 1]),
            proxy_min=float(bv.min()), proxy_median=float(np.median(bv)), proxy_mean=float(bv.mean()),
            proxy_max=float(bv.max()),
        ))
    return out


# --------------------------------------------------------------------------- forget-set builders


def forget_subsets(
    proxy_values: np.ndarray | torch.Tensor, n_per_bin: int, *, seed: int = 0, center: float | None = None
) -> dict[str, torch.Tensor]:
    """RUM's three homogeneous subsets of the training set, disjoint, N rows each
    (docs/proxies-and-metrics.md#forget-sets-of-rums-experiments).

    * ``high`` = the N rows with the largest proxy (most memorized);
    * ``low`` = the N rows with the smallest proxy;
    * ``mid`` = the N rows closest to ``center`` (default: the median over the train set, as for
      proxies; pass 0.5 for true memorization scores) among the rows *not* already in high or
      low — [Deviation] so that the mixed set always has 3N distinct rows.

    Ties are broken by a seeded random permutation (not by row number), which matters for
    discrete proxies such as binary accuracy. Rows come back sorted.
    """
    v = proxy_array(proxy_values)
    have = np.flatnonzero(~np.isnan(v))
    if len(have) < len(v):  # rows without a value are never drawn
        return {k: torch.from_numpy(have[x.numpy()]).long()
                for k, x in forget_subsets(v[have], n_per_bin, seed=seed, center=center).items()}
    n = len(v)
    n_per_bin = int(n_per_bin)
    if n_per_bin < 1:
        raise ConfigError(f"n_per_bin: must be >= 1, got {n_per_bin}")
    if 3 * n_per_bin > n:
        raise ConfigError(f"n_per_bin: 3 x {n_per_bin} disjoint rows do not fit in {n} training rows")
    perm = np.random.default_rng(seed).permutation(n)
    order = perm[np.argsort(v[perm], kind="stable")]  # ascending, random tie order
    low, high = order[:n_per_bin], order[n - n_per_bin :]
    rest = order[n_per_bin : n - n_per_bin]
    c = float(np.median(v)) if center is None else float(center)
    mid = rest[np.argsort(np.abs(v[rest] - c), kind="stable")[:n_per_bin]]
    return {k: torch.from_numpy(np.sort(x)).long() for k, x in (("high", high), ("mid", mid), ("low", low))}


def build_forget_set(
    proxy_values: np.ndarray | torch.Tensor, n_per_bin: int, kind: str = "mixed", *, seed: int = 0,
    center: float | None = None,
) -> torch.Tensor:
    """Forget-set rows (sorted) as in RUM's experiments.

    ``mixed`` = high ∪ mid ∪ low (3N distinct rows, see :func:`forget_subsets`); ``random`` = 3N
    rows drawn uniformly without replacement (same size as mixed); ``high`` / ``mid`` / ``low`` =
    that subset alone (N rows).
    """
    if kind not in FORGET_KINDS:
        raise ConfigError(f"kind: unknown forget-set kind {kind!r}; known: {list(FORGET_KINDS)}")
    v = proxy_array(proxy_values)
    if kind == "random":
        size = 3 * int(n_per_bin)
        if not 1 <= size <= len(v):
            raise ConfigError(f"n_per_bin: 3 x {n_per_bin} rows do not fit in {len(v)} training rows")
        have = np.flatnonzero(~np.isnan(v))
        if size > len(have):
            raise ConfigError(f"n_per_bin: 3 x {n_per_bin} rows do not fit in {len(have)} training rows with a value")
        rows = have[np.random.default_rng(seed).choice(len(have), size=size, replace=False)] if len(have) < len(v) \
            else np.random.default_rng(seed).choice(len(v), size=size, replace=False)
        return torch.from_numpy(np.sort(rows)).long()
    subsets = forget_subsets(v, n_per_bin, seed=seed, center=center)
    if kind == "mixed":
        return torch.cat(list(subsets.values())).sort().values
    return subsets[kind]


# --------------------------------------------------------------------------- entanglement score


def _head(model: nn.Module) -> list[nn.Linear]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("model: entanglement needs an nn.Linear classification head; the model has none")
    return linears


@torch.no_grad()
def _embedding_batches(model: nn.Module, view: View, runtime: Runtime, batch_size: int = 1024):
    """Yield float32 (B, D) penultimate embeddings: the input of the last ``nn.Linear`` *called*.

    A forward pre-hook on every ``nn.Linear`` records the input of each call; the last call of a
    forward pass is the classifier head (for every built-in this is ``model.fc``; for user models
    it is right whenever the head is a linear layer, wherever it was registered).
    """
    linears = _head(model)
    seen: list[torch.Tensor] = []

    def hook(_module, args):
        seen.append(args[0])

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    was_training = model.training
    model.eval()
    try:
        for b in view.batches(batch_size):
            seen.clear()
            with runtime.autocast():
                model(runtime.inputs(b.x))
            if not seen:
                raise ConfigError("model: no nn.Linear layer was called in the forward pass")
            yield seen[-1].detach().float().flatten(1)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def embeddings(model: nn.Module, view: View, runtime: Runtime, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate embeddings φ(x) (float32, CPU), one row per view row."""
    parts = [e.cpu() for e in _embedding_batches(model, view, runtime, batch_size)]
    return torch.cat(parts) if parts else torch.empty(0)


def _moments(model: nn.Module, view: View, runtime: Runtime) -> tuple[torch.Tensor, float]:
    """Mean embedding μ and mean squared distance to it, in float64, streamed over batches."""
    total = None
    sq = 0.0
    n = 0
    for e in _embedding_batches(model, view, runtime):
        e = e.double()
        total = e.sum(0) if total is None else total + e.sum(0)
        sq += float((e * e).sum())
        n += len(e)
    if n == 0:
        raise ConfigError("entanglement: retain and forget views must both be non-empty")
    mu = (total / n).cpu()
    return mu, max(sq / n - float(mu @ mu), 0.0)


def entanglement_score(model: nn.Module, retain_view: View, forget_view: View, runtime: Runtime) -> float:
    """ES(R, F) with φ = penultimate embedding of ``model`` (usually the original)
    (docs/proxies-and-metrics.md#entanglement-score-es).

    ``[var_R + var_F] / [(||μ_R − μ||² + ||μ_F − μ||²) / 2]`` with μ = (μ_R + μ_F) / 2 and
    var_X = mean ||φ(x) − μ_X||². Higher = forget and retain are more entangled (harder to
    unlearn). Returns +inf when the two means coincide exactly.
    """
    mu_r, var_r = _moments(model, retain_view, runtime)
    mu_f, var_f = _moments(model, forget_view, runtime)
    mu = (mu_r + mu_f) / 2
    between = (float(((mu_r - mu) ** 2).sum()) + float(((mu_f - mu) ** 2).sum())) / 2
    if between == 0.0:
        return float("inf")
    return (var_r + var_f) / between
