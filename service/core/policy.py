"""A model's unlearning policy: what the API stores and validates, with its defaults.

The envelope (batching, audit, guardrails, calibration, method and proxy names) is validated
here, without torch. The unlearning part (``method``, ``hparams`` or RUM's ``bins``/``quantiles``/``thresholds``,
``proxy_params``) is handed to the engine, which checks every hyperparameter in the worker: a
policy the engine rejects makes the registration ``invalid`` with the engine's reason.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.fields import FieldInfo

from service.core.errors import Invalid, invalid
from worker.engine.catalog import DEFAULT_CORRECTIVE, METHODS, PROXIES, PROXY_ALIASES
from worker.engine.errors import ConfigError
from worker.engine.hparams import check_hparams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Batching(_Strict):
    """A job starts when ``max_requests`` requests are pending, or the oldest waited ``max_wait_s``."""

    max_requests: int = Field(32, ge=1, le=100_000)
    max_wait_s: float = Field(60.0, ge=0, le=30 * 86400)


class AuditOptions(_Strict):
    """``reference = retrain`` also retrains from scratch without the forget set (costly) and
    reports ToW and ToW-MIA against it."""

    reference: Literal["none", "retrain"] = "none"


class Guardrails(_Strict):
    """Largest allowed drops (absolute, in accuracy) of a job's new version against its base;
    a job that breaks one publishes its version but does not move ``production``."""

    max_test_drop: float = Field(0.05, ge=0, le=1)
    max_retain_drop: float = Field(0.05, ge=0, le=1)


class Retention(_Strict):
    """How long a superseded version that still holds erased samples is kept: ``purge_after_days``
    after the first later version that erased some of its samples was published, its checkpoint and
    derived caches are purged (service/core/repo/retention.py); 0 purges them as soon as that
    version is published."""

    purge_after_days: int = Field(30, ge=0, le=36_500)


class Calibration(_Strict):
    """Per-model calibration (worker/calibration.py): a search of the unlearning policy against a
    retrain reference on calibration forget sets drawn from the training set. ``auto`` runs one after
    registration (once version 1 is ready); ``POST /v1/models/{id}/calibrations`` runs one on demand
    and may override every other field for that run."""

    auto: bool = False
    forget_fraction: float = Field(0.06, ge=0.005, le=0.25)  # size of each calibration forget set (share of train)
    n_trials: int = Field(16, ge=1, le=500)  # Optuna trials, at most
    # per-deletion-job cost cap, share of a retrain: what the search may plan, and what a job may
    # spend with guard retries (worker/engine/policies.py JOB_COST_CAP)
    cost_cap: float = Field(0.10, gt=0, le=1)
    max_retrains: float = Field(3.0, gt=0, le=100)  # calibration budget in retrain-equivalents
    space: Literal["rum", "plain"] = "rum"  # RUM (method per bin, budget, lr scale, cut points) or one method

    def engine_settings(self, seed: int) -> dict[str, Any]:
        """What ``worker.engine.calibration.CalibrationSettings.from_dict`` takes."""
        return {**self.model_dump(exclude={"auto"}), "seed": seed}


class Corrective(_Strict):
    """Deletion requests whose ``reason`` is in ``reasons`` name rows whose *labels are wrong*. A
    retrain disagrees with every such row, however memorized, so they skip RUM's refinement and
    are unlearned first, in one step, with ``method`` and ``hparams`` (worker/engine/rum.py). The
    default (``method`` null) is the engine's: each row relabeled to the class the model ranks
    next after its label, fine-tuned with the retain set (docs/unlearning.md#corrupted-rows);
    ``hparams`` alone are merged over the default's. ``reasons: []`` turns it off: such rows then
    go through the policy as erasures do."""

    reasons: list[Literal["mislabeled", "poisoned", "other"]] = Field(
        default_factory=lambda: ["mislabeled", "poisoned"], max_length=3)
    method: str | None = None
    hparams: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> Corrective:
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; known: {list(METHODS)}")
        method, hparams = self.engine_config().values()
        _check_hparams(method, hparams, "hparams")
        return self

    def engine_config(self) -> dict[str, Any]:
        """``{"method", "hparams"}`` as the engine's ``PlainConfig`` takes them."""
        if self.method is None:
            return {"method": DEFAULT_CORRECTIVE[0], "hparams": {**DEFAULT_CORRECTIVE[1], **(self.hparams or {})}}
        return {"method": self.method, "hparams": dict(self.hparams or {})}


CALIBRATION_SCHEMA = "unlearnd.calibration/1"  # the report of a calibration job


def payback(cost_retrains: float | None, default_share: float | None, calibrated_share: float | None) -> dict:
    """After how many deletion jobs a calibration has paid for itself: its cost (in retrain-
    equivalents) over what each job saves (the uncalibrated default's cost share of a retrain minus
    the calibrated policy's, both measured on the calibration's check set). No saving: it bought
    quality, not speed."""
    saving = (default_share - calibrated_share) if default_share is not None and calibrated_share is not None \
        else None
    jobs = None
    if cost_retrains is not None and saving is not None and saving > 1e-9:
        jobs = max(1, math.ceil(cost_retrains / saving - 1e-9))
    if jobs is not None:
        summary = (f"pays for itself after {jobs} deletion job(s): it cost {cost_retrains:.2f} retrain(s), each job "
                   f"saves {saving:.3f} of a retrain ({default_share:.3f} → {calibrated_share:.3f})")
    elif saving is None or cost_retrains is None:
        summary = "cost saving unknown"
    else:
        summary = (f"buys quality, not speed: a calibrated job costs {calibrated_share:.3f} of a retrain, the "
                   f"uncalibrated default {default_share:.3f}; the calibration cost {cost_retrains:.2f} retrain(s)")
    return {"calibration_retrains": cost_retrains, "default_job_share": default_share,
            "calibrated_job_share": calibrated_share, "saving_per_job": saving, "jobs": jobs, "summary": summary}


# The policy fields that say how to unlearn (the rest is the envelope). A calibration replaces
# exactly these; a registration that sets any of them, other than ``"method": "rum"`` alone, pins
# the policy.
UNLEARNING_FIELDS = ("method", "hparams", "bins", "quantiles", "thresholds")


def is_pinned(raw: Any) -> bool:
    """Did the user say how to unlearn? A plain method, hyperparameters, RUM bins or cut points pin
    the policy (a calibration then records its result without applying it, unless asked to);
    ``{"method": "rum"}`` alone or no unlearning field leaves it to the defaults and calibration."""
    if not isinstance(raw, dict):
        return False
    if raw.get("method", "rum") != "rum":
        return True
    return any(raw.get(k) is not None for k in ("hparams", "bins", "quantiles", "thresholds"))


class Policy(_Strict):
    method: str = "rum"
    hparams: dict[str, Any] | None = None
    bins: list[Any] | None = None
    quantiles: list[float] | None = None
    thresholds: list[float] | None = None
    proxy: str | None = None  # None: the engine's default for what the model has (events, holdout)
    proxy_params: dict[str, Any] | None = None
    seed: int = Field(0, ge=0, le=2**31 - 1)
    batching: Batching = Field(default_factory=Batching)
    audit: AuditOptions = Field(default_factory=AuditOptions)
    guardrails: Guardrails = Field(default_factory=Guardrails)
    calibration: Calibration = Field(default_factory=Calibration)
    retention: Retention = Field(default_factory=Retention)
    corrective: Corrective = Field(default_factory=Corrective)

    @model_validator(mode="after")
    def _names(self) -> Policy:
        if self.method != "rum" and self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; known: ['rum', {str(list(METHODS))[1:]}")
        if self.method == "rum" and self.hparams is not None:
            raise ValueError("hparams: RUM takes per-bin hyperparameters in bins[i].hparams")
        if self.method != "rum" and (self.bins, self.quantiles, self.thresholds) != (None, None, None):
            raise ValueError("bins: bins, quantiles and thresholds belong to method 'rum'")
        if self.method != "rum":
            _check_hparams(self.method, self.hparams, "hparams")
        for i, b in enumerate(self.bins or []):
            name = b if isinstance(b, str) else b.get("method") if isinstance(b, dict) else None
            if name not in METHODS:
                raise ValueError(f"bins[{i}].method: unknown method {name!r}; known: {list(METHODS)}")
            if isinstance(b, dict):
                _check_hparams(name, b.get("hparams"), f"bins[{i}].hparams")
        if self.proxy is not None and self.proxy not in PROXIES and self.proxy not in PROXY_ALIASES:
            raise ValueError(f"proxy: unknown proxy {self.proxy!r}; known: {list(PROXIES)}")
        return self

    def engine_policy(self) -> dict[str, Any]:
        """The part the engine's ``parse_policy`` takes (RUM without ``bins``: the default pipeline)."""
        if self.method != "rum":
            return {"method": self.method, "hparams": dict(self.hparams or {})}
        out: dict[str, Any] = {"method": "rum"}
        for key in ("bins", "quantiles", "thresholds"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def retention_of(policy: dict[str, Any]) -> Retention:
    """A stored policy's retention (policies stored before it existed have the default)."""
    return Retention.model_validate((policy or {}).get("retention") or {})


def _check_hparams(method: str, hparams: Any, field: str) -> None:
    """The engine's own schema (worker/engine/hparams.py), so a value the worker would refuse is a
    422 at registration, not an invalid version minutes later."""
    try:
        check_hparams(method, hparams)
    except ConfigError as exc:
        raise ValueError(str(exc).replace("hyperparameters", field, 1)) from None


def with_unlearning(policy: dict[str, Any], engine_policy: dict[str, Any]) -> Policy:
    """``policy`` (a stored policy) with its unlearning part replaced by an engine policy (e.g. a
    calibration's result: ``{"method": "rum", "bins": [...], "quantiles": [...]}``); the envelope
    (proxy, seed, batching, audit, guardrails, calibration) is kept."""
    kept = {k: v for k, v in policy.items() if k not in UNLEARNING_FIELDS}
    new = {k: engine_policy[k] for k in UNLEARNING_FIELDS if engine_policy.get(k) is not None}
    return Policy.model_validate({**kept, **new})


def parse_policy(raw: Any, field: str = "policy") -> Policy:
    if raw is None:
        return Policy()
    if not isinstance(raw, dict):
        raise invalid(field, "must be a JSON object")
    return validate_model(Policy, raw, field)


class _StrictTypes(BaseModel):
    """A JSON body read as written: no extra key, and no coercion (0 is not false, "8" is not 8)."""
    model_config = ConfigDict(extra="forbid", strict=True)


def _calibration_request() -> type[BaseModel]:
    """The body of ``POST /v1/models/{id}/calibrations``: any field of :class:`Calibration` (same
    types and bounds, all optional) and ``apply``; nothing else."""
    fields: dict[str, Any] = {name: (info.annotation | None, FieldInfo.merge_field_infos(info, default=None))
                              for name, info in Calibration.model_fields.items()}
    fields["apply"] = (bool | None, Field(None, description="true: make the result current even on a pinned "
                                                          "policy; false: only record it; absent: apply "
                                                          "unless the policy is pinned"))
    return create_model("CalibrationRequest", __base__=_StrictTypes, **fields)


CalibrationRequest = _calibration_request()


def parse_calibration(raw: Any, base: Calibration, field: str = "calibration") -> tuple[Calibration, bool | None]:
    """The body of ``POST /v1/models/{id}/calibrations``: calibration fields overriding the model's
    (``base``), plus ``apply`` (true: make the result current even on a pinned policy; false:
    only record it; absent: apply unless the policy is pinned)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise invalid(field, "must be a JSON object")
    raw = dict(raw)
    apply = raw.pop("apply", None)
    if apply is not None and not isinstance(apply, bool):
        raise invalid("apply", "must be true, false or absent")
    return validate_model(Calibration, {**base.model_dump(), **raw}, field), apply


def validate_model(cls: type[BaseModel], raw: dict, field: str):
    """``cls.model_validate(raw)``, or a 422 naming each bad field as ``<field>.<path>``."""
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        errors = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            inner, sep, rest = msg.partition(": ")
            if sep and " " not in inner:  # a model-level check naming its own field (relative to loc)
                loc, msg = f"{loc}.{inner}" if loc else inner, rest
            errors.append({"field": f"{field}.{loc}" if loc else field, "message": msg})
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise Invalid(detail, errors=errors) from None
