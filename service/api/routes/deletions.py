"""Deletion requests, batching (flush), jobs and their reports."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select

from service.api.deps import Auth, Bearer, Ctx
from service.api.pagination import paginate, parse_page
from service.api.problems import Problem, bad_field
from service.api.schemas import DeletionRequestOut, DeletionRequestPage, FlushOut, JobOut, JobPage, SampleStatusOut
from service.core import batching
from service.core.models import DeletionRequest, ForgottenSample, Job, Model
from service.core.repo import datasets, deletions, jobs, models, redaction, retention
from service.core.report import CalibrationReport, JobReport
from service.core.statuses import JobStatus, RequestStatus

router = APIRouter(tags=["deletions"])


class DeletionRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_ids: list[str | int] = Field(min_length=1, max_length=deletions.MAX_SAMPLES_PER_REQUEST,
                                        description="ids from the dataset's ids_train")
    reason: Literal[deletions.REASONS]  # type: ignore[valid-type]
    subject_ref: str | None = Field(None, min_length=1, max_length=512,
                                    description="pseudonymous subject reference; only its hash is stored")

    @field_validator("sample_ids")
    @classmethod
    def _ids(cls, v: list[str | int]) -> list[str | int]:
        if any(isinstance(s, bool) or (isinstance(s, str) and not s) for s in v):
            raise ValueError("sample ids must be non-empty strings or integers")
        return v


# at least one character that is not white space: a blank key is a client bug, not a key
IDEMPOTENCY_KEY = Header(min_length=1, max_length=255, pattern=r"\S")


@router.post("/v1/models/{model_id}/deletion-requests", status_code=202, response_model=DeletionRequestOut,
             summary="Ask a model to forget samples (committed before the answer; batched into a job)")
def create_deletion_request(bearer: Bearer, model_id: int, body: DeletionRequestIn,
                            idempotency_key: Annotated[str | None, IDEMPOTENCY_KEY] = None):
    """One connection. On PostgreSQL without an Idempotency-Key, two statements in autocommit, sent
    by psycopg itself (service/core/db.py ``DriverStatement``): the key with the model, what is known
    of the samples and the model's batching backlog, then the request, its samples and its audit-log
    entry, written and committed by one statement (atomic by itself, durable when it returns: no
    BEGIN and COMMIT round trips); otherwise one transaction
    (with a key: its advisory lock, the look for an earlier request with it, the INSERTs, the
    commit). Then, when this request may have made a batch due (by the backlog the first query saw;
    on SQLite always), the look whether one is: after the commit, so that it sees every request
    committed before it (service/core/batching.py ``may_complete_a_batch`` says what this misses
    and what claims it then)."""
    ctx = bearer.ctx
    sample_ids = [str(s) for s in body.sample_ids]
    fp = deletions.fingerprint(model_id, sample_ids, body.reason, body.subject_ref)
    if idempotency_key is not None and not idempotency_key.strip():
        raise bad_field("Idempotency-Key", "must not be empty", status=400)
    replayed = due = False
    with ctx.db.connect() as connection:
        autocommit = idempotency_key is None and deletions.writes_in_one_statement(connection)
        if autocommit:
            # on the connection itself, every statement committing on its own: no ORM session (nothing
            # here is an ORM object) and no BEGIN or COMMIT round trips
            connection = ctx.db.autocommit(connection)
            caller, target = deletions.caller_and_target(connection, bearer.key, bearer.prefix, model_id, sample_ids)
            req = deletions.create(connection, caller, target, sample_ids=sample_ids, reason=body.reason,
                                   subject_ref=body.subject_ref, idempotency_key=None, fp=fp)
            out = deletions.render(connection, req)
        else:
            with ctx.db.transaction(connection) as session:
                caller, target = deletions.caller_and_target(session, bearer.key, bearer.prefix, model_id,
                                                             sample_ids)
                existing = None
                if idempotency_key:
                    deletions.lock_idempotency_key(session, caller, idempotency_key)
                    existing = deletions.by_idempotency_key(session, caller, idempotency_key)
                if existing is not None:
                    req, replayed = deletions.replay(existing, fp), True
                else:
                    req = deletions.create(session, caller, target, sample_ids=sample_ids, reason=body.reason,
                                           subject_ref=body.subject_ref, idempotency_key=idempotency_key, fp=fp)
                out = deletions.render(session, req)
        if (not replayed and out["status"] == RequestStatus.RECEIVED
                and batching.may_complete_a_batch(target.backlog)):
            due = batching.maybe_due(connection if autocommit else ctx.db.autocommit(connection), model_id)
    if due and batching.claim_and_dispatch(ctx.db, ctx.dispatcher, model_id) is not None:
        with ctx.db.session() as session:
            out = deletions.render(session, deletions.get(session, caller, out["id"]))
    headers = {"Location": out["links"]["self"], "Retry-After": "5"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(out, status_code=202, headers=headers)


@router.get("/v1/deletion-requests/{request_id}", response_model=DeletionRequestOut,
            summary="A deletion request: status, job, resulting version")
def get_deletion_request(ctx: Ctx, caller: Auth, request_id: int):
    with ctx.db.session() as session:
        return deletions.render(session, deletions.get(session, caller, request_id))


@router.get("/v1/models/{model_id}/deletion-requests", response_model=DeletionRequestPage,
            summary="A model's deletion requests")
def list_deletion_requests(ctx: Ctx, caller: Auth, model_id: int, status: RequestStatus | None = None,
                           max_results: Annotated[int | None, Query()] = None, page_token: str | None = None):
    page = parse_page(page_token, max_results, ctx.settings.page_size, ctx.settings.max_page_size)
    with ctx.db.session() as session:
        models.get(session, caller, model_id)
        return paginate(session, deletions.query(caller, model_id, status), DeletionRequest.id, page,
                        render_page=lambda rows: deletions.render_page(session, rows))


@router.post("/v1/models/{model_id}/flush", status_code=202, response_model=FlushOut,
             summary="Batch what is pending now into a job")
def flush(ctx: Ctx, caller: Auth, model_id: int):
    with ctx.db.session() as session:
        models.get(session, caller, model_id)
    job = batching.claim_and_dispatch(ctx.db, ctx.dispatcher, model_id, force=True)
    with ctx.db.session() as session:
        if job is None:
            active = session.scalar(select(Job).where(Job.model_id == model_id, Job.status.in_(JobStatus.ACTIVE))
                                    .order_by(Job.id).limit(1))
            remembered = session.scalar(select(Model.flush_requested_at).where(Model.id == model_id)) is not None
            detail = ("nothing pending" if active is None else
                      f"job {active.id} is active: the pending requests are batched as soon as it ends" if remembered
                      else f"nothing pending (job {active.id} is active)")
            return JSONResponse({"job": jobs.render(active) if active else None, "created": False,
                                 "detail": detail}, status_code=202)
        out = jobs.render(session.get(Job, job.id))
    return JSONResponse({"job": out, "created": True}, status_code=202, headers={"Location": out["links"]["self"]})


@router.get("/v1/jobs/{job_id}", response_model=JobOut, summary="A job: status, stage, progress, timings, error")
def get_job(ctx: Ctx, caller: Auth, job_id: int):
    with ctx.db.session() as session:
        return jobs.render(jobs.get(session, caller, job_id))


@router.get("/v1/models/{model_id}/jobs", response_model=JobPage, summary="A model's jobs")
def list_jobs(ctx: Ctx, caller: Auth, model_id: int, status: JobStatus | None = None,
              kind: Annotated[Literal["deletion", "calibration"] | None, Query()] = None,
              max_results: Annotated[int | None, Query()] = None, page_token: str | None = None):
    page = parse_page(page_token, max_results, ctx.settings.page_size, ctx.settings.max_page_size)
    with ctx.db.session() as session:
        models.get(session, caller, model_id)
        return paginate(session, jobs.query(caller, model_id, status, kind), Job.id, page, jobs.render)


@router.post("/v1/jobs/{job_id}/cancel", status_code=202, response_model=JobOut,
             summary="Cancel a job (it publishes nothing)")
def cancel_job(ctx: Ctx, caller: Auth, job_id: int):
    with ctx.db.transaction() as session:
        return JSONResponse(jobs.render(jobs.cancel(session, caller, job_id)), status_code=202)


# The reports are served as the worker stored them, byte for byte: their sha256 digests are the job's
# and the audit log's (docs/report.md). The page is never rendered here (the API imports no
# rendering); a job published before pages were stored has none.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
                "X-Content-Type-Options": "nosniff"}


def _stored(ctx, caller, job_id: int, page: bool) -> tuple[str, bytes]:
    with ctx.db.session() as session:
        job = jobs.get(session, caller, job_id)
        sha, page_sha, status = job.report_sha256, job.report_html_sha256, job.status
    if sha is None and status in JobStatus.ACTIVE:
        raise Problem(409, "Report not ready", f"job {job_id} is {status}: its report is stored when it succeeds",
                      kind="report-not-ready", job_status=status)
    if sha is None:  # failed, canceled, or succeeded without publishing: no report will ever exist
        raise Problem(404, "No report", f"job {job_id} is {status} and has no report: a report is stored only "
                      "when a job publishes", kind="no-report", job_status=status)
    if page and page_sha is None:
        raise Problem(404, "No stored report page",
                      f"job {job_id} was published before report pages were stored with the job, so it has none "
                      f"(a page rendered now would not be the one its audit-log entry records); its JSON report "
                      f"is at /v1/jobs/{job_id}/report", kind="report-page-not-stored")
    digest = page_sha if page else sha
    with ctx.store.open(digest) as f:
        return digest, f.read()


@router.get("/v1/jobs/{job_id}/report", summary="The job's audit report (JSON, as stored)",
            response_class=Response,
            responses={200: {"description": "the stored report: a JobReport (unlearnd.report/2, or /1 for jobs "
                                            "published before it) or a CalibrationReport",
                             "model": JobReport | CalibrationReport}})
def get_report(ctx: Ctx, caller: Auth, job_id: int):
    digest, body = _stored(ctx, caller, job_id, page=False)
    return Response(body, media_type="application/json", headers={"ETag": f'"{digest}"'})


@router.get("/v1/jobs/{job_id}/report.html", response_class=HTMLResponse,
            summary="The job's report page, as the worker rendered and stored it when the job published")
def get_report_html(ctx: Ctx, caller: Auth, job_id: int):
    digest, body = _stored(ctx, caller, job_id, page=True)
    return HTMLResponse(body, headers={"ETag": f'"{digest}"', **PAGE_HEADERS})


@router.get("/v1/models/{model_id}/samples/{sample_id}", response_model=SampleStatusOut,
            summary="Which versions of a model still contain a training sample, and when they will be purged")
def sample_status(ctx: Ctx, caller: Auth, model_id: int, sample_id: str):
    with ctx.db.session() as session:
        model = models.get(session, caller, model_id)
        row = datasets.sample_row(session, model.dataset_id, sample_id)
        if row is None:
            raise Problem(404, "Not found", f"sample {sample_id!r} is not in model {model_id}'s training set",
                          kind="not-found")
        gone = session.get(ForgottenSample, (model_id, row))
        held = retention.sample_versions(session, model_id, gone.version if gone else None)
        in_file = redaction.file_status(session, model.dataset_id, row)
        requests = list(session.scalars(
            select(DeletionRequest.id).join(deletions.DeletionRequestSample,
                                            deletions.DeletionRequestSample.request_id == DeletionRequest.id)
            .where(DeletionRequest.model_id == model_id, deletions.DeletionRequestSample.row == row)
            .order_by(DeletionRequest.id)))
    return {"model_id": model_id, "sample_id": sample_id, "forgotten": gone is not None,
            "forgotten_in_version": gone.version if gone else None, "forgotten_by_job": gone.job_id if gone else None,
            **held, "deletion_requests": requests, "dataset_file": in_file}
