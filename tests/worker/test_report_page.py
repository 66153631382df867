"""The typed report (service/core/report.py) and the page the worker renders from it (worker/report/).

The reports here are real: tests/worker/data holds a deletion job's report as the worker wrote it
under ``unlearnd.report/1`` (digits, RUM with NegGrad+ and a retrain reference, test confidences cut
to 60) and a calibration job's report, both from the in-process pipeline of test_job_pipeline.py and
test_calibration.py. The page is checked as a browser shows it in headless Chromium (tests/browser.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.report import REPORT_SCHEMA, CalibrationReport, JobReport, load_job_report, load_report
from tests.browser import open_page
from worker.report import findings, plots, render_calibration_page, render_job_page

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
SVG = "{http://www.w3.org/2000/svg}"


def v1() -> dict:
    return json.loads((DATA / "report_v1_digits.json").read_text())


def v2(**changes) -> dict:
    """The stored v1 report as the worker now writes it (schema /2), with ``changes`` applied by path:
    ``v2(**{"job.model_name": "x"})``."""
    data = json.loads(load_job_report(v1()).to_json())
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return data


def page_of(data: dict) -> str:
    return render_job_page(JobReport.model_validate(data))


def figures(page: str) -> dict[str, ET.Element]:
    """Each figure's inline SVG, parsed as XML on its own, by the figure's id."""
    out = {}
    for fid, svg in re.findall(r'<figure id="([^"]+)">\s*(<svg\b.*?</svg>)', page, flags=re.S):
        out[fid] = ET.fromstring(svg)
    return out


def texts(svg: ET.Element) -> list[str]:
    return ["".join(t.itertext()).strip() for t in svg.iter(f"{SVG}text")]


# --------------------------------------------------------------------------- the contract


def test_the_model_reads_a_v1_report_and_writes_v2():
    report = load_job_report(v1())
    assert report.schema_ == REPORT_SCHEMA and report.job.id == 2 and report.metrics.reference is not None
    assert report.job.created_at.tzinfo is not None
    assert report.bins[0].run.guard.outcome == "restored" and report.bins[0].run.cost_share == pytest.approx(0.15)
    stored = json.loads(report.to_json())
    assert stored["schema"] == "unlearnd.report/2"
    assert JobReport.model_validate(stored) == report  # what the worker stores reads back the same
    assert stored["bins"][0]["run"]["lr_tried"] == v1()["bins"][0]["run"]["lr_tried"]  # engine detail kept


def test_an_early_v1_report_without_later_fields_still_reads():
    old = v1()
    del old["recipe"], old["job"]["policy_revision"]
    for b in old["bins"]:
        del b["run"]
    report = load_report(old)
    assert isinstance(report, JobReport) and report.recipe is None and report.bins[0].run is None
    assert "Erasure record" in render_job_page(report)


@pytest.mark.parametrize("change", [
    {"surprise": 1},  # an unknown field
    {"job.surprise": 1},
    {"metrics.after.acc_test": "high"},  # a wrong type
    {"requests.0.received_at": "yesterday"},
    {"requests.0.received_at": "2026-12-01T09:56:43"},  # a timestamp without a time zone
    {"schema": "unlearnd.report/1"},  # the worker writes /2 only
    {"guardrails.passed": None},
], ids=lambda c: next(iter(c)))
def test_the_model_is_strict_about_what_the_worker_writes(change):
    with pytest.raises(ValidationError):
        JobReport.model_validate(v2(**change))


def test_missing_fields_are_refused_even_those_that_may_be_null():
    data = v2()
    del data["metrics"]["reference"]
    with pytest.raises(ValidationError):
        JobReport.model_validate(data)
    JobReport.model_validate(v2(**{"metrics.reference": None}))


def test_the_calibration_report_reads_and_round_trips():
    data = json.loads((DATA / "calibration_digits.json").read_text())
    report = load_report(data)
    assert isinstance(report, CalibrationReport)
    assert json.loads(report.to_json()) == data
    with pytest.raises(ValidationError):
        CalibrationReport.model_validate({**data, "extra": 1})
    page = render_calibration_page(report)
    assert "Calibration — job 1" in page and "Trials" in page and page.count("<svg") == 1
    assert report.payback.summary in page


# --------------------------------------------------------------------------- the page


def test_the_page_shows_the_record_the_metrics_and_four_figures():
    data = v2()
    page = page_of(data)
    assert page.startswith("<!DOCTYPE html>") and "Erasure record — job 2" in page
    for digest in (data["dataset"]["sha256"], data["config_sha256"], data["forget_set"]["sample_ids_sha256"],
                   data["checkpoint"]["sha256"], data["requests"][0]["subject_hash"]):
        assert digest in page  # in full: nothing is only in a tooltip
    assert set(figures(page)) == {"fig-proxy", "fig-confidence", "fig-per-class", "fig-per-bin"}
    assert "100.00% → 83.33%" in page and "0.8784" in page  # forget accuracy, ToW
    assert "report_html_sha256" in page  # how to check this page against the audit log
    for q in data["requests"]:  # each request's erasure certificate, linked (issued once the job completes)
        assert f'<a href="/v1/deletion-requests/{q["id"]}/certificate">' in page
    # no information only on hover: no title attributes, no tooltips in the figures
    assert " title=" not in page and "<title>" not in page.split("</head>", 1)[1] and "hover" not in page.lower()


def test_timestamps_are_to_the_second_in_utc_and_do_not_wrap():
    page = page_of(v2())
    assert "2026-12-01 09:56:43 UTC" in page
    assert ".651" not in page and "09:56:43.6" not in page  # no microseconds
    assert '<td class="ts">2026-12-31 09:56:43 UTC</td>' in page and ".ts{white-space:nowrap}" in page


def test_hostile_strings_are_escaped_in_the_page_and_the_figures():
    attack = "<script>alert(1)</script>"
    page = page_of(v2(**{"job.model_name": attack, "dataset.name": 'x" onmouseover="alert(2)',
                         "requests.0.reason": "<img src=x onerror=alert(3)>", "bins.0.method": attack,
                         "bins.1.level": "<b>mid</b>", "proxy.name": "</text><script>alert(5)</script>",
                         "mia_attack": attack, "config.note": "</pre><script>alert(6)</script>",
                         "aliases_moved": [attack], "job.worker": "$\\frac{a}{b}$"}))
    assert "<script" not in page.lower() and "<img" not in page and "<b>mid</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and 'onmouseover="' not in page
    svgs = figures(page)  # still well-formed XML, with the text drawn as text
    assert len(svgs) == 4
    assert any(attack in t for t in texts(svgs["fig-per-bin"]))
    assert "$\\frac{a}{b}$" in page  # a dollar sign is text, not mathtext


def test_a_job_with_no_measurable_effect_says_so():
    same = {"acc_forget": 1.0, "acc_retain": 0.99, "acc_test": 0.97, "mia": 0.0, "mia_entropy": 0.0}
    data = v2(**{"metrics.before": same, "metrics.after": same, "metrics.reference": None,
                 "metrics.tow": None, "metrics.tow_mia": None, "metrics.tow_before": None,
                 "per_class_accuracy.reference": None})
    report = JobReport.model_validate(data)
    (finding,) = [f for f in findings(report) if f.level == "warn"]
    assert finding.text.startswith("No measurable effect")
    page = render_job_page(report)
    assert '<li class="finding-warn">No measurable effect' in page
    assert 'badge warn">1 finding to read below' in page  # not only green badges in the header
    # the same numbers with a retrain reference that agrees: the examples were never memorized
    data["metrics"]["reference"] = same
    assert [f.level for f in findings(JobReport.model_validate(data))] == ["ok"]


def test_integer_counts_get_integer_ticks():
    data = v2(**{"proxy.forget_values": [0.1, 0.2], "proxy.thresholds": [0.15]})  # a 2-sample histogram
    svg = figures(page_of(data))["fig-proxy"]
    (y_axis,) = [g for g in svg.iter(f"{SVG}g") if g.get("id") == "fig-proxy-matplotlib.axis_2"]
    ticks = [t for t in texts(y_axis) if t and t != "forget examples"]
    assert ticks == ["0", "1"], ticks


def _fills(node: ET.Element) -> set[str]:
    out = set()
    for el in node.iter():
        style = el.get("style") or ""
        m = re.search(r"fill:\s*(#[0-9a-fA-F]{6})", style)
        if m and el.tag == f"{SVG}path":
            out.add(m.group(1).lower())
    return out


def test_every_colour_drawn_is_in_the_legend():
    page = page_of(v2())
    for fid, svg in figures(page).items():
        legends = [g for g in svg.iter(f"{SVG}g") if (g.get("id") or "").split("-")[-1].startswith("legend")]
        assert legends, fid
        legend = set().union(*(_fills(g) for g in legends))
        axes = [g for g in svg.iter(f"{SVG}g") if re.fullmatch(r"fig-[a-z-]+-axes_\d+", g.get("id") or "")]
        drawn = set().union(*(_fills(g) for g in axes)) - {"#ffffff"}
        assert drawn <= legend, (fid, drawn - legend)


def test_accuracy_axes_zoom_to_show_a_small_drop_and_say_so():
    axis = plots.accuracy_axis([0.97, 0.95, 0.945])
    assert 0.5 < axis.low < 0.945 and axis.high > 0.97 and axis.zoomed
    assert "not 0" in axis.label("test accuracy")
    assert not plots.accuracy_axis([0.05, 0.9]).zoomed  # data near 0: the axis starts at 0
    page = page_of(v2())
    assert "The accuracy axis starts at" in page
    ylabels = [t for t in texts(figures(page)["fig-per-class"]) if "axis starts at" in t]
    assert ylabels and "not 0" in ylabels[0]


def test_the_page_prints_on_a4_without_splitting_figures_or_tables():
    page = page_of(v2())
    assert "@page{size:A4" in page
    assert "figure,table,ul.findings li,.verdict,pre{break-inside:avoid}" in page


def test_rendering_is_deterministic():
    data = v2()
    first, second = page_of(data), page_of(data)
    assert first == second
    assert "dc:date" not in first and "<metadata" not in first and "matplotlib.org" not in first


def test_the_api_layer_loads_no_rendering():
    code = ("import sys, service.api.app, service.core.report; "
            "bad = {'torch', 'matplotlib', 'jinja2', 'worker.report'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# --------------------------------------------------------------------------- in a browser


def test_the_page_renders_in_chromium_with_no_console_error_and_no_external_resource(tmp_path):
    attack = "<script>alert(1)</script>"
    path = tmp_path / "report.html"
    path.write_text(page_of(v2(**{"job.model_name": attack, "bins.0.method": attack})), encoding="utf-8")
    loaded = open_page(path.as_uri(), tmp_path)
    assert "Erasure record — job 2" in loaded.dom and loaded.dom.count("<svg") == 4
    assert loaded.console() == [], loaded.console()  # no error, no CSP refusal, no script ran
    assert all(url == path.as_uri() or url.startswith("data:") for url in loaded.urls), loaded.urls


def test_the_calibration_page_renders_in_chromium(tmp_path):
    path = tmp_path / "calibration.html"
    report = CalibrationReport.model_validate_json((DATA / "calibration_digits.json").read_text())
    path.write_text(render_calibration_page(report), encoding="utf-8")
    loaded = open_page(path.as_uri(), tmp_path)
    assert "Calibration — job 1" in loaded.dom and loaded.console() == [] and loaded.urls == []


def test_a_step_the_guard_undid_is_a_finding():
    report = JobReport.model_validate(v2())
    assert not any(f.text.startswith("Undone by the accuracy guard") for f in findings(report))  # restored, within
    data = v2(**{"bins.1.run.guard.outcome": "input"})
    (finding,) = [f for f in findings(JobReport.model_validate(data)) if f.text.startswith("Undone")]
    assert finding.level == "warn"
    assert "bin 1 (mid, 10 examples, neggrad_plus)" in finding.text and "bin 0" not in finding.text
    page = page_of(data)
    assert '<li class="finding-warn">Undone by the accuracy guard: bin 1 (mid' in page
