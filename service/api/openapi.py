"""The OpenAPI document tells the truth about errors and inputs.

FastAPI documents a route's success answer and a validation error body of its own. Ours are
``application/problem+json`` documents (service/api/problems.py), and a route can also answer
401 (no key), 404 (a resource in its path is not the caller's), 409 (a state conflict), 413/415
(uploads), 400/416 (a header or a cursor) and 503 (the database is unavailable, or the upload slots
are busy). :func:`install` rewrites the generated document once: a ``Problem`` schema, every error
status each operation can return with that schema, and the rule the middleware enforces on every
string (no control characters) written as a ``pattern``, so that a client generated from the
document, or a fuzzer, knows what is refused. The tests check the document against the running
service with schemathesis (tests/api/test_openapi.py).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.pagination import TOKEN_PATTERN
from service.api.problems import MEDIA_TYPE

# The middleware's rule (service/api/app.py): no C0 or C1 control character in any string.
NO_CONTROL = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"

PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Problem",
    "description": "An error, as RFC 9457 describes it; `errors` names each offending field.",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string", "description": "urn:unlearnd:problem:<kind>, or about:blank"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "object", "required": ["field", "message"], "properties": {
            "field": {"type": "string"}, "message": {"type": "string"}}}},
    },
    "additionalProperties": True,
}

# State conflicts (409) by operation: names taken, a model not ready, an Idempotency-Key in flight,
# a job already finished or a calibration already running, an alias on a version that is not ready,
# a tenant's webhook endpoints at their limit.
CONFLICTS = {
    ("post", "/v1/datasets"), ("post", "/v1/models"), ("post", "/v1/models/{model_id}/deletion-requests"),
    ("post", "/v1/models/{model_id}/calibrations"), ("post", "/v1/jobs/{job_id}/cancel"),
    ("put", "/v1/models/{model_id}/aliases/{alias}"), ("get", "/v1/jobs/{job_id}/report"),
    ("get", "/v1/jobs/{job_id}/report.html"), ("delete", "/v1/models/{model_id}"),
    ("delete", "/v1/datasets/{dataset_id}"), ("post", "/v1/webhooks"),
}


def _problem(status: int) -> dict[str, Any]:
    return {"description": HTTPStatus(status).phrase,
            "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}


def _error_statuses(path: str, method: str, op: dict[str, Any]) -> set[int]:
    statuses: set[int] = set()
    if op.get("parameters") or op.get("requestBody"):
        statuses.add(422)  # invalid input
    if op.get("security"):
        statuses.update((401, 503))  # no valid key; the database (which holds the keys) unavailable
    if "{" in path:
        statuses.add(404)
    params = {p["name"].lower() for p in op.get("parameters", [])}
    if "page_token" in params or "idempotency-key" in params:
        statuses.add(400)
    if "range" in params:
        statuses.add(416)
    body = op.get("requestBody", {}).get("content", {})
    if body:
        statuses.update((400, 413))  # 400: a body that is not what its content type says (not UTF-8 JSON)
    if "multipart/form-data" in body:
        statuses.update((400, 415))  # 400: a form the multipart parser cannot read
    if (method, path) in CONFLICTS:
        statuses.add(409)
    return statuses


def _no_control(schema: dict[str, Any], components: dict[str, Any], seen: set[str]) -> None:
    """Add the no-control-character pattern to every string in a request schema."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        if name not in seen:
            seen.add(name)
            _no_control(components.get(name, {}), components, seen)
        return
    if schema.get("type") == "string" and "pattern" not in schema and "enum" not in schema \
            and schema.get("format") != "binary":
        schema["pattern"] = NO_CONTROL
    if schema.get("type") == "object" or "properties" in schema:
        schema.setdefault("propertyNames", {"pattern": NO_CONTROL})
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _no_control(schema[key], components, seen)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            _no_control(sub, components, seen)
    for sub in schema.get("properties", {}).values():
        _no_control(sub, components, seen)


def _not_null(param: dict[str, Any]) -> None:
    """A query, path or header parameter is a string on the wire, never JSON null: an optional one
    is left out. FastAPI writes ``str | None`` as anyOf [string, null]; keep the string."""
    schema = param.get("schema", {})
    options = [o for o in schema.get("anyOf", []) if o.get("type") != "null"]
    if "anyOf" in schema and len(options) == 1:
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        param["schema"] = {**options[0], **rest}


def _set_pattern(schema: dict[str, Any], pattern: str) -> None:
    for sub in schema.get("anyOf", [schema]):
        if sub.get("type") == "string":
            sub["pattern"] = pattern


def document(app: FastAPI, max_page_size: int) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Problem"] = PROBLEM_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's own 422 body: never ours
        components.pop(name, None)
    seen: set[str] = set()
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses = op.setdefault("responses", {})
            for status in sorted(_error_statuses(path, method, op)):
                if str(status) not in responses or status == 422:  # a route's own answer stays
                    responses[str(status)] = _problem(status)
            for param in op.get("parameters", []):
                _not_null(param)
                if param["name"] == "page_token":
                    _set_pattern(param["schema"], TOKEN_PATTERN)
                if param["name"] == "max_results":
                    for sub in param["schema"].get("anyOf", [param["schema"]]):
                        if sub.get("type") == "integer":
                            sub.update(minimum=1, maximum=max_page_size)
                _no_control(param.get("schema", {}), components, seen)
            for content in op.get("requestBody", {}).get("content", {}).values():
                _no_control(content.get("schema", {}), components, seen)
    return schema


def install(app: FastAPI, max_page_size: int) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, max_page_size)
        return app.openapi_schema

    app.openapi = openapi
