"""A model's unlearning policy: what the API stores and validates, with its defaults.

The envelope (batching, audit, guardrails, method and proxy names) is validated here, without
torch. The unlearning part (``method``, ``hparams`` or RUM's ``bins``/``quantiles``/``thresholds``,
``proxy_params``) is handed to the engine, which checks every hyperparameter in the worker: a
policy the engine rejects makes the registration ``invalid`` with the engine's reason.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.engine.catalog import METHODS, PROXIES, PROXY_ALIASES

from .problems import Problem


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

    @model_validator(mode="after")
    def _names(self) -> Policy:
        if self.method != "rum" and self.method not in METHODS:
            raise ValueError(f"method: unknown method {self.method!r}; known: ['rum', {str(list(METHODS))[1:]}")
        if self.method == "rum" and self.hparams is not None:
            raise ValueError("hparams: RUM takes per-bin hyperparameters in bins[i].hparams")
        if self.method != "rum" and (self.bins, self.quantiles, self.thresholds) != (None, None, None):
            raise ValueError("bins: bins, quantiles and thresholds belong to method 'rum'")
        for i, b in enumerate(self.bins or []):
            name = b if isinstance(b, str) else b.get("method") if isinstance(b, dict) else None
            if name not in METHODS:
                raise ValueError(f"bins[{i}].method: unknown method {name!r}; known: {list(METHODS)}")
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


def parse_policy(raw: Any, field: str = "policy") -> Policy:
    if raw is None:
        return Policy()
    if not isinstance(raw, dict):
        raise Problem(422, "Invalid input", f"{field}: must be a JSON object", kind="invalid-input", field=field)
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        errors = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            inner, sep, rest = msg.partition(": ")
            if not loc and sep and " " not in inner:  # a model-level check naming its own field
                loc, msg = inner, rest
            errors.append({"field": f"{field}.{loc}" if loc else field, "message": msg})
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        raise Problem(422, "Invalid input", detail, kind="invalid-input", errors=errors) from None
