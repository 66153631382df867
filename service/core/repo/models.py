"""Models, their immutable versions and movable aliases."""

from __future__ import annotations

import re

from sqlalchemy import delete as sql_delete
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, lazyload

from service.core.auth import Caller
from service.core.errors import Conflict, Gone, conflict, invalid, not_found
from service.core.models import (
    DeletionRequest,
    ForgottenSample,
    Job,
    Model,
    ModelAlias,
    ModelVersion,
    PolicyRevision,
    ProxyCacheEntry,
    utcnow,
)
from service.core.repo import audit, redaction
from service.core.repo.common import iso, retire
from service.core.repo.datasets import MAX_ID
from service.core.statuses import JobStatus, VersionStatus

ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
SYSTEM_ALIASES = ("latest",)  # moved by the service to the newest ready version


def get(session: Session, caller: Caller, model_id: int, *, lock: bool = False, dataset: bool = True) -> Model:
    """The caller's model, with its dataset (``dataset=False``: loaded only if read)."""
    q = select(Model).where(Model.id == model_id, Model.tenant_id == caller.tenant_id)
    q = q if dataset else q.options(lazyload(Model.dataset))
    row = session.scalar(q.with_for_update(of=Model) if lock else q) if 0 < model_id <= MAX_ID else None
    if row is None:
        raise not_found(f"model {model_id}")
    return row


def query(caller: Caller, name: str | None = None):
    q = select(Model).where(Model.tenant_id == caller.tenant_id)
    return q.where(Model.name == name) if name else q


def create(session: Session, caller: Caller, *, name: str, dataset_id: int, architecture: dict, policy: dict,
           checkpoint_sha256: str, checkpoint_size: int, events_sha256: str | None, recipe: dict | None = None,
           pinned: bool = False) -> tuple[Model, ModelVersion]:
    """Insert the model, its policy revision 1 and its version 1 (``pending`` until the registration
    task validates it)."""
    if session.scalar(select(Model.id).where(Model.tenant_id == caller.tenant_id, Model.name == name)):
        raise conflict(f"name: a model named {name!r} exists already", field="name")
    redaction.share_file(session, dataset_id)
    model = Model(tenant_id=caller.tenant_id, name=name, dataset_id=dataset_id, architecture=architecture,
                  policy=policy, policy_revision=1, policy_pinned=pinned, recipe=recipe, events_sha256=events_sha256)
    session.add(model)
    try:
        session.flush()
    except IntegrityError:
        raise conflict(f"name: a model named {name!r} exists already", field="name") from None
    session.add(PolicyRevision(model_id=model.id, revision=1, policy=policy, source="registration", applied=True))
    version = ModelVersion(model_id=model.id, version=1, status=VersionStatus.PENDING,
                           checkpoint_sha256=checkpoint_sha256, checkpoint_size=checkpoint_size, method="upload")
    session.add(version)
    session.flush()
    audit.record(session, caller.tenant_id, caller.actor, "model.registered", f"model:{model.id}",
                 {"name": name, "dataset_id": dataset_id, "architecture": architecture,
                  "checkpoint_sha256": checkpoint_sha256, "events_sha256": events_sha256, "recipe": recipe,
                  "policy_pinned": pinned})
    return model, version


def require_ready(session: Session, model: Model) -> None:
    """409 unless the model has a ready version to unlearn from or calibrate (deletion requests and
    calibrations): version 1 is still waiting for its check (``model-not-ready``), or was found
    invalid and never will be ready (``model-invalid``: register the model again)."""
    if session.scalar(select(ModelVersion.id).where(ModelVersion.model_id == model.id,
                                                    ModelVersion.status == VersionStatus.READY).limit(1)):
        return
    first = session.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == 1))
    if first is not None and first.status == VersionStatus.INVALID:
        raise Conflict(f"model {model.id} has no ready version and never will: version 1 was found invalid "
                       f"({first.status_reason or 'no reason recorded'}); register the model again with corrected "
                       f"files (deleting model {model.id} frees its name {model.name!r})", title="Model invalid",
                       kind="model-invalid", version_status=first.status, status_reason=first.status_reason)
    raise Conflict(f"model {model.id} has no ready version yet (version 1 is checked by a worker after "
                   "registration)", title="Model not ready", kind="model-not-ready")


def delete(session: Session, caller: Caller, model_id: int) -> set[str]:
    """Delete a model nothing depends on, with its versions, aliases, policy revisions, (calibration)
    jobs and proxy cache entries, in the caller's transaction; the audit log records it. Returns the
    artifacts those rows referenced (the caller removes the ones no other row references once the
    transaction committed: service/core/repo/blobs.py).

    A model that took deletion requests is kept: it and its versions are the evidence of those
    erasures (which versions still contain a sample, the reports the audit log's hashes sign). A
    model with a queued or running job is kept until the job ends (or is canceled)."""
    model = get(session, caller, model_id, lock=True)
    n_requests = session.scalar(select(func.count()).select_from(DeletionRequest)
                                .where(DeletionRequest.model_id == model_id))
    n_evidence = n_requests or session.scalar(select(func.count()).select_from(ForgottenSample).where(
        ForgottenSample.model_id == model_id)) or session.scalar(select(func.count()).select_from(Job).where(
            Job.model_id == model_id, Job.kind == "deletion"))
    if n_evidence:
        raise Conflict(f"model {model_id} took {n_requests} deletion request(s): the model and its versions are the "
                       "record of those erasures and cannot be deleted", title="Model holds erasure records",
                       kind="model-has-deletion-requests", n_deletion_requests=n_requests)
    active = session.scalar(select(Job.id).where(Job.model_id == model_id, Job.status.in_(JobStatus.ACTIVE))
                            .order_by(Job.id).limit(1))
    if active is not None:
        raise Conflict(f"model {model_id} has an active job ({active}): cancel it or wait until it ends",
                       title="Model busy", kind="model-busy", job_id=active)
    versions = list(session.scalars(versions_query(model_id).order_by(ModelVersion.version)))
    jobs = list(session.scalars(select(Job).where(Job.model_id == model_id).order_by(Job.id)))
    version_ids = [v.id for v in versions]
    proxies = set(session.scalars(select(ProxyCacheEntry.sha256).where(
        ProxyCacheEntry.model_version_id.in_(version_ids)))) if version_ids else set()
    blobs = ({v.checkpoint_sha256 for v in versions} | {model.events_sha256} | proxies
             | {j.report_sha256 for j in jobs} | {j.report_html_sha256 for j in jobs}) - {None}
    details = {"name": model.name, "dataset_id": model.dataset_id,
               "checkpoints": [{"version": v.version, "status": v.status, "sha256": v.checkpoint_sha256}
                               for v in versions],
               "events_sha256": model.events_sha256, "jobs": [j.id for j in jobs],
               "policy_revision": model.policy_revision}
    # children first: policy revisions and versions point at jobs, jobs and the rest at the model
    if version_ids:
        session.execute(sql_delete(ProxyCacheEntry).where(ProxyCacheEntry.model_version_id.in_(version_ids)))
    for table in (ModelAlias, PolicyRevision, ModelVersion, Job):
        session.execute(sql_delete(table).where(table.model_id == model_id))
    session.delete(model)
    session.flush()
    retire(session, "models", [model_id])
    retire(session, "jobs", [j.id for j in jobs])
    audit.record(session, caller.tenant_id, caller.actor, "model.deleted", f"model:{model_id}", details)
    return blobs


def versions_query(model_id: int):
    return select(ModelVersion).where(ModelVersion.model_id == model_id)


def get_version(session: Session, caller: Caller, model_id: int, version: int) -> ModelVersion:
    get(session, caller, model_id)
    row = session.scalar(select(ModelVersion).where(ModelVersion.model_id == model_id,
                                                    ModelVersion.version == version)) if version <= MAX_ID else None
    if row is None:
        raise not_found(f"version {version} of model {model_id}")
    return row


def resolve(session: Session, caller: Caller, model_id: int, ref: str) -> ModelVersion:
    """A version by number or by alias (``latest``, ``production``, …)."""
    if ref.isascii() and ref.isdigit():  # str.isdigit() also takes '²' and other digits int() refuses
        return get_version(session, caller, model_id, int(ref))
    get(session, caller, model_id)
    alias = session.get(ModelAlias, (model_id, ref))
    if alias is None:
        raise not_found(f"alias {ref!r} of model {model_id}")
    return get_version(session, caller, model_id, alias.version)


def require_checkpoint(v: ModelVersion) -> None:
    """410 for a purged version: its checkpoint left the artifact store, the row is a tombstone
    (service/core/repo/retention.py)."""
    if v.status == VersionStatus.PURGED:
        raise Gone(f"version {v.version} of model {v.model_id} was purged at {iso(v.purged_at)}: {v.purge_reason}",
                   title="Version purged", kind="version-purged", version=v.version,
                   checkpoint_sha256=v.checkpoint_sha256, purged_at=iso(v.purged_at), purge_reason=v.purge_reason)


def aliases(session: Session, model_id: int) -> dict[str, int]:
    rows = session.scalars(select(ModelAlias).where(ModelAlias.model_id == model_id).order_by(ModelAlias.alias))
    return {a.alias: a.version for a in rows}


def set_alias(session: Session, caller: Caller, model_id: int, alias: str, version: int) -> ModelAlias:
    get(session, caller, model_id, lock=True)
    if not ALIAS_RE.match(alias):
        raise invalid("alias", "1 to 64 characters: lowercase letters, digits, '-' and '_', starting with a letter")
    if alias in SYSTEM_ALIASES:
        raise invalid("alias", f"{alias!r} is moved by the service to the newest ready version")
    target = session.scalar(select(ModelVersion).where(ModelVersion.model_id == model_id,
                                                       ModelVersion.version == version)) if version <= MAX_ID else None
    if target is None:
        raise invalid("version", f"model {model_id} has no version {version}")
    if target.status != VersionStatus.READY:
        raise conflict(f"version: version {version} is {target.status}, only a ready version can be aliased",
                       field="version")
    row = session.get(ModelAlias, (model_id, alias))
    before = row.version if row else None
    if row is None:
        row = ModelAlias(model_id=model_id, alias=alias, version=version)
        session.add(row)
    else:
        row.version = version
        row.updated_at = utcnow()
    session.flush()
    audit.record(session, caller.tenant_id, caller.actor, "alias.moved", f"model:{model_id}",
                 {"alias": alias, "from": before, "to": version})
    return row


def delete_alias(session: Session, caller: Caller, model_id: int, alias: str) -> None:
    get(session, caller, model_id, lock=True)
    if alias in SYSTEM_ALIASES:
        raise invalid("alias", f"{alias!r} is moved by the service and cannot be deleted")
    row = session.get(ModelAlias, (model_id, alias))
    if row is None:
        raise not_found(f"alias {alias!r} of model {model_id}")
    session.delete(row)
    audit.record(session, caller.tenant_id, caller.actor, "alias.deleted", f"model:{model_id}",
                 {"alias": alias, "was": row.version})


def move_alias(session: Session, model_id: int, alias: str, version: int) -> None:
    """Point ``alias`` at ``version`` (worker side: no caller, the version is known to be ready)."""
    row = session.get(ModelAlias, (model_id, alias))
    if row is None:
        session.add(ModelAlias(model_id=model_id, alias=alias, version=version))
    elif row.version != version:
        row.version = version
        row.updated_at = utcnow()
    session.flush()


def finish_registration(session: Session, version_id: int, *, ok: bool, reason: str | None,
                        metrics: dict | None) -> bool:
    """Mark a pending version ``ready`` (moving ``latest``, and ``production`` for version 1) or
    ``invalid``. Idempotent: a version that is no longer pending is left alone (returns False)."""
    done = session.execute(
        update(ModelVersion).where(ModelVersion.id == version_id, ModelVersion.status == VersionStatus.PENDING)
        .values(status=VersionStatus.READY if ok else VersionStatus.INVALID, status_reason=reason, metrics=metrics,
                updated_at=utcnow()))
    if done.rowcount != 1:
        return False
    version = session.get(ModelVersion, version_id)
    model = session.get(Model, version.model_id)
    if ok:
        move_alias(session, model.id, "latest", version.version)
        if version.version == 1:
            move_alias(session, model.id, "production", 1)
    audit.record(session, model.tenant_id, "worker", "version.validated" if ok else "version.invalid",
                 f"model:{model.id}/version:{version.version}", {"reason": reason, "metrics": metrics})
    if ok and version.version == 1 and (model.policy.get("calibration") or {}).get("auto"):
        from service.core.repo.jobs import create_calibration  # the sweeper sends its wake-up if the caller's is lost

        create_calibration(session, model, settings=model.policy["calibration"], apply=None, actor="worker",
                           trigger="auto")
    return True


def pending_registrations(session: Session, older_than) -> list[int]:
    """Versions still pending whose wake-up went out before ``older_than`` (or never)."""
    stale = ModelVersion.dispatched_at.is_(None) | (ModelVersion.dispatched_at < older_than)
    q = select(ModelVersion.id).where(ModelVersion.status == VersionStatus.PENDING, ModelVersion.job_id.is_(None),
                                      stale)
    return list(session.scalars(q))


def mark_dispatched(session: Session, version_ids: list[int]) -> None:
    if version_ids:
        session.execute(update(ModelVersion).where(ModelVersion.id.in_(version_ids)).values(dispatched_at=utcnow()))


def checkpoint_url(model_id: int, version: int) -> str:
    return f"/v1/models/{model_id}/versions/{version}/checkpoint"


def recipe_of(m: Model) -> dict:
    """The model's training recipe as shown (``inferred`` lists the fields that were not given)."""
    from worker.engine.recipe import Recipe

    if m.recipe is not None:
        return m.recipe
    return Recipe.infer(m.dataset.n_train).to_dict()


def render_version(v: ModelVersion, alias_map: dict[str, int] | None = None, recipe: dict | None = None) -> dict:
    return {"model_id": v.model_id, "version": v.version, "status": v.status, "status_reason": v.status_reason,
            "parent_version": v.parent_version, "job_id": v.job_id, "recipe": recipe,
            "aliases": sorted(a for a, n in (alias_map or {}).items() if n == v.version),
            "checkpoint": {"sha256": v.checkpoint_sha256, "size_bytes": v.checkpoint_size,
                           "url": checkpoint_url(v.model_id, v.version)},
            "method": v.method, "config": v.config, "metrics": v.metrics, "seconds": v.seconds,
            "n_forgotten": v.n_forgotten, "created_at": iso(v.created_at), "updated_at": iso(v.updated_at),
            "purged_at": iso(v.purged_at), "purge_reason": v.purge_reason}


def render(session: Session, m: Model) -> dict:
    return render_page(session, [m])[0]


def render_page(session: Session, page: list[Model]) -> list[dict]:
    """The models as shown, with their aliases and newest versions read in two queries for the page."""
    ids = [m.id for m in page]
    alias_maps: dict[int, dict[str, int]] = {i: {} for i in ids}
    newest: dict[int, ModelVersion] = {}
    if ids:
        for row in session.scalars(select(ModelAlias).where(ModelAlias.model_id.in_(ids))
                                   .order_by(ModelAlias.model_id, ModelAlias.alias)):
            alias_maps[row.model_id][row.alias] = row.version
        numbers = (select(ModelVersion.model_id, func.max(ModelVersion.version).label("version"))
                   .where(ModelVersion.model_id.in_(ids)).group_by(ModelVersion.model_id).subquery())
        newest = {v.model_id: v for v in session.scalars(select(ModelVersion).join(
            numbers, (ModelVersion.model_id == numbers.c.model_id) & (ModelVersion.version == numbers.c.version)))}
    return [_render(m, alias_maps[m.id], newest.get(m.id)) for m in page]


def _render(m: Model, alias_map: dict[str, int], last: ModelVersion | None) -> dict:
    recipe = recipe_of(m)
    return {"id": m.id, "name": m.name, "dataset_id": m.dataset_id, "architecture": m.architecture,
            "recipe": recipe, "policy": m.policy, "policy_revision": m.policy_revision,
            "policy_pinned": m.policy_pinned, "has_events": m.events_sha256 is not None, "aliases": alias_map,
            "latest_version": render_version(last, alias_map, recipe) if last else None,
            "created_at": iso(m.created_at),
            "links": {"self": f"/v1/models/{m.id}", "policy": f"/v1/models/{m.id}/policy",
                      "calibrations": f"/v1/models/{m.id}/calibrations", "jobs": f"/v1/models/{m.id}/jobs"}}


# --------------------------------------------------------------------------- policy revisions


def revisions(session: Session, model_id: int) -> list[PolicyRevision]:
    return list(session.scalars(select(PolicyRevision).where(PolicyRevision.model_id == model_id)
                                .order_by(PolicyRevision.revision)))


def add_revision(session: Session, model: Model, policy: dict, *, source: str, job_id: int | None = None,
                 scores: dict | None = None, apply: bool) -> PolicyRevision:
    """A new policy revision of ``model`` (the model row locked by the caller); ``apply`` makes it
    the current one (``models.policy``, which later deletion jobs take)."""
    number = (session.scalar(select(func.max(PolicyRevision.revision))
                             .where(PolicyRevision.model_id == model.id)) or 0) + 1
    rev = PolicyRevision(model_id=model.id, revision=number, policy=policy, source=source, job_id=job_id,
                         scores=scores, applied=apply)
    session.add(rev)
    if apply:
        model.policy, model.policy_revision = policy, number
    session.flush()
    return rev


def render_revision(r: PolicyRevision, current: int) -> dict:
    return {"revision": r.revision, "current": r.revision == current, "source": r.source, "job_id": r.job_id,
            "applied": r.applied, "scores": r.scores, "created_at": iso(r.created_at),
            "links": {"job": f"/v1/jobs/{r.job_id}" if r.job_id else None,
                      "report": f"/v1/jobs/{r.job_id}/report" if r.job_id else None}}


def render_policy(session: Session, m: Model) -> dict:
    """``GET /v1/models/{id}/policy``: the current revision, where it came from, and every revision."""
    revs = revisions(session, m.id)
    current = next((r for r in revs if r.revision == m.policy_revision), None)
    active = session.scalar(select(Job).where(Job.model_id == m.id, Job.kind == "calibration",
                                              Job.status.in_(JobStatus.ACTIVE)).limit(1))
    return {"model_id": m.id, "revision": m.policy_revision, "pinned": m.policy_pinned, "policy": m.policy,
            **({k: v for k, v in render_revision(current, m.policy_revision).items()
                if k in ("source", "job_id", "scores", "created_at")} if current else {}),
            "n_revisions": len(revs),
            "revisions": [{**render_revision(r, m.policy_revision), "policy": r.policy} for r in revs],
            "calibration_job": f"/v1/jobs/{active.id}" if active else None}

