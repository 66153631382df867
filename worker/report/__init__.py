"""The report page: a job's typed report (service/core/report.py) as one self-contained HTML page.

The worker renders it when the job publishes and stores it as an artifact whose sha256 goes into the
job (``report_html_sha256``) and the audit-log entry of the publish: the page a compliance officer
reads and signs is the stored file, never re-rendered. docs/report.md explains how to read it.

HTML comes from the Jinja2 templates in ``templates/`` with autoescape on (names, reasons and ids are
users' strings); the figures are matplotlib SVG inlined in the page (plots.py). The page loads
nothing: inline CSS and SVG, no script, no font, no image, a Content-Security-Policy that forbids
anything else; it prints on A4.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cache

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from service.core.report import CalibrationReport, JobReport
from worker.engine.catalog import GuardOutcome

from . import fmt, plots

__all__ = ["Finding", "findings", "render_calibration_page", "render_job_page"]

# The engine's bin names (worker/engine/refine.py), by number of bins.
LEVEL_NAMES = {1: ("all",), 2: ("low", "high"), 3: ("low", "mid", "high")}
NO_EFFECT = 0.005  # half a point: a change smaller than this is no measurable change
OVER_FORGET = 0.05  # forget accuracy this far below test accuracy is itself a membership signal


@cache
def _environment() -> Environment:
    env = Environment(loader=PackageLoader("worker.report", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(fmt.FILTERS)
    return env


@dataclass(frozen=True)
class Finding:
    """A sentence the page states in its header: ``bad`` (a failure), ``warn`` (read with care) or ``ok``."""

    level: str
    text: str


def findings(report: JobReport) -> list[Finding]:
    """What a reader must not miss, in words: no measurable effect, over-forgetting, a step the guard
    undid, a failed guardrail, a missed deadline."""
    out: list[Finding] = []
    before, after, reference = report.metrics.before, report.metrics.after, report.metrics.reference
    d_acc, d_mia = fmt.diff(after.acc_forget, before.acc_forget), fmt.diff(after.mia, before.mia)
    unchanged = d_acc is not None and d_mia is not None and abs(d_acc) < NO_EFFECT and abs(d_mia) < NO_EFFECT
    if unchanged and reference is None:
        out.append(Finding("warn", (
            f"No measurable effect: forget accuracy {fmt.pct(before.acc_forget)} → {fmt.pct(after.acc_forget)} and "
            f"MIA efficacy {fmt.pct(before.mia)} → {fmt.pct(after.mia)} did not change, and there is no retrain "
            "reference to compare with. This report does not show that the examples were forgotten: either the "
            "model never memorized them (it treats them as it treats unseen data) or the unlearning did nothing. "
            "A retrain reference (policy audit.reference = retrain) tells the two apart.")))
    elif unchanged:
        gap = fmt.diff(after.acc_forget, reference.acc_forget)
        close = gap is not None and abs(gap) <= 0.02
        out.append(Finding("ok" if close else "warn", (
            f"Forget accuracy and MIA efficacy did not change ({fmt.pct(after.acc_forget)}, {fmt.pct(after.mia)}); "
            f"the model retrained without the forget set has forget accuracy {fmt.pct(reference.acc_forget)}, "
            + ("so the examples were not memorized to begin with." if close else
               "so the model still differs from one that never saw them."))))
    # Over-forgetting: measured against the retrain reference when there is one, else against test accuracy.
    if reference is not None and reference.acc_forget is not None:
        target, target_name = reference.acc_forget, "the retrain reference's"
    else:
        target, target_name = after.acc_test, "test accuracy"
    gap = fmt.diff(target, after.acc_forget)
    if gap is not None and gap > OVER_FORGET:
        out.append(Finding("warn", (
            f"Over-forgetting: forget accuracy after ({fmt.pct(after.acc_forget)}) is {gap * 100:.1f} points below "
            f"{target_name} ({fmt.pct(target)}). A model that never saw these examples would classify them about "
            "as well as that; far worse is itself a sign that they were in the training set.")))
    undone = [b for b in report.bins if b.run and b.run.guard and b.run.guard.outcome == GuardOutcome.INPUT]
    if undone:
        steps = "; ".join(  # named as the page's tables name them
            (f"bin {b.index} ({b.level}, " if b.index >= 0 else f"{b.level} (")
            + f"{b.n} example{'s' if b.n != 1 else ''}, {b.method})" for b in undone)
        out.append(Finding("warn", (
            f"Undone by the accuracy guard: {steps}. Every rate tried cost more retain or held-out accuracy "
            "than the policy allows, so that step kept its input model and did not forget those examples. "
            f"The rest of the job stands. A calibration of the model (POST /v1/models/{report.job.model_id}/"
            "calibrations) finds a rate that fits it; docs/unlearning.md explains the guard.")))
    if not report.guardrails.passed:
        out.append(Finding("bad", (
            "A guardrail failed: the new version lost more accuracy than the policy allows "
            f"(test {fmt.pct(report.guardrails.test_drop)} of at most {fmt.pct(report.guardrails.max_test_drop)}, "
            f"retain {fmt.pct(report.guardrails.retain_drop)} of at most "
            f"{fmt.pct(report.guardrails.max_retain_drop)}); it was published but production was not moved.")))
    finished = report.job.finished_at
    missed = [r.id for r in report.requests if finished is not None and finished > r.due_by]
    if missed:
        out.append(Finding("bad", f"Deadline missed for request(s) {', '.join(map(str, missed))}: the job finished "
                                  f"{fmt.when(finished)}, after their due date."))
    return out


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class PageFigure:
    id: str
    svg: Markup | None  # None: no data to draw
    caption: str
    empty: str = "No data in this report."


def _svg(fig, prefix: str) -> Markup:
    # matplotlib writes well-formed SVG and escapes the text it draws (users' strings included)
    return Markup(plots.to_svg(fig, prefix))  # noqa: S704


def _level_names(k: int) -> tuple[str, ...]:
    return LEVEL_NAMES.get(k, tuple(f"bin{i}" for i in range(k)))


def _bin_names(report: JobReport) -> list[str]:
    k = len(report.proxy.thresholds or []) + 1
    levels = dict(enumerate(_level_names(k)))
    for b in report.bins:
        levels[b.index] = b.level
    return [f"bin {i} · {levels[i]}" for i in range(k)]


def _proxy_figure(report: JobReport) -> tuple[PageFigure, list[dict]]:
    values = [v for v in report.proxy.forget_values if v is not None]
    thresholds = sorted(report.proxy.thresholds or [])
    names = _bin_names(report)
    rows = []
    edges = [None, *thresholds, None]
    for i, name in enumerate(names):
        low, high = edges[i], edges[i + 1]
        inside = [v for v in values if (low is None or v > low) and (high is None or v <= high)]
        rows.append({"bin": name, "low": low, "high": high, "n": len(inside)})
    cuts = ", ".join(f"{t:.4g}" for t in thresholds) or "none: a single bin"
    caption = ("How the forget set spreads over memorization bins: the number of forget examples per proxy value "
               f"(printed above each bar), coloured by bin. Thresholds (dashed): {cuts}; a value on a threshold "
               "belongs to the lower bin. RUM unlearns the bins in turn, low to high; many examples in the high bin "
               f"make forgetting harder. Proxy values were {report.proxy.source}.")
    svg = _svg(plots.proxy_plot(values, thresholds, names, report.proxy.name), "fig-proxy") if values else None
    return PageFigure("fig-proxy", svg, caption, "No proxy values in this report."), rows


def _confidence_figure(report: JobReport) -> tuple[PageFigure, list[dict]]:
    c = report.confidence
    panels = [("before unlearning", c.forget_before, c.test_before), ("after unlearning", c.forget_after, c.test_after)]
    shares = {key: plots.confidence_shares(getattr(c, key))
              for key in ("forget_before", "test_before", "forget_after", "test_after")}
    rows = [{"band": f"{i / plots.BANDS:.1f}–{(i + 1) / plots.BANDS:.1f}",
             **{key: values[i] for key, values in shares.items()}} for i in range(plots.BANDS)]
    caption = ("Share of examples by the model's confidence in their true label, forget set beside test set "
               "(values in the table below). Before unlearning, forget examples (seen in training) sit near 1 while "
               "test examples spread lower; after it, the forget distribution should look like the test "
               "distribution: then a membership-inference attack cannot tell them apart.")
    have = any(f or t for _, f, t in panels)
    svg = _svg(plots.confidence_plot(panels), "fig-confidence") if have else None
    return PageFigure("fig-confidence", svg, caption, "No confidences in this report."), rows


def _per_class_figure(report: JobReport) -> tuple[PageFigure, list[dict], bool]:
    pca = report.per_class_accuracy
    series = [plots.Series("before", plots.BEFORE, pca.before), plots.Series("after", plots.AFTER, pca.after)]
    if pca.reference is not None:
        series.append(plots.Series("retrain reference", plots.REFERENCE, pca.reference))
    rows = [{"class": c, "before": _at(pca.before, i), "after": _at(pca.after, i),
             "reference": _at(pca.reference, i) if pca.reference is not None else None}
            for i, c in enumerate(pca.classes)]
    caption = ("Test accuracy per class before and after unlearning"
               + (" and for the model retrained without the forget set" if pca.reference is not None else "")
               + " (values in the table below). Look for a class that lost much more than the others: unlearning "
                 "damaged it, often a class the forget set is concentrated in.")
    if not pca.classes:
        return PageFigure("fig-per-class", None, caption), rows, False
    fig, axis = plots.accuracy_bars([str(c) for c in pca.classes], series, "class", "test accuracy")
    if axis.zoomed:
        caption += f" The accuracy axis starts at {axis.low * 100:.0f}%, not 0, so that small drops show."
    return PageFigure("fig-per-class", _svg(fig, "fig-per-class"), caption), rows, axis.zoomed


def _per_bin_figure(report: JobReport) -> PageFigure:
    bins = sorted(report.bins, key=lambda b: b.index)
    categories = [(f"bin {b.index} · {b.level}" if b.index >= 0 else "wrong labels") + f"\n{b.method}" for b in bins]
    series = [plots.Series("before", plots.BEFORE, [b.before.acc_forget for b in bins]),
              plots.Series("after", plots.AFTER, [b.after.acc_forget for b in bins])]
    lines = []
    if report.metrics.after.acc_test is not None:
        lines.append((report.metrics.after.acc_test, "test accuracy after", plots.TEST))
    reference = report.metrics.reference
    if reference is not None and reference.acc_forget is not None:
        lines.append((reference.acc_forget, "retrain: forget accuracy, all bins", plots.REFERENCE))
    caption = ("Forget accuracy of each bin before and after its unlearning step (printed on the bars). "
               "Forgetting shows as a drop toward the test accuracy (dashed line); a drop far below it over-forgets, "
               "which is itself a membership signal.")
    if not bins:
        return PageFigure("fig-per-bin", None, caption, "No bins in this report.")
    fig, axis = plots.accuracy_bars(categories, series, "bin (level, unlearner)", "forget accuracy", lines=lines,
                                    labels_on_bars=True)
    if axis.zoomed:
        caption += f" The accuracy axis starts at {axis.low * 100:.0f}%, not 0, so that small drops show."
    return PageFigure("fig-per-bin", _svg(fig, "fig-per-bin"), caption)


def _at(values, i):
    return values[i] if values is not None and i < len(values) else None


# --------------------------------------------------------------------------- pages


GUARD_OUTCOMES = {
    GuardOutcome.WITHIN: ("ended within the guard", "ok"),
    GuardOutcome.RESTORED: ("went past the guard: its last state within it was kept", "warn"),
    GuardOutcome.INPUT: ("went past the guard: the bin's input model was kept", "warn"),
    GuardOutcome.OFF: ("guard off", "info"),
}

METRIC_ROWS = (("acc_forget", "Forget accuracy"), ("acc_retain", "Retain accuracy"), ("acc_test", "Test accuracy"),
               ("mia", "MIA efficacy (confidence)"), ("mia_entropy", "MIA efficacy (entropy)"))


def render_job_page(report: JobReport) -> str:
    """A deletion job's report as a self-contained page (templates/job.html.j2)."""
    proxy_figure, proxy_rows = _proxy_figure(report)
    confidence_figure, confidence_rows = _confidence_figure(report)
    per_class_figure, per_class_rows, _ = _per_class_figure(report)
    finished: datetime | None = report.job.finished_at
    timings = [(k, v) for k, v in report.job.timings.items() if k != "total"]
    return _environment().get_template("job.html.j2").render(
        r=report, findings=findings(report), metric_rows=METRIC_ROWS, guard_outcomes=GUARD_OUTCOMES,
        timings=timings, total=report.job.timings.get("total"), finished=finished,
        proxy_figure=proxy_figure, proxy_rows=proxy_rows, confidence_figure=confidence_figure,
        confidence_rows=confidence_rows, per_class_figure=per_class_figure, per_class_rows=per_class_rows,
        per_bin_figure=_per_bin_figure(report), diff=fmt.diff)


def _trials_figure(report: CalibrationReport) -> PageFigure:
    trials = [t for t in report.trials if t.score is not None]
    caption = ("Each trial's score (ToW + ToW-MIA)/2 on the search set (printed on the bars), against the "
               "uncalibrated default's on the same set (dashed line); higher is closer to a retrain.")
    if not trials:
        return PageFigure("fig-trials", None, caption, "No completed trials in this report.")
    lines = [(report.default_search.score, "uncalibrated default", plots.REFERENCE)] \
        if report.default_search.score is not None else []
    fig, axis = plots.accuracy_bars([f"#{t.number}" for t in trials],
                                    [plots.Series("trial score", plots.AFTER, [t.score for t in trials])],
                                    "trial", "score", lines=lines, labels_on_bars=True)
    if axis.zoomed:
        caption += f" The score axis starts at {axis.low * 100:.0f}%, not 0."
    return PageFigure("fig-trials", _svg(fig, "fig-trials"), caption)


def render_calibration_page(report: CalibrationReport) -> str:
    """A calibration job's report as a self-contained page (templates/calibration.html.j2)."""
    timings = [(k, v) for k, v in report.job.timings.items() if k != "total"]
    return _environment().get_template("calibration.html.j2").render(
        r=report, timings=timings, total=report.job.timings.get("total"), trials_figure=_trials_figure(report))
