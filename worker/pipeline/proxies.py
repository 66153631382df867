"""The ``proxies`` stage: the memorization proxy of the base version, from the cache, carried from
an ancestor, or computed (the rule is in worker/proxy_cache.py)."""

from __future__ import annotations

import logging

import numpy as np

from service.core.models import Dataset, Model, ModelVersion
from service.core.policy import Policy

from .. import proxy_cache
from ..context import WorkerContext
from .loading import EngineInputs, Loaded
from .progress import Progress

log = logging.getLogger("unlearnd.worker")


def load_proxy(ctx: WorkerContext, progress: Progress, policy: Policy, model: Model, dataset: Dataset,
               base: ModelVersion, inputs: EngineInputs) -> proxy_cache.CachedProxy:
    """The policy's proxy (else the engine's default for what the model has: learning events, a
    holdout split) of ``base``; shared by deletion and calibration jobs."""
    from worker.engine.proxies import compute_proxy, default_proxy

    name = (proxy_cache.canonical(policy.proxy) if policy.proxy
            else default_proxy(inputs.events is not None, dataset.n_holdout > 0))
    params = dict(policy.proxy_params or {})

    def compute() -> tuple[np.ndarray, float]:
        computed = compute_proxy(name, inputs.base, inputs.data, inputs.runtime, events=inputs.events,
                                 ctx=progress.run_context(), **params)
        return computed.values, computed.seconds

    proxy = proxy_cache.get_or_compute(ctx, model_id=model.id, version=base.version, name=name,
                                       params=params, n_train=inputs.n_train, compute=compute)
    log.info("job %s: proxy %s (%s)", progress.lease.job_id, proxy.key, proxy.source)
    return proxy


def find(ctx: WorkerContext, progress: Progress, loaded: Loaded) -> proxy_cache.CachedProxy:
    """The stage: the proxy values of the job's base version (one per training row)."""
    record = loaded.record
    return load_proxy(ctx, progress, loaded.policy, record.model, record.dataset, record.base, loaded.inputs)


__all__ = ["find", "load_proxy"]
