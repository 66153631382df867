"""``GET /v1/jobs/{id}/report`` and ``/report.html`` serve the artifacts the worker stored when the
job published, byte for byte: the page's sha256 is the one in the job and in the audit log's
``version.published`` entry. A job published before pages were stored has no page (404, a
problem that says why); its v1 JSON report is still served as it was stored.

``UNLEARND_REPORT_SCREENSHOT=docs/report.png`` makes the first test also save a screenshot of the
real page in headless Chromium (how docs/report.png is made).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sqlalchemy import select

from service.core.models import AuditEntry, Job
from tests.browser import open_page, screenshot
from tests.worker.test_job_pipeline import NEGGRAD, Setup, random_rows
from worker.pipeline import run_job

DATA = Path(__file__).resolve().parents[1] / "worker" / "data"


def _sha(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def test_the_stored_page_is_served_and_matches_the_audit_log(service, user_files, tmp_path):
    s = Setup(service, user_files)
    request = s.request(random_rows(s.n_train, 40, seed=11))
    job_id = s.job([request], {**NEGGRAD, "audit": {"reference": "retrain"}})
    assert run_job(s.ctx, job_id, worker_name="w1") == "succeeded"
    job = s.get(Job, job_id)
    with service.db.session() as session:
        (entry,) = session.scalars(select(AuditEntry).where(AuditEntry.action == "version.published"))
        details = entry.details

    with service.client() as c:
        page = c.get(f"/v1/jobs/{job_id}/report.html")
        report = c.get(f"/v1/jobs/{job_id}/report")
        links = c.get(f"/v1/jobs/{job_id}").json()["links"]
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert _sha(page.content) == job.report_html_sha256 == details["report_html_sha256"]
    assert _sha(report.content) == job.report_sha256 == details["report_sha256"]
    assert page.headers["etag"] == f'"{job.report_html_sha256}"'
    assert report.json()["schema"] == "unlearnd.report/2"
    assert links["report_html"] == f"/v1/jobs/{job_id}/report.html"
    assert f"Erasure record — job {job_id}" in page.text

    path = tmp_path / "report.html"
    path.write_bytes(page.content)
    loaded = open_page(path.as_uri(), tmp_path)
    assert loaded.console() == [] and loaded.urls == [] and loaded.dom.count("<svg") == 4
    target = os.environ.get("UNLEARND_REPORT_SCREENSHOT")
    if target:
        screenshot(path.as_uri(), Path(target).resolve(), tmp_path, width=1000, height=5600)


def test_a_job_published_before_pages_were_stored_has_its_json_but_no_page(service, user_files):
    s = Setup(service, user_files)
    stored = (DATA / "report_v1_digits.json").read_bytes()
    sha = s.ctx.store.put_bytes(stored)
    job_id = s.job([s.request([1, 2, 3])])
    with service.db.transaction() as session:  # as a job published before pages were stored left it
        job = session.get(Job, job_id)
        job.status, job.report_sha256 = "succeeded", sha
    with service.client() as c:
        page = c.get(f"/v1/jobs/{job_id}/report.html")
        report = c.get(f"/v1/jobs/{job_id}/report")
    assert page.status_code == 404 and page.headers["content-type"].startswith("application/problem+json")
    problem = page.json()
    assert problem["type"].endswith("report-page-not-stored")
    assert "before report pages were stored" in problem["detail"] and f"/v1/jobs/{job_id}/report" in problem["detail"]
    assert report.status_code == 200 and report.content == stored  # served as stored, v1 and all
    assert json.loads(report.content)["schema"] == "unlearnd.report/1"
    with service.client() as c:  # the job's links say so too: a report, no page
        links = c.get(f"/v1/jobs/{job_id}").json()["links"]
    assert links["report"] == f"/v1/jobs/{job_id}/report" and links["report_html"] is None


def test_no_report_before_the_job_succeeds(service, user_files):
    """A queued or running job will have a report: 409 with its status. A failed or canceled one
    never will: 404."""
    s = Setup(service, user_files)
    job_id = s.job([s.request([4, 5])])
    with service.client() as c:
        for status in ("queued", "running"):
            with service.db.transaction() as session:
                session.get(Job, job_id).status = status
            for suffix in ("report", "report.html"):
                r = c.get(f"/v1/jobs/{job_id}/{suffix}")
                assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json", r.text
                assert r.json()["type"].endswith("report-not-ready") and r.json()["job_status"] == status
        assert c.get(f"/v1/jobs/{job_id}").json()["links"]["report"] is None
        for status in ("failed", "canceled"):
            with service.db.transaction() as session:
                session.get(Job, job_id).status = status
            for suffix in ("report", "report.html"):
                r = c.get(f"/v1/jobs/{job_id}/{suffix}")
                assert r.status_code == 404 and r.json()["type"].endswith("no-report"), r.text
                assert r.json()["job_status"] == status
