"""Registration check of a model version: load the weights into the architecture, check the
policy with the engine, run the test split, record baseline accuracy; mark the version ``ready``
or ``invalid`` with the reason. Idempotent: a version that is no longer pending is skipped."""

from __future__ import annotations

import logging
import time

from service.core.models import Model, ModelVersion
from service.core.policy import Policy
from service.core.repo import models as model_repo
from service.core.repo import redaction
from service.core.statuses import VersionStatus

from .context import WorkerContext

log = logging.getLogger("unlearnd.worker")


def validate_version(ctx: WorkerContext, version_id: int) -> str | None:
    """Check one version; return its new status (None if it was not pending)."""
    with ctx.db.session() as s:
        v = s.get(ModelVersion, version_id)
        if v is None or v.status != VersionStatus.PENDING:
            return None
        model = s.get(Model, v.model_id)
        ds = model.dataset
        job = dict(spec=model.architecture, policy=model.policy, weights=v.checkpoint_sha256,
                   events=model.events_sha256, data=ds.sha256, mean=ds.mean, std=ds.std,
                   num_classes=ds.num_classes, has_holdout=ds.n_holdout > 0,
                   blank=redaction.redacted_rows(s, ds.id))
    try:
        ok, reason, metrics = check(ctx, **job)
    except Exception:
        with ctx.db.session() as s:
            if s.get(ModelVersion, version_id) is None:  # its model was deleted (and its files with it) meanwhile
                log.info("version %s was deleted while it was checked", version_id)
                return None
        raise
    with ctx.db.transaction() as s:
        if not model_repo.finish_registration(s, version_id, ok=ok, reason=reason, metrics=metrics):
            return None  # checked meanwhile by another delivery, or its model was deleted
    log.info("version %s is %s%s", version_id, "ready" if ok else "invalid", f": {reason}" if reason else "")
    return "ready" if ok else "invalid"


def check(ctx: WorkerContext, *, spec, policy, weights, events, data, mean, std, num_classes,
          has_holdout, blank=()) -> tuple[bool, str | None, dict | None]:
    """``blank``: training rows blanked in the dataset file (service/core/repo/redaction.py), left
    out of the training accuracy."""
    import torch

    from worker.engine import architectures, rum
    from worker.engine.data import load_dataset
    from worker.engine.errors import EngineError
    from worker.engine.proxies import check_proxy
    from worker.engine.runtime import Runtime
    from worker.engine.training import accuracy

    start = time.perf_counter()
    try:
        model = architectures.load_model(spec, ctx.store.local_path(weights))
        pol = Policy.model_validate(policy)
        try:
            rum.parse_policy(engine_policy(pol))
            if pol.proxy is not None:
                check_proxy(pol.proxy, pol.proxy_params, has_events=events is not None, has_holdout=has_holdout)
        except EngineError as exc:
            raise EngineError(f"policy.{exc}") from exc
        dataset = load_dataset(ctx.store.local_path(data), mean, std, num_classes=num_classes)
        runtime = Runtime.auto()
        model = runtime.prepare(model)
        dataset = dataset.to(runtime.device)
        try:
            test_acc = accuracy(model, dataset.view("test"), runtime)
            train_view = (dataset.forget_retain(torch.tensor(list(blank), dtype=torch.long))[1] if len(blank)
                          else dataset.view("train"))
            train_acc = accuracy(model, train_view, runtime)
            out_classes = int(architectures_output(model, dataset, runtime))
        except RuntimeError as exc:  # shapes that do not fit the architecture
            return False, f"architecture: the model cannot run on this dataset's inputs ({_first_line(exc)})", None
        if out_classes != num_classes:
            return False, (f"architecture: the model outputs {out_classes} classes, the dataset has "
                           f"{num_classes}"), None
    except EngineError as exc:
        return False, str(exc), None
    params = sum(p.numel() for p in model.parameters())
    return True, None, {"test_accuracy": test_acc, "train_accuracy": train_acc, "n_test": len(dataset.view("test")),
                        "n_train": len(train_view), "parameters": int(params),
                        "device": str(runtime.device), "seconds": round(time.perf_counter() - start, 3)}


def engine_policy(pol: Policy) -> dict:
    """The policy the engine's ``parse_policy`` takes: RUM without ``bins`` is the default pipeline
    (its bins, and its quantiles unless the policy gives cut points)."""
    from worker.engine.rum import default_rum_config

    out = pol.engine_policy()
    if out["method"] == "rum" and "bins" not in out:
        default = default_rum_config()
        out["bins"] = [b.to_dict() for b in default.bins]
        if "quantiles" not in out and "thresholds" not in out:
            out["quantiles"] = default.quantiles
    return out


def architectures_output(model, dataset, runtime) -> int:
    from worker.engine.runtime import predict

    return predict(model, dataset.view("test").head(2), runtime).shape[1]


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
