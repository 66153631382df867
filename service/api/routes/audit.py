"""``/v1/audit-log``: the tenant's append-only, hash-chained record of every action."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from service.api.deps import Auth, Ctx
from service.api.pagination import paginate, parse_page
from service.core.models import AuditEntry
from service.core.repo import audit

router = APIRouter(prefix="/v1/audit-log", tags=["audit"])


@router.get("", summary="The tenant's audit log, oldest first, with the hash chain's integrity")
def list_audit_log(ctx: Ctx, caller: Auth, max_results: Annotated[int | None, Query()] = None,
                   page_token: str | None = None):
    page = parse_page(page_token, max_results, ctx.settings.page_size, ctx.settings.max_page_size)
    with ctx.db.session() as session:
        out = paginate(session, select(AuditEntry).where(AuditEntry.tenant_id == caller.tenant_id), AuditEntry.id,
                       page, audit.render)
        intact, first_bad = audit.verify(session, caller.tenant_id)
    out["chain"] = {"intact": intact, "first_bad_entry": first_bad}
    return out
