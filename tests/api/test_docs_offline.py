"""``/docs`` works on a machine without internet: headless Chromium, with every host but the
service's unreachable, renders Swagger UI with the API's operations and an Authorize button (the
bearer scheme is in the OpenAPI document)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.servicekit import make_settings, running_service


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:  # scripts/setup installs it; a missing browser fails, it never skips
        pytest.fail("chromium is not installed (scripts/setup installs Debian's chromium)")
    return path


def dump_dom(url: str, tmp_path) -> str:
    out = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium'}",
         # the network is off: every host but the loopback resolves to nothing
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
         "--virtual-time-budget=15000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_docs_render_offline_with_operations_and_authorize(tmp_path):
    with running_service(make_settings(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite3'}")) as service:
        page = dump_dom(f"{service.url}/docs", tmp_path)
    assert "swagger-ui" in page and "cdn.jsdelivr" not in page
    assert "btn authorize" in page  # the Authorize button: a security scheme is declared
    assert page.count('class="opblock ') >= 10  # the operations, rendered by the script the service served
    assert "/v1/models/{model_id}/deletion-requests" in page
