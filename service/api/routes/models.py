"""``/v1/models``: register a model (version 1 is validated asynchronously by a worker), read its
versions, download checkpoints, move aliases; its policy revisions and calibrations."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Annotated

from fastapi import APIRouter, Body, File, Form, Header, Query, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from service.api.deps import Auth, Ctx
from service.api.pagination import paginate, parse_page
from service.api.problems import MEDIA_TYPE, Problem, bad_field, invalid
from service.api.routes.common import stored_upload
from service.api.schemas import (
    AliasesOut,
    AliasOut,
    JobOut,
    ModelOut,
    ModelPage,
    PolicyOut,
    PurgeOut,
    VersionOut,
    VersionPage,
)
from service.api.uploads import (
    check_architecture,
    check_events,
    check_extension,
    check_name,
    parse_json_field,
    read_safetensors_header,
)
from service.core import batching
from service.core.celery_app import REGISTER_VERSION
from service.core.models import Dataset, Job, ModelVersion
from service.core.policy import CalibrationRequest, Policy, is_pinned, parse_calibration, parse_policy
from service.core.repo import blobs, datasets, jobs, models, retention
from service.core.statuses import JobStatus
from worker.engine.catalog import NEEDS_EVENTS
from worker.engine.errors import ConfigError
from worker.engine.recipe import Recipe

router = APIRouter(prefix="/v1/models", tags=["models"])
BINARY = {"type": "string", "format": "binary"}


@router.post("", status_code=201, response_model=ModelOut,
             summary="Register a model; version 1 is pending until a worker validates it")
def create_model(
    ctx: Ctx, caller: Auth,
    name: Annotated[str, Form()],
    dataset_id: Annotated[int, Form()],
    architecture: Annotated[str, Form(description='JSON, e.g. {"name": "small_cnn", "kwargs": {"width": 16}}')],
    weights: Annotated[UploadFile, File(description="state dict as .safetensors")],
    events: Annotated[UploadFile | None, File(description="learning events .npz (optional)")] = None,
    policy: Annotated[str | None, Form(description="unlearning policy as JSON (optional)")] = None,
    recipe: Annotated[str | None, Form(description='training recipe as JSON (optional), e.g. {"epochs": 30, '
                                                   '"batch_size": 128, "lr": 0.05, "optimizer": "sgd"}; '
                                                   'missing fields are inferred')] = None,
):
    name = check_name(name)
    spec = check_architecture(parse_json_field("architecture", architecture, required=True))
    raw_policy = parse_json_field("policy", policy)
    policy_v = parse_policy(raw_policy)
    raw_recipe = parse_json_field("recipe", recipe)
    if raw_recipe is not None and not isinstance(raw_recipe, dict):
        raise invalid("recipe", "must be a JSON object")
    check_extension("weights", weights.filename, ".safetensors")
    if events is not None and events.filename:
        check_extension("events", events.filename, ".npz")
    else:
        events = None
    with ctx.db.session() as session:
        ds = session.scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == caller.tenant_id)
                            ) if 0 < dataset_id <= datasets.MAX_ID else None
        if ds is None:
            raise invalid("dataset_id", f"no dataset {dataset_id}")
        ids_train = datasets.sample_ids(session, ds.id) if events is not None else None
    recipe_v = check_recipe(raw_recipe, ds.n_train)
    if events is None and policy_v.proxy in NEEDS_EVENTS:
        raise invalid("policy.proxy", f"{policy_v.proxy!r} needs learning events; upload them as 'events'")
    with ExitStack() as stack:
        stack.enter_context(ctx.upload_slot())
        w = stack.enter_context(stored_upload(ctx, weights.file, "weights"))
        read_safetensors_header(w.staged.path, "weights")
        e = None
        if events is not None:
            e = stack.enter_context(stored_upload(ctx, events.file, "events"))
            check_events(e.staged.path, ids_train, ctx.settings.max_dataset_bytes, "events")
        with ctx.db.transaction() as session:
            model, version = models.create(
                session, caller, name=name, dataset_id=ds.id, architecture=spec, policy=policy_v.model_dump(),
                checkpoint_sha256=w.staged.sha256, checkpoint_size=w.staged.size,
                events_sha256=e.staged.sha256 if e else None, recipe=recipe_v.to_dict(),
                pinned=is_pinned(raw_policy))
            w.commit()
            if e:
                e.commit()
            body = models.render(session, model)
            version_id = version.id
    if ctx.dispatcher.send(REGISTER_VERSION, version_id):
        with ctx.db.transaction() as session:
            models.mark_dispatched(session, [version_id])
    return JSONResponse(body, status_code=201, headers={"Location": f"/v1/models/{body['id']}"})


def check_recipe(raw: dict | None, n_train: int) -> Recipe:
    """The recipe field of a registration, validated against the dataset (422 naming the field)."""
    given = (raw or {}).get("n_train")
    if given is not None and (isinstance(given, bool) or given != n_train):
        raise invalid("recipe.n_train", f"the dataset has {n_train} training rows, the recipe says {given!r}")
    try:
        return Recipe.from_dict(raw, n_train=n_train)
    except ConfigError as exc:
        msg = str(exc)
        field, sep, rest = msg.partition(": ")
        raise invalid(field, rest) if sep and " " not in field else invalid("recipe", msg) from None


@router.get("", response_model=ModelPage, summary="List models")
def list_models(ctx: Ctx, caller: Auth, name: str | None = None,
                max_results: Annotated[int | None, Query()] = None, page_token: str | None = None):
    page = parse_page(page_token, max_results, ctx.settings.page_size, ctx.settings.max_page_size)
    with ctx.db.session() as session:
        return paginate(session, models.query(caller, name), models.Model.id, page,
                        render_page=lambda rows: models.render_page(session, rows))


@router.get("/{model_id}", response_model=ModelOut, summary="Get a model")
def get_model(ctx: Ctx, caller: Auth, model_id: int):
    with ctx.db.session() as session:
        return models.render(session, models.get(session, caller, model_id))


@router.delete("/{model_id}", status_code=204,
               summary="Delete a model that took no deletion request and has no active job; frees its name")
def delete_model(ctx: Ctx, caller: Auth, model_id: int):
    with ctx.db.transaction() as session:
        digests = models.delete(session, caller, model_id)
    blobs.prune(ctx.db, ctx.store, digests)  # after the commit: a failed transaction removes nothing
    return Response(status_code=204)


@router.post("/{model_id}/purge", response_model=PurgeOut,
             summary="Purge now every version that holds erased samples, without waiting out the retention period")
def purge_versions(ctx: Ctx, caller: Auth, model_id: int):
    with ctx.db.transaction() as session:
        model = retention.lock_model(session, models.get(session, caller, model_id).id)
        done = retention.purge(session, ctx.store, model, actor=caller.actor, due_only=False)
    removed = blobs.prune(ctx.db, ctx.store, done.digests)  # after the commit: a failed transaction removes nothing
    return {"model_id": model_id, "purged": done.tombstones, "events": done.events, "dataset": done.dataset,
            "blobs_removed": removed}


@router.get("/{model_id}/versions", response_model=VersionPage, summary="List a model's versions")
def list_versions(ctx: Ctx, caller: Auth, model_id: int, max_results: Annotated[int | None, Query()] = None,
                  page_token: str | None = None):
    page = parse_page(page_token, max_results, ctx.settings.page_size, ctx.settings.max_page_size)
    with ctx.db.session() as session:
        recipe = models.recipe_of(models.get(session, caller, model_id))
        alias_map = models.aliases(session, model_id)
        return paginate(session, models.versions_query(model_id), ModelVersion.version, page,
                        lambda v: models.render_version(v, alias_map, recipe))


@router.get("/{model_id}/versions/{ref}", response_model=VersionOut, summary="Get a version by number or alias")
def get_version(ctx: Ctx, caller: Auth, model_id: int, ref: str):
    with ctx.db.session() as session:
        v = models.resolve(session, caller, model_id, ref)
        recipe = models.recipe_of(models.get(session, caller, model_id))
        return models.render_version(v, models.aliases(session, model_id), recipe)


@router.get("/{model_id}/versions/{ref}/checkpoint", summary="Download a version's weights (.safetensors)",
            response_class=StreamingResponse, responses={
                200: {"description": "the weights", "content": {"application/octet-stream": {"schema": BINARY}}},
                206: {"description": "the requested range", "content": {"application/octet-stream": {
                    "schema": BINARY}}},
                304: {"description": "not modified (If-None-Match holds the ETag)"},
                410: {"description": "the version was purged (retention): only its tombstone is left",
                      "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}})
def download_checkpoint(ctx: Ctx, caller: Auth, model_id: int, ref: str,
                        range_: Annotated[str | None, Header(alias="Range")] = None,
                        if_none_match: Annotated[str | None, Header()] = None):
    with ctx.db.session() as session:
        v = models.resolve(session, caller, model_id, ref)
        models.require_checkpoint(v)
        model = models.get(session, caller, model_id)
        sha, size, number = v.checkpoint_sha256, v.checkpoint_size, v.version
    etag = f'"{sha}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=31536000, immutable",
               "Content-Disposition": f'attachment; filename="{_filename(model.name, number)}"'}
    if if_none_match and (if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]):
        return Response(status_code=304, headers=headers)
    if not ctx.store.exists(sha):
        raise Problem(500, "Artifact missing", f"checkpoint {sha} of version {number} is not in the artifact store",
                      kind="artifact-missing")
    media = "application/octet-stream"
    if range_:
        start, end = _parse_range(range_, size)
        headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
        return StreamingResponse(ctx.store.iter_range(sha, start, end), status_code=206, media_type=media,
                                 headers=headers)
    headers["Content-Length"] = str(size)
    return StreamingResponse(ctx.store.iter_range(sha, 0, size - 1), media_type=media, headers=headers)


def _filename(name: str, version: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{safe}-v{version}.safetensors"


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """One ``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` range (RFC 9110, section 14.1.2)."""
    unsatisfiable = Problem(416, "Range not satisfiable", f"Range: {header!r} does not fit {size} bytes",
                            kind="range-not-satisfiable", field="Range", headers={"Content-Range": f"bytes */{size}"})
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        raise bad_field("Range", "only a single 'bytes=start-end' range is supported", status=416)
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                raise unsatisfiable
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        raise unsatisfiable from None
    if start < 0 or start >= size or end < start:
        raise unsatisfiable
    return start, min(end, size - 1)


@router.get("/{model_id}/aliases", response_model=AliasesOut, summary="A model's aliases")
def list_aliases(ctx: Ctx, caller: Auth, model_id: int):
    with ctx.db.session() as session:
        models.get(session, caller, model_id)
        return {"aliases": models.aliases(session, model_id)}


class AliasIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=2**31 - 1, description="a ready version of the model")


@router.put("/{model_id}/aliases/{alias}", response_model=AliasOut,
            summary="Point an alias (e.g. production) at a ready version")
def put_alias(ctx: Ctx, caller: Auth, model_id: int, alias: str, body: AliasIn):
    with ctx.db.transaction() as session:
        row = models.set_alias(session, caller, model_id, alias, body.version)
        return {"alias": row.alias, "version": row.version}


@router.delete("/{model_id}/aliases/{alias}", status_code=204, summary="Remove an alias")
def delete_alias(ctx: Ctx, caller: Auth, model_id: int, alias: str):
    with ctx.db.transaction() as session:
        models.delete_alias(session, caller, model_id, alias)
    return Response(status_code=204)


# --------------------------------------------------------------------------- policy and calibrations


@router.get("/{model_id}/policy", response_model=PolicyOut,
            summary="The model's current policy revision, where it came from, and every revision")
def get_policy(ctx: Ctx, caller: Auth, model_id: int):
    with ctx.db.session() as session:
        return models.render_policy(session, models.get(session, caller, model_id))


@router.post("/{model_id}/calibrations", status_code=202, response_model=JobOut,
             summary="Calibrate the model's unlearning policy (a job; its result is a new policy revision)")
def create_calibration(
    ctx: Ctx, caller: Auth, model_id: int,
    body: Annotated[CalibrationRequest | None, Body(description='optional: calibration fields overriding the '
                                                              'policy\'s, e.g. {"n_trials": 8}, and "apply"')] = None,
):
    # a field given as null is the policy's own value, like a field left out
    raw = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None} if body else None
    with ctx.db.transaction() as session:
        model = models.get(session, caller, model_id, lock=True)
        settings, apply = parse_calibration(raw, Policy.model_validate(model.policy).calibration)
        models.require_ready(session, model)
        job = jobs.create_calibration(session, model, settings=settings.model_dump(exclude={"auto"}), apply=apply,
                                      actor=caller.actor, trigger="api")
        job_id = job.id
        runs_now = session.scalar(select(Job.id).where(Job.model_id == model_id, Job.id < job_id,
                                                       Job.status.in_(JobStatus.ACTIVE)).limit(1)) is None
    if runs_now:  # else the job ahead of it sends its wake-up when it ends (and the sweeper does)
        batching.dispatch(ctx.db, ctx.dispatcher, job_id, "calibration")
    with ctx.db.session() as session:
        out = jobs.render(session.get(Job, job_id))
    return JSONResponse(out, status_code=202, headers={"Location": out["links"]["self"]})
