"""``/docs`` works on a machine without internet: headless Chromium, with every host but the
service's unreachable, renders Swagger UI with the API's operations and an Authorize button (the
bearer scheme is in the OpenAPI document)."""

from __future__ import annotations

from tests.browser import open_page
from tests.servicekit import make_settings, running_service


def test_docs_render_offline_with_operations_and_authorize(tmp_path):
    with running_service(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite3'}")) as service:
        page = open_page(f"{service.url}/docs", tmp_path, "--virtual-time-budget=15000",
                         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1").dom  # the service stays reachable
    assert "swagger-ui" in page and "cdn.jsdelivr" not in page
    assert "btn authorize" in page  # the Authorize button: a security scheme is declared
    assert page.count('class="opblock ') >= 10  # the operations, rendered by the script the service served
    assert "/v1/models/{model_id}/deletion-requests" in page
