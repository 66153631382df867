"""Webhook endpoints of the tenant and their delivery log (docs/api.md#webhooks).

A secret is shown in the answer that sets it only (registration, rotation) and stored encrypted
under the deployment's webhook key (service/core/webhooks.py SecretBox). A rotation keeps the
secret it replaces signing for a grace period (``grace_seconds``)."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from service.api.deps import Auth, Ctx
from service.api.pagination import paginate, parse_page
from service.api.problems import Problem
from service.api.schemas import WebhookCreatedOut, WebhookDeliveryOut, WebhookDeliveryPage, WebhookOut, WebhookPage
from service.core import webhooks as standard
from service.core.models import WebhookDelivery, WebhookEndpoint
from service.core.repo import webhooks
from service.core.statuses import DeliveryStatus

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
log = logging.getLogger("unlearnd.api")
NO_STORE = {"Cache-Control": "no-store"}  # an answer that carries a secret

# What the schema can say of a URL (service/core/webhooks.py check_url says the rest: a port that is
# a number, no user name, password or fragment)
URL_PATTERN = r"^[Hh][Tt][Tt][Pp][Ss]?://[^\s/?#@]+([/?][^\s#]*)?$"
EventType = Literal[standard.EVENT_TYPES]  # type: ignore[valid-type]


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=standard.MAX_URL_LENGTH, pattern=URL_PATTERN,
                     description="an absolute http:// or https:// URL, without user name, password or fragment")
    events: list[EventType] = Field(min_length=1, max_length=len(standard.EVENT_TYPES),
                                    description="the event types to send")
    secret: str | None = Field(None, min_length=1, max_length=128, pattern=r"^whsec_[A-Za-z0-9+/]+={0,2}$",
                               description="whsec_ and the base64 of 24 to 64 random bytes; "
                                           "left out: the service makes one and shows it once")
    description: str | None = Field(None, max_length=200)


class RotateSecretIn(BaseModel):
    """The body of rotate-secret, optional: left out (or empty), the default grace period."""
    model_config = ConfigDict(extra="forbid")

    grace_seconds: StrictInt = Field(standard.DEFAULT_GRACE_S, ge=0, le=standard.MAX_GRACE_S,
                                     description="how long the secret being replaced keeps signing next to the "
                                                 "new one (both signatures in webhook-signature), 0 to 604800 "
                                                 "(7 days); 0 drops it at once")


class WebhookPatch(BaseModel):
    """The fields to change; those left out keep their value (``description``: null removes it)."""
    model_config = ConfigDict(extra="forbid")

    # left out: None, and unchanged; null is refused (naming the field) like any value that is not one
    url: str = Field(None, min_length=1, max_length=standard.MAX_URL_LENGTH, pattern=URL_PATTERN,  # type: ignore[assignment]
                     description=WebhookIn.model_fields["url"].description)
    events: list[EventType] = Field(None, min_length=1, max_length=len(standard.EVENT_TYPES),  # type: ignore[assignment]
                                    description="the event types to send, instead of the endpoint's")
    description: str | None = Field(None, max_length=200)


def _secret_box(ctx) -> standard.SecretBox:
    """The deployment's webhook key, or 503 (the reason goes to the log, not to the tenant)."""
    try:
        return standard.load_box(ctx.settings)
    except standard.SecretKeyError as exc:
        log.error("webhook secrets cannot be encrypted: %s", exc)
        raise Problem(503, "Service unavailable", "the deployment's webhook key is unavailable, so no secret can "
                      "be stored; nothing was changed", kind="webhook-key-unavailable") from None


@router.post("", status_code=201, response_model=WebhookCreatedOut,
             summary="Register a webhook endpoint (its secret is shown in this answer only)")
def create_webhook(ctx: Ctx, caller: Auth, body: WebhookIn):
    box = _secret_box(ctx)
    with ctx.db.transaction() as session:
        row, secret = webhooks.create(session, caller, url=body.url, event_types=list(body.events),
                                      secret=body.secret, description=body.description,
                                      limit=ctx.settings.max_webhooks, box=box,
                                      allow_private=ctx.settings.webhook_allow_private)
        out = webhooks.render(row, secret=secret)
    return JSONResponse(out, status_code=201, headers={"Location": out["links"]["self"], **NO_STORE})


@router.get("", response_model=WebhookPage, summary="List webhook endpoints")
def list_webhooks(ctx: Ctx, caller: Auth, max_results: Annotated[int | None, Query()] = None,
                  page_token: str | None = None):
    page = parse_page(page_token, max_results, ctx.settings.page_size, ctx.settings.max_page_size)
    with ctx.db.session() as session:
        return paginate(session, webhooks.query(caller), WebhookEndpoint.id, page, webhooks.render)


@router.get("/{webhook_id}", response_model=WebhookOut, summary="Get a webhook endpoint")
def get_webhook(ctx: Ctx, caller: Auth, webhook_id: int):
    with ctx.db.session() as session:
        return webhooks.render(webhooks.get(session, caller, webhook_id))


@router.patch("/{webhook_id}", response_model=WebhookOut,
              summary="Change a webhook endpoint's URL, events or description (checked as at registration)")
def update_webhook(ctx: Ctx, caller: Auth, webhook_id: int, body: WebhookPatch):
    given = body.model_fields_set
    changes = {field: getattr(body, name) for name, field in (("url", "url"), ("events", "event_types"),
                                                                ("description", "description")) if name in given}
    if "event_types" in changes:
        changes["event_types"] = list(changes["event_types"])
    with ctx.db.transaction() as session:
        row = webhooks.update(session, caller, webhook_id, allow_private=ctx.settings.webhook_allow_private,
                              **changes)
        return webhooks.render(row)


@router.post("/{webhook_id}/rotate-secret", response_model=WebhookCreatedOut,
             summary="Give the endpoint a new secret (shown in this answer only); the old one keeps signing "
                     "next to it for grace_seconds")
def rotate_webhook_secret(ctx: Ctx, caller: Auth, webhook_id: int, body: RotateSecretIn | None = None):
    grace_seconds = (body or RotateSecretIn()).grace_seconds
    box = _secret_box(ctx)
    with ctx.db.transaction() as session:
        row, secret = webhooks.rotate_secret(session, caller, webhook_id, box=box, grace_seconds=grace_seconds)
        out = webhooks.render(row, secret=secret)
    return JSONResponse(out, headers=NO_STORE)


@router.delete("/{webhook_id}", status_code=204,
               summary="Remove a webhook endpoint with its delivery log (messages not sent yet are dropped)")
def delete_webhook(ctx: Ctx, caller: Auth, webhook_id: int):
    with ctx.db.transaction() as session:
        webhooks.delete(session, caller, webhook_id)
    return Response(status_code=204)


@router.get("/{webhook_id}/deliveries", response_model=WebhookDeliveryPage,
            summary="The endpoint's delivery log, oldest first: event, status, attempts, last answer, next attempt")
def list_deliveries(ctx: Ctx, caller: Auth, webhook_id: int, status: DeliveryStatus | None = None,
                    max_results: Annotated[int | None, Query()] = None, page_token: str | None = None):
    page = parse_page(page_token, max_results, ctx.settings.page_size, ctx.settings.max_page_size)
    with ctx.db.session() as session:
        webhooks.get(session, caller, webhook_id)
        return paginate(session, webhooks.deliveries(caller, webhook_id, status), WebhookDelivery.id,
                        page, webhooks.render_delivery)


@router.post("/{webhook_id}/test", status_code=202, response_model=WebhookDeliveryOut,
             summary="Send a webhook.test message to the endpoint (delivered like any other)")
def test_webhook(ctx: Ctx, caller: Auth, webhook_id: int):
    with ctx.db.transaction() as session:
        out = webhooks.render_delivery(webhooks.send_test(session, caller, webhook_id))
    return JSONResponse(out, status_code=202)
