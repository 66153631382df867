"""The HTML job report: a self-contained page, escaped, robust to nulls, with four well-formed SVG plots."""

from __future__ import annotations

import bisect
import copy
import hashlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from service.api.reports import render_html

ROOT = Path(__file__).resolve().parents[2]
SVG_NS = "{http://www.w3.org/2000/svg}"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_report(seed: int = 0, *, reference: bool = True) -> dict:
    """A report as the worker writes it: digits-sized numbers, three RUM bins, two linked requests."""
    rng = np.random.default_rng(seed)
    n_forget, n_test = 120, 360

    def metrics(acc_forget: float) -> dict:
        return {"acc_forget": acc_forget, "acc_retain": float(rng.uniform(0.97, 1.0)),
                "acc_test": float(rng.uniform(0.93, 0.96)), "mia": float(rng.uniform(0.05, 0.6)),
                "mia_entropy": float(rng.uniform(0.05, 0.6))}

    before, after, ref = metrics(0.9917), metrics(0.9417), metrics(0.9333)
    thresholds = [0.012, 0.087]
    forget_values = np.concatenate([rng.uniform(0, 0.012, 50), rng.uniform(0.012, 0.087, 40),
                                    rng.uniform(0.087, 0.4, 30)])
    bins = []
    for index, level in enumerate(("low", "mid", "high")):
        acc_b = float(rng.uniform(0.95, 1.0))
        acc_a = acc_b - float(rng.uniform(0.02, 0.2))
        bins.append({"index": index, "level": level, "n": [50, 40, 30][index],
                     "method": ["l1", "salun", "neggrad"][index], "hparams": {"lr": 0.01 * (index + 1), "epochs": 5},
                     "seconds": float(rng.uniform(0.5, 3)),
                     "before": {"acc_forget": acc_b, "mia": float(rng.uniform(0, 0.3))},
                     "after": {"acc_forget": acc_a, "mia": float(rng.uniform(0.3, 0.6))}})
    classes = list(range(10))
    config = {"method": "rum", "proxy": {"name": "confidence"}, "bins": {"thresholds": thresholds},
              "per_bin": [{"method": b["method"], **b["hparams"]} for b in bins]}
    return {
        "schema": "unlearnd.report/1",
        "job": {"id": 4217, "model_id": 7, "model_name": "digits-cnn", "status": "succeeded", "base_version": 3,
                "new_version": 4, "attempts": 1, "created_at": "2025-05-02T09:58:00+00:00",
                "started_at": "2025-05-02T09:58:02+00:00", "finished_at": "2025-05-02T10:01:12+00:00",
                "timings": {"loading": 1.25, "proxies": 0.03, "refining": 0.01, "unlearning": 5.79, "auditing": 181.2,
                            "publishing": 0.41, "total": 188.69},
                "device": "cuda:0 (NVIDIA H100)", "worker": "celery@gpu-node-1"},
        "dataset": {"id": 2, "name": "digits", "sha256": _sha("digits.npz"), "n_train": 1437, "n_test": n_test},
        "requests": [
            {"id": "req-981", "reason": "erasure", "subject_hash": _sha("subject-17"),
             "received_at": "2025-05-01T08:00:00+00:00", "due_by": "2025-05-31T08:00:00+00:00", "n_samples": 100,
             "n_new_samples": 100, "linked_to": []},
            {"id": "req-982", "reason": "mislabeled", "subject_hash": None, "received_at": "2025-05-02T09:00:00+00:00",
             "due_by": "2025-05-02T09:30:00+00:00", "n_samples": 25, "n_new_samples": 20, "linked_to": ["req-981"]},
        ],
        "forget_set": {"n": n_forget, "n_excluded_before": 30, "sample_ids_sha256": _sha("ids")},
        "method": "rum", "config": config, "config_sha256": _sha("config"), "seed": 1234,
        "proxy": {"name": "confidence", "params": {"epochs": 12}, "source": "cached", "compute_seconds": 0.0,
                  "thresholds": thresholds, "forget_values": [float(v) for v in forget_values]},
        "bins": bins,
        "metrics": {"before": before, "after": after, "reference": ref if reference else None,
                    "tow": 0.9631 if reference else None, "tow_mia": 0.8123 if reference else None,
                    "tow_before": 0.9012 if reference else None},
        "per_class_accuracy": {"classes": classes, "before": rng.uniform(0.9, 1, 10).tolist(),
                               "after": rng.uniform(0.85, 1, 10).tolist(),
                               "reference": rng.uniform(0.85, 1, 10).tolist() if reference else None},
        "confidence": {"forget_before": rng.beta(30, 1, n_forget).tolist(),
                       "forget_after": rng.beta(8, 2, n_forget).tolist(),
                       "test_before": rng.beta(8, 2, n_test).tolist(), "test_after": rng.beta(8, 2, n_test).tolist()},
        "guardrails": {"max_test_drop": 0.05, "max_retain_drop": 0.05, "test_drop": 0.0123, "retain_drop": 0.0071,
                       "passed": True},
        "aliases_moved": ["latest", "production"],
        "checkpoint": {"sha256": _sha("checkpoint"), "size_bytes": 1_234_567},
        "mia_attack": "SVC (RBF, C=3) on p(true label), shadow members = retain, non-members = test",
    }


def nulled_report() -> dict:
    """Every optional value null or empty, as a NaN-riddled or minimal job would produce."""
    r = make_report(1, reference=False)
    r["job"].update(model_name=None, new_version=None, status="failed", timings={"total": None}, started_at=None,
                    finished_at=None, device=None, worker=None)
    r["requests"][0].update(subject_hash=None, due_by=None, n_new_samples=None, linked_to=None)
    r["proxy"].update(thresholds=None, params=None, compute_seconds=None, forget_values=[])
    r["bins"] = [{"index": 0, "level": "all", "n": 120, "method": "l1", "hparams": None, "seconds": None,
                  "before": {"acc_forget": None, "mia": None}, "after": None}]
    for when in ("before", "after"):
        r["metrics"][when] = dict.fromkeys(r["metrics"][when])
    r["per_class_accuracy"] = {"classes": [], "before": [], "after": [], "reference": None}
    r["confidence"] = {"forget_before": [], "forget_after": [], "test_before": [], "test_after": []}
    r["guardrails"] = {"max_test_drop": 0.05, "max_retain_drop": None, "test_drop": None, "retain_drop": None,
                       "passed": None}
    r["aliases_moved"] = []
    r["checkpoint"] = None
    r["config"] = None
    r["mia_attack"] = None
    return r


class _Structure(HTMLParser):
    """Checks that every element is closed in order, collects tags, table headers and external references."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.headers: dict[str, list[str]] = {}
        self._table: str | None = None
        self._in_th = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._table = attrs.get("id") or attrs.get("class") or "?"
            self.headers.setdefault(self._table, [])
        if tag == "th" and self._table and self.stack and "tr" in self.stack:
            self._in_th = True
            self.headers[self._table].append("")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "th":
            self._in_th = False
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._in_th:
            self.headers[self._table][-1] += data


def parse(page: str) -> _Structure:
    parser = _Structure()
    parser.feed(page)
    parser.close()
    assert parser.errors == [], parser.errors[:5]
    assert parser.stack == [], parser.stack
    return parser


def svgs(page: str) -> list[ET.Element]:
    """Each inline <svg>…</svg> parsed as XML on its own (well-formed, standalone)."""
    return [ET.fromstring(m) for m in re.findall(r"<svg\b.*?</svg>", page, flags=re.S)]


def svg_text(svg: ET.Element) -> str:
    return " ".join(t.text or "" for t in svg.iter(f"{SVG_NS}text"))


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    for tag in ("<html", "<head>", "<title>", "<body>", "</body>", "</html>"):
        assert tag in page
    low = page.lower()
    assert 'src="http' not in low and "<script" not in low and "<link" not in low and "<img" not in low
    assert "@import" not in low and "url(" not in low and "<iframe" not in low
    for tag, attrs in parse(page).tags:
        for name in ("src", "href", "xlink:href", "action"):
            assert not (attrs.get(name) or "#").startswith(("http", "//", "data:")), (tag, attrs)


# --------------------------------------------------------------------------- tests


def test_full_report_renders_record_metrics_and_four_plots():
    report = make_report()
    page = render_html(report)
    assert_self_contained(page)

    assert "Erasure record — job 4217" in page
    assert "digits-cnn" in page and "v3 → v4" in page
    for r in report["requests"]:
        assert r["id"] in page and r["reason"] in page
    full = report["requests"][0]["subject_hash"]
    assert f'title="{full}"' in page and f">{full[:12]}…<" in page  # shortened, full in the title attribute
    for digest in (report["dataset"]["sha256"], report["config_sha256"], report["forget_set"]["sample_ids_sha256"],
                   report["checkpoint"]["sha256"]):
        assert digest in page
    assert "GET /v1/audit-log" in page
    assert "celery@gpu-node-1" in page and "cuda:0 (NVIDIA H100)" in page
    assert "1.2 MiB (1,234,567 bytes)" in page
    assert "3 min 01.2 s" in page  # auditing 181.2 s
    assert "confidence" in page and "cached" in page  # derived cache: the proxy and its source
    # the second request was due before the job finished, the first after
    assert page.count(">missed<") == 1 and page.count(">met<") == 1

    m = report["metrics"]
    for when in ("before", "after", "reference"):
        for key in ("acc_forget", "acc_retain", "acc_test", "mia", "mia_entropy"):
            assert f"{m[when][key] * 100:.2f}%" in page, (when, key)
    assert "99.17% → 94.17%" in page  # the verdict: forget accuracy before → after
    assert "0.9631" in page and "0.8123" in page and "0.9012" in page  # ToW, ToW-MIA, ToW before
    assert "guardrails passed" in page and "1.23%" in page and "5.00%" in page

    assert page.count("<svg") == 4
    plots = svgs(page)
    assert len(plots) == 4
    for svg in plots:
        assert svg.tag == f"{SVG_NS}svg"
        assert svg.find(f"{SVG_NS}title") is not None
        assert len(list(svg.iter(f"{SVG_NS}rect"))) > 5  # bars (and legend swatches)
        assert len(list(svg.iter(f"{SVG_NS}line"))) > 4  # axes, ticks, grid
    assert "before unlearning" in svg_text(plots[1]) and "after unlearning" in svg_text(plots[1])
    assert "bin 2 · high" in svg_text(plots[0]) and "neggrad" in svg_text(plots[3])
    assert "should look like the test distribution" in page
    assert "&quot;per_bin&quot;: [\n" in page  # pretty config JSON (escaped)
    assert report["mia_attack"] in page


def test_proxy_histogram_counts_every_value_once_in_the_right_bin():
    report = make_report(3)
    thresholds = report["proxy"]["thresholds"]
    report["proxy"]["forget_values"] += thresholds  # values on a cut point belong to the lower bin
    proxy_svg = svgs(render_html(report))[0]
    total = 0
    for rect in proxy_svg.iter(f"{SVG_NS}rect"):
        if rect.get("class") != "bar":
            continue
        tip = rect.find(f"{SVG_NS}title").text
        lo, hi, count, index = re.fullmatch(r"(\S+) to (\S+): (\d+) samples · bin (\d) \(\w+\)", tip).groups()
        assert int(index) == bisect.bisect_left(thresholds, (float(lo) + float(hi)) / 2)
        in_bar = [v for v in report["proxy"]["forget_values"] if float(lo) <= v <= float(hi)]
        assert all(bisect.bisect_left(thresholds, v) == int(index) for v in in_bar if float(lo) < v < float(hi))
        total += int(count)
    assert total == len(report["proxy"]["forget_values"])
    dashed = [line for line in proxy_svg.iter(f"{SVG_NS}line") if line.get("stroke-dasharray")]
    assert len(dashed) == len(thresholds) + 1  # one line per threshold, plus the legend's sample


def _headers(page: str, table: str) -> list[str]:
    return [h.strip() for h in parse(page).headers[table]]


def test_reference_column_only_when_a_reference_was_computed():
    with_ref = render_html(make_report(reference=True))
    without = render_html(make_report(reference=False))
    assert "Reference (retrain)" in _headers(with_ref, "metrics-table")
    assert not any("reference" in h.lower() for h in _headers(without, "metrics-table"))
    assert "retrain reference" in svg_text(svgs(with_ref)[2])
    assert "retrain reference" not in svg_text(svgs(without)[2])
    assert "0.9631" not in without and "ToW and ToW-MIA need a retrain reference" in without


def test_hostile_strings_are_escaped_everywhere():
    attack = "<script>alert(1)</script>"
    report = make_report()
    report["job"]["model_name"] = attack
    report["dataset"]["name"] = 'x" onmouseover="alert(2)'
    report["requests"][0].update(id=attack, reason="<img src=x onerror=alert(3)>", linked_to=[attack])
    report["requests"][1]["subject_hash"] = '"><svg onload=alert(4)>'
    report["bins"][0].update(method=attack, level="<b>low</b>")
    report["proxy"]["name"] = "</text><script>alert(5)</script>"
    report["per_class_accuracy"]["classes"][0] = attack
    report["config"]["note"] = "</pre><script>alert(6)</script>"
    report["job"]["timings"][attack] = 1.0
    report["aliases_moved"] = [attack]
    report["mia_attack"] = attack
    page = render_html(report)
    assert_self_contained(page)  # no <script, <img, or stray tags
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'onmouseover="' not in page and "<svg onload" not in page
    assert page.count("<svg") == 4
    assert any(attack in svg_text(s) for s in svgs(page))  # the text survives, escaped, in the SVG


def test_nulls_everywhere_optional_still_render():
    page = render_html(nulled_report())
    assert_self_contained(page)
    assert "—" in page and "v3 → —" in page
    assert "no retrain reference" in page and "guardrails not evaluated" in page
    assert "Reference (retrain)" not in _headers(page, "metrics-table")
    plots = svgs(page)
    assert len(plots) == 4
    assert "no proxy values" in svg_text(plots[0])
    assert "no confidences before unlearning" in svg_text(plots[1])
    assert "no data" in svg_text(plots[2]) and "no data" in svg_text(plots[3])


@pytest.mark.parametrize("report", [
    {},
    {"schema": "unlearnd.report/1", "job": None, "requests": None, "bins": None, "metrics": None},
    {"job": {"id": 1, "timings": {"total": 0}}, "metrics": {"before": {"acc_forget": "0.9"}, "after": [],
                                                            "reference": {}},
     "proxy": {"thresholds": [0.5, 0.5], "forget_values": [0.5, 0.5, 0.5, None, "x", True]},
     "confidence": {"forget_before": [0.0, 1.0, 1.5, -1], "test_after": [0.5]},
     "per_class_accuracy": {"classes": None, "before": [0.5, None], "after": [0.4]},
     "bins": [None, {"index": "a"}, {"index": 2, "before": {"acc_forget": 0.7}}],
     "config": {1: "mixed", "a": "keys"}, "requests": [None, {"linked_to": "r1"}], "guardrails": {"passed": []}},
], ids=["empty", "null-sections", "mistyped"])
def test_minimal_or_mistyped_reports_do_not_crash(report):
    page = render_html(copy.deepcopy(report))
    assert_self_contained(page)
    assert len(svgs(page)) == 4


def test_many_classes_thin_the_axis_labels():
    report = make_report()
    rng = np.random.default_rng(5)
    report["per_class_accuracy"] = {"classes": list(range(100)), "before": rng.uniform(0, 1, 100).tolist(),
                                    "after": rng.uniform(0, 1, 100).tolist(), "reference": None}
    per_class = svgs(render_html(report))[2]
    bars = [r for r in per_class.iter(f"{SVG_NS}rect") if r.get("class") == "bar"]
    assert len(bars) == 200
    labels = {t.text for t in per_class.iter(f"{SVG_NS}text")}
    assert "0" in labels and "95" in labels and "1" not in labels


def test_the_module_does_not_import_torch():
    code = "import sys, service.api.reports; assert 'torch' not in sys.modules and 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _paths(value, prefix=()):
    """Every key path into nested dicts (and dicts inside lists) of a report."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*prefix, key)
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            if isinstance(child, dict):
                yield from _paths(child, (*prefix, i))


def test_any_single_value_null_missing_or_mistyped_still_renders():
    base = make_report()
    base["proxy"]["forget_values"] = base["proxy"]["forget_values"][:10]
    base["confidence"] = {k: v[:10] for k, v in base["confidence"].items()}
    for path in _paths(base):
        for replacement in (None, "x", [], float("nan"), "__delete__"):
            report = copy.deepcopy(base)
            parent = report
            for key in path[:-1]:
                parent = parent[key]
            if replacement == "__delete__":
                del parent[path[-1]]
            else:
                parent[path[-1]] = replacement
            page = render_html(report)
            assert page.count("<svg") == 4, (path, replacement)


def test_each_bin_says_what_its_guard_did_and_how_much_work_it_spent():
    report = make_report(reference=False)
    outcomes = ("within", "restored", "input")
    for b, outcome in zip(report["bins"], outcomes, strict=True):
        b["run"] = {"cost_share": 0.04, "guard": {"outcome": outcome}}
    html = render_html(report)
    assert "Guard" in _headers(html, "bins") and "Work (of training)" in _headers(html, "bins")
    assert "ended within the guard" in html
    assert "its last state within it was kept" in html
    assert "the bin&#x27;s input model was kept" in html
    assert html.count("4.00%") >= 3
