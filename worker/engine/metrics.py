"""Audit metrics (docs/proxies-and-metrics.md#audit-metrics): accuracies, SVC membership inference,
ToW, ToW-MIA, and more.

All accuracies are fractions in [0, 1]. ``mia`` is the SVC "forget efficacy" of the
SalUn/RUM code with the confidence feature p_y: the fraction of forget examples an RBF-SVC,
trained to tell retain (member) from test (non-member) examples, calls non-member. Higher means
more forgotten; compare it with the retrain reference, not with 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .data import View
from .runtime import Runtime, predict

MIA_FEATURES = ("confidence", "entropy")
# [Choice] The reference code fits the SVC on |test| retain + |test| test examples. SVC
# training is quadratic, so we cap each shadow side at this many examples (the first ones, as
# in the code); at 5,000 per side a fit takes a few seconds on CPU.
MAX_SHADOW = 5000


def probabilities(model: nn.Module, view: View, runtime: Runtime) -> torch.Tensor:
    return predict(model, view, runtime).softmax(1)


def mia_feature(probs: torch.Tensor, labels: torch.Tensor, feature: str) -> np.ndarray:
    if feature == "confidence":
        f = probs.gather(1, labels.view(-1, 1).cpu()).squeeze(1)
    elif feature == "entropy":
        f = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    else:
        raise ValueError(f"feature: unknown MIA feature {feature!r}; known: {MIA_FEATURES}")
    return f.numpy().astype(np.float64).reshape(-1, 1)


def svc_mia_efficacy(
    model: nn.Module, retain: View, test: View, forget: View, runtime: Runtime,
    features: Sequence[str] = MIA_FEATURES, max_shadow: int = MAX_SHADOW, seed: int = 0,
    logits: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """SVC MIA forget-efficacy per feature (docs/proxies-and-metrics.md#membership-inference-mia).

    Shadow-in: the first min(|test|, max_shadow) retain examples (label 1); shadow-out: the first
    as many test examples (label 0); SVC(C=3, gamma="auto", rbf); efficacy = 1 − mean(pred(F)).
    ``logits``: the model's logits on the whole ``retain`` / ``test`` / ``forget`` views where the
    caller has them (:func:`audit`); used where the shadow set is that whole view (the same
    ``predict`` call, so the same numbers), predicted here otherwise.
    """
    from sklearn.svm import SVC

    n = min(len(test), len(retain), max_shadow)
    if n == 0 or len(forget) == 0:
        return {f: float("nan") for f in features}
    known = logits or {}
    shadow_in, shadow_out = retain.head(n), test.head(n)

    def probs(key: str, whole: View, view: View) -> torch.Tensor:
        if key in known and len(view) == len(whole):
            return known[key].softmax(1)
        return probabilities(model, view, runtime)

    p_in = probs("retain", retain, shadow_in)
    p_out = probs("test", test, shadow_out)
    p_f = probs("forget", forget, forget)
    out = {}
    rng = np.random.default_rng(seed)
    for feat in features:
        x = np.concatenate([mia_feature(p_in, shadow_in.y, feat), mia_feature(p_out, shadow_out.y, feat)])
        y = np.concatenate([np.ones(n), np.zeros(n)])
        perm = rng.permutation(len(y))
        clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x[perm], y[perm])
        pred = clf.predict(mia_feature(p_f, forget.y, feat))
        out[feat] = float(1.0 - pred.mean())
    return out


def audit(
    model: nn.Module, forget: View, retain: View, test: View, runtime: Runtime, *, mia: bool = True,
    max_shadow: int = MAX_SHADOW,
) -> dict[str, float]:
    """Forget / retain / test accuracy and (optionally) MIA efficacy with both features."""
    accs, logits = {}, {}
    for name, view in (("forget", forget), ("retain", retain), ("test", test)):
        if len(view) == 0:
            accs[f"acc_{name}"] = float("nan")
            continue
        logits[name] = predict(model, view, runtime)
        accs[f"acc_{name}"] = (logits[name].argmax(1) == view.y.cpu()).float().mean().item()
    if mia:  # the attack reuses these forward passes where its sets are the whole views
        m = svc_mia_efficacy(model, retain, test, forget, runtime, max_shadow=max_shadow, logits=logits)
        accs["mia"] = m["confidence"]
        accs["mia_entropy"] = m["entropy"]
    return accs


def tow(u: Mapping[str, float], r: Mapping[str, float]) -> float:
    """Tug-of-war: product of (1 − |Δacc|) on forget, retain and test versus retrain
    (docs/proxies-and-metrics.md#tow-and-tow-mia)."""
    return (
        (1 - abs(u["acc_forget"] - r["acc_forget"]))
        * (1 - abs(u["acc_retain"] - r["acc_retain"]))
        * (1 - abs(u["acc_test"] - r["acc_test"]))
    )


def tow_mia(u: Mapping[str, float], r: Mapping[str, float]) -> float:
    """ToW-MIA: as ToW with the forget-accuracy term replaced by the MIA efficacy gap."""
    return (
        (1 - abs(u["mia"] - r["mia"]))
        * (1 - abs(u["acc_retain"] - r["acc_retain"]))
        * (1 - abs(u["acc_test"] - r["acc_test"]))
    )


def fraction_changed(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """Fraction of trainable-parameter entries (floating tensors, BN buffers excluded) that changed."""
    changed = total = 0
    for k, b in before.items():
        if not b.is_floating_point() or "running_" in k:
            continue
        a = after[k].detach().to(b.device)
        changed += int((a != b).sum())
        total += b.numel()
    return changed / total if total else 0.0


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t-interval (as RUM's analysis: t.ppf(0.975, n−1) · sem)."""
    from scipy import stats

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * stats.sem(v)
    return float(v.mean()), float(half)
