"""The tenant's audit log as a transparency log (docs/transparency.md): its entries, the signed
tree heads, inclusion and consistency proofs, the deployment's public key and the erasure
certificates of completed deletion requests."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import select

from service.api.deps import Auth, Ctx
from service.api.pagination import paginate, parse_page
from service.api.problems import MEDIA_TYPE
from service.core.errors import NotFound
from service.core.models import AuditEntry
from service.core.repo import audit, transparency

router = APIRouter(tags=["audit"])

Size = Annotated[int | None, Query(ge=1, le=2**53)]


def _problems(**statuses: str) -> dict[int | str, dict[str, Any]]:
    """Error answers a route documents itself (the OpenAPI installer keeps a route's own)."""
    return {int(s.removeprefix("s")): {"description": d, "content": {
        MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}} for s, d in statuses.items()}


@router.get("/v1/audit-log", summary="The tenant's audit log, oldest first, with each entry's leaf index and the "
                                     "newest signed tree head")
def list_audit_log(ctx: Ctx, caller: Auth, max_results: Annotated[int | None, Query()] = None,
                   page_token: str | None = None):
    page = parse_page(page_token, max_results, ctx.settings.page_size, ctx.settings.max_page_size)
    with ctx.db.session() as session:
        out = paginate(session, select(AuditEntry).where(AuditEntry.tenant_id == caller.tenant_id), AuditEntry.id,
                       page, render_page=lambda rows: audit.render_page(session, rows))
        try:
            out["tree_head"] = transparency.tree_head(session, caller.tenant_id)
        except NotFound:
            out["tree_head"] = None
    return out


@router.get("/v1/audit-log/tree-head", summary="The newest signed tree head (or the one of tree_size leaves)",
            responses=_problems(s404="no signed tree head (of that size) yet"))
def get_tree_head(ctx: Ctx, caller: Auth, tree_size: Size = None):
    with ctx.db.session() as session:
        return transparency.tree_head(session, caller.tenant_id, tree_size)


@router.get("/v1/audit-log/consistency-proof",
            summary="A consistency proof: the tree of `second` leaves (default: the newest) extends the tree of "
                    "`first` leaves; with both signed tree heads",
            responses=_problems(s404="no signed tree head of that size"))
def get_consistency_proof(ctx: Ctx, caller: Auth, first: Annotated[int, Query(ge=1, le=2**53)], second: Size = None):
    with ctx.db.session() as session:
        return transparency.consistency_proof(session, caller.tenant_id, first, second)


@router.get("/v1/audit-log/{entry_id}/inclusion-proof",
            summary="An entry's inclusion proof into a signed tree head (default: the newest)",
            responses=_problems(s409="the entry is not in the tree yet (the sequencer adds it within seconds)"))
def get_inclusion_proof(ctx: Ctx, caller: Auth, entry_id: int, tree_size: Size = None):
    with ctx.db.session() as session:
        return transparency.inclusion_proof(session, caller.tenant_id, entry_id, tree_size)


@router.get("/v1/public-key", summary="The deployment's Ed25519 public key (no authentication)",
            responses=_problems(s404="no signing key yet (the sequencer registers it when it first runs)",
                                s503="the database is unavailable"))
def get_public_key(ctx: Ctx):
    with ctx.db.session() as session:
        return transparency.public_key(session)


@router.get("/v1/deletion-requests/{request_id}/certificate",
            summary="The signed erasure certificate of a completed deletion request",
            responses=_problems(s409="the request is not completed, or its certificate is not signed yet"))
def get_certificate(ctx: Ctx, caller: Auth, request_id: int):
    with ctx.db.session() as session:
        return transparency.certificate(session, caller.tenant_id, request_id)
