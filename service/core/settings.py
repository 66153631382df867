"""Settings: one class, read from the environment (and from ``unlearnd serve`` flags).

Embedded default: everything under ``UNLEARND_DATA_DIR`` (SQLite database, SQLite broker, artifact
directory), created on first start. Production: the same code with ``DATABASE_URL``,
``BROKER_URL`` and ``ARTIFACT_DIR`` pointing at PostgreSQL, Redis and a shared volume.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20
GiB = 1 << 30


def _env(name: str) -> AliasChoices:
    return AliasChoices(name, f"UNLEARND_{name}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARND_", populate_by_name=True, extra="ignore",
                                      frozen=True)

    data_dir: Path = Path("unlearnd-data")
    database_url: str | None = Field(None, validation_alias=_env("DATABASE_URL"))
    broker_url: str | None = Field(None, validation_alias=_env("BROKER_URL"))
    artifact_dir: Path | None = Field(None, validation_alias=_env("ARTIFACT_DIR"))
    # The Ed25519 key (PKCS#8 PEM) that signs tree heads and erasure certificates; unset: the embedded
    # default's <data_dir>/signing-key.pem, created on first start (service/core/signing.py).
    signing_key: Path | None = Field(None, validation_alias=_env("SIGNING_KEY"))
    # The AES-256 key (a file holding the base64 of 32 random bytes) that encrypts webhook signing
    # secrets at rest: the API encrypts, the workers decrypt to sign, so all need the same one; unset:
    # the embedded default's <data_dir>/webhook-key, created on first use (service/core/webhooks.py).
    webhook_encryption_key: Path | None = Field(None, validation_alias=_env("WEBHOOK_ENCRYPTION_KEY"))

    # Upload limits: files are streamed to disk and refused once they pass these.
    max_upload_bytes: int = 2 * GiB
    max_train_samples: int = 2_000_000
    # A dataset or events file may inflate to at most this (checked from the zip's headers before
    # anything inflates); validating it takes about 1.3 times this much memory in the API process.
    max_dataset_bytes: int = 512 * MiB
    # Uploads validated at once per API process; the next one waits up to upload_wait_s, then is
    # answered 503 with Retry-After, so that a few large uploads cannot starve everything else.
    max_concurrent_uploads: int = 2
    upload_wait_s: float = 10.0
    # Lists: default and largest page size (MLflow's registered-models search: 100 / 1,000).
    page_size: int = 100
    max_page_size: int = 1000
    # A pending registration whose wake-up was lost (broker down, worker killed) is sent again
    # by the sweeper after this many seconds.
    redispatch_after_s: float = 60.0
    sweep_interval_s: float = 30.0
    # The transparency log's sequencer: how often beat runs it, and the most entries of a tenant it
    # integrates into one signed tree head (service/core/repo/transparency.py).
    sequence_interval_s: float = 2.0
    sequence_batch: int = 10_000
    # Webhooks (service/core/repo/webhooks.py, worker/webhooks.py): beat sends the delivery task every
    # webhook_interval_s (and a transaction that wrote messages sends it when it commits); an attempt
    # waits webhook_timeout_s for each read; a failed one is retried after webhook_retry_base_s,
    # doubling up to webhook_retry_max_s, and given up after webhook_max_attempts attempts.
    webhook_interval_s: float = 5.0
    webhook_timeout_s: float = 10.0
    webhook_retry_base_s: float = 10.0
    webhook_retry_max_s: float = 3600.0
    webhook_max_attempts: int = 12
    webhook_batch: int = 100  # messages claimed by one delivery run
    webhook_concurrency: int = 8  # attempts in flight at once in a run
    max_webhooks: int = 20  # endpoints per tenant: each event becomes one message per endpoint
    # Off: an endpoint may not be (or resolve to) a loopback, private, link-local (cloud metadata),
    # unique-local, multicast, unspecified or reserved address (service/core/webhooks.py
    # address_refusal). On: for receivers on the deployment's own network.
    webhook_allow_private: bool = False
    # Delivered and given-up messages leave the delivery log this many days after their last
    # attempt (the sweeper).
    webhook_delivery_retention_days: float = Field(30.0, ge=0)
    # The artifact store: the collector removes a blob no row references, and a staging file, once
    # neither was written (or leased by a writer of the same bytes) for this long; a writer, e.g. a
    # job holding its checkpoint until it publishes, has this long to commit the row that uses its
    # blob (service/core/repo/blobs.py).
    artifact_grace_s: float = Field(24 * 3600.0, gt=0)
    # How often beat runs the collector, a task of its own: it walks the whole store, and nothing
    # becomes collectable faster than artifact_grace_s, so not on every sweep.
    artifact_collect_interval_s: float = Field(3600.0, gt=0)
    # Jobs: a running job's worker touches heartbeat_at every job_heartbeat_s; a job whose heartbeat
    # is older than job_stale_after_s (its worker was killed) is taken over by the next delivery.
    job_heartbeat_s: float = 5.0
    job_stale_after_s: float = 60.0
    # A deletion request whose job failed goes back to pending until it took part in this many jobs.
    max_request_attempts: int = 3
    # Torch threads of a worker process, set once at start (0 = torch's default).
    worker_threads: int = 0
    log_level: str = "info"

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'unlearnd.sqlite3'}"

    @cached_property
    def optuna_storage_url(self) -> str | None:
        """Where calibration trials live (Optuna's RDB storage), in a namespace of their own: Optuna
        keeps its own ``alembic_version``, ``studies``, ``trials``… tables, which must not meet
        ours. PostgreSQL: schema ``optuna`` of the service database (created by the worker,
        ``service.core.db.ensure_optuna_schema``); SQLite: ``optuna.sqlite3`` beside the database file.
        Another database: None (trials kept in memory; a restarted calibration starts over)."""
        return optuna_storage_url(self.db_url)

    @cached_property
    def broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir.resolve() / 'broker.sqlite3'}"

    @cached_property
    def artifacts(self) -> Path:
        return (self.artifact_dir or self.data_dir / "artifacts").resolve()

    @property
    def embedded(self) -> bool:
        """True when any part runs on the embedded default (SQLite, SQLite broker) under data_dir."""
        return self.database_url is None or self.broker_url is None

    def ensure_dirs(self) -> None:
        if self.embedded:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(parents=True, exist_ok=True)

    def public(self) -> dict:
        """What the service may show about itself (no credentials)."""
        return {"database": _redact(self.db_url), "broker": _redact(self.broker), "artifacts": str(self.artifacts)}


OPTUNA_SCHEMA = "optuna"


def optuna_storage_url(db_url: str) -> str | None:
    """The Optuna storage URL for the service database ``db_url`` (see ``Settings.optuna_storage_url``)."""
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":
        options = " ".join(filter(None, [url.query.get("options"), f"-csearch_path={OPTUNA_SCHEMA}"]))
        return url.update_query_dict({"options": options}).render_as_string(hide_password=False)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return f"sqlite:///{Path(url.database).resolve().parent / 'optuna.sqlite3'}"
    return None


def _redact(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


