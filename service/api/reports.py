"""The job report as one self-contained HTML page (``GET /v1/jobs/{id}/report.html``).

:func:`render_html` turns the worker's ``unlearnd.report/1`` JSON into a page for two readers: a
compliance officer (the erasure record of CONVENTIONS.md: case, requests, scope, actions, timings,
evidence of effect) and an ML engineer (metrics, guardrails, per-bin steps, config and four plots).

The page loads nothing: inline CSS, inline SVG drawn here by a few helpers (frame, axes, bars,
histogram, lines, legend), no script. Every string taken from the report is escaped, since names,
reasons and ids come from users. Any value may be null or missing and is shown as "—": a report is
evidence, and rendering it must not fail on a NaN that became null. Plain Python only; the service
process never imports torch or a plotting library.
"""

from __future__ import annotations

import bisect
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["SCHEMA", "render_html"]

SCHEMA = "unlearnd.report/1"
DASH = "—"
METRIC_ROWS = (
    ("acc_forget", "Forget accuracy"),
    ("acc_retain", "Retain accuracy"),
    ("acc_test", "Test accuracy"),
    ("mia", "MIA efficacy (confidence)"),
    ("mia_entropy", "MIA efficacy (entropy)"),
)
# The engine's bin names (worker.engine.refine.level_names), repeated here: the service never imports the engine.
LEVEL_NAMES = {1: ("all",), 2: ("low", "high"), 3: ("low", "mid", "high")}

# Okabe–Ito colours (distinguishable with the common colour-vision deficiencies).
BEFORE, AFTER, REFERENCE = "#999999", "#0072B2", "#E69F00"
FORGET, TEST = "#D55E00", "#0072B2"
BIN_COLOURS = ("#009E73", "#E69F00", "#D55E00", "#CC79A7", "#56B4E9", "#0072B2", "#F0E442", "#000000")
INK, GRID, MUTED = "#222222", "#e3e3e3", "#666666"


# --------------------------------------------------------------------------- values from the report


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    """A finite number, or None for null, NaN, infinities, booleans and anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        v = float(value)
    except OverflowError:
        return None
    return v if math.isfinite(v) else None


def _nums(values: Any) -> list[float]:
    return [v for v in map(_num, _list(values)) if v is not None]


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _text(value: Any) -> str:
    """Escaped text for a cell, "—" when there is nothing to show."""
    if value is None or value == "" or value == [] or value == {}:
        return DASH
    if isinstance(value, float) and not math.isfinite(value):
        return DASH
    return _esc(value)


def _pct(value: Any) -> str:
    v = _num(value)
    return DASH if v is None else f"{v * 100:.2f}%"


def _pts(value: Any) -> str:
    """A difference of two fractions, in percentage points."""
    v = _num(value)
    return DASH if v is None else f"{v * 100:+.2f} pts"


def _dec(value: Any, digits: int = 4) -> str:
    v = _num(value)
    return DASH if v is None else f"{v:.{digits}f}"


def _count(value: Any) -> str:
    v = _num(value)
    if v is None:
        return DASH
    return f"{int(v):,}" if v == int(v) else f"{v:,}"


def _seconds(value: Any) -> str:
    v = _num(value)
    if v is None:
        return DASH
    if v < 60:
        return f"{v:.2f} s"
    minutes, seconds = divmod(v, 60)
    if minutes < 60:
        return f"{int(minutes)} min {seconds:04.1f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes):02d} min"


def _size(value: Any) -> str:
    v = _num(value)
    if v is None:
        return DASH
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if v >= scale:
            return f"{v / scale:.1f} {unit} ({int(v):,} bytes)"
    return f"{int(v):,} bytes"


def _diff(a: Any, b: Any) -> float | None:
    x, y = _num(a), _num(b)
    return None if x is None or y is None else x - y


def _json(value: Any, indent: int | None = None) -> str:
    separators = (", ", ": ") if indent is None else None
    for sort_keys in (True, False):  # keys of mixed types cannot be sorted
        try:
            return json.dumps(value, sort_keys=sort_keys, default=str, ensure_ascii=False, indent=indent,
                              separators=separators)
        except (TypeError, ValueError):
            continue
    return str(value)


def _json_code(value: Any) -> str:
    return DASH if value is None else _code(_json(value))


def _code(value: Any) -> str:
    return DASH if value in (None, "") else f"<code>{_esc(value)}</code>"


def _short_hash(value: Any, keep: int = 12) -> str:
    """The first characters of a digest, with the full digest in the title attribute (hover, copy)."""
    if value in (None, ""):
        return DASH
    full = str(value)
    shown = full if len(full) <= keep else full[:keep] + "…"
    return f'<code title="{_esc(full)}">{_esc(shown)}</code>'


def _version(value: Any) -> str:
    return DASH if value in (None, "") else f"v{_esc(value)}"


def _when(value: Any) -> datetime | None:
    """An ISO timestamp as an aware datetime (naive ones are taken as UTC), or None."""
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _level_names(k: int) -> tuple[str, ...]:
    return LEVEL_NAMES.get(k, tuple(f"bin{i}" for i in range(k)))


# --------------------------------------------------------------------------- SVG helpers


def _px(v: float) -> str:
    return f"{v:.1f}".removesuffix(".0")


def _el(tag: str, content: str = "", **attrs: Any) -> str:
    """One SVG element; ``content`` is markup (already escaped). ``class_``/``font_size`` → ``class``/``font-size``."""
    parts = []
    for name, value in attrs.items():
        if value is None:
            continue
        text = _px(value) if isinstance(value, float) else str(value)
        parts.append(f' {name.rstrip("_").replace("_", "-")}="{_esc(text)}"')
    attributes = "".join(parts)
    return f"<{tag}{attributes}>{content}</{tag}>" if content else f"<{tag}{attributes}/>"


def _label(x: float, y: float, text: str, anchor: str = "middle", **attrs: Any) -> str:
    return _el("text", _esc(text), x=float(x), y=float(y), text_anchor=anchor, **attrs)


def _tip(text: str) -> str:
    """A hover tooltip: the ``<title>`` child of an SVG shape."""
    return _el("title", _esc(text))


@dataclass(frozen=True)
class Frame:
    """The plotting area of one panel: data coordinates (x0..x1, y0..y1) mapped onto a pixel box."""

    left: float
    top: float
    width: float
    height: float
    x0: float
    x1: float
    y0: float
    y1: float

    @property
    def right(self) -> float:
        return self.left + self.width

    @property
    def bottom(self) -> float:
        return self.top + self.height

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * self.width

    def py(self, y: float) -> float:
        y = min(max(y, self.y0), self.y1)
        return self.bottom - (y - self.y0) / (self.y1 - self.y0) * self.height


def _step(span: float, target: int = 5) -> float:
    """A 1-2-2.5-5 tick step giving about ``target`` ticks over ``span``."""
    raw = span / max(target, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if raw <= m * magnitude * (1 + 1e-9))


def _tick_text(v: float, step: float) -> str:
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3g}"
    decimals = 0
    while decimals < 6 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
        decimals += 1
    return f"{v:.{decimals}f}"


def _ticks(lo: float, hi: float, target: int = 5, fmt=None) -> list[tuple[float, str]]:
    """Round tick values in [lo, hi] with their labels."""
    step = _step(hi - lo, target)
    first = math.ceil(lo / step - 1e-9)
    out = []
    i = first
    while i * step <= hi + step * 1e-9:
        v = i * step
        out.append((v, fmt(v) if fmt else _tick_text(v, step)))
        i += 1
    return out


def _nice_top(v: float) -> float:
    """The smallest round number ≥ v (the top of a count axis)."""
    if v <= 0:
        return 1.0
    step = _step(v)
    return math.ceil(v / step - 1e-9) * step


def _percent_tick(v: float) -> str:
    return f"{v * 100:.0f}%"


def _axes(f: Frame, xticks: Sequence[tuple[float, str]], yticks: Sequence[tuple[float, str]],
          xlabel: str = "", ylabel: str = "") -> str:
    """Horizontal grid lines, the two axis lines, tick marks and labels (a label may have a second line)."""
    parts = []
    for y, text in yticks:
        py = f.py(y)
        parts.append(_el("line", x1=f.left, x2=f.right, y1=py, y2=py, stroke=GRID))
        parts.append(_label(f.left - 6, py + 4, text, anchor="end"))
    lines = 1
    for x, text in xticks:
        px = f.px(x)
        parts.append(_el("line", x1=px, x2=px, y1=f.bottom, y2=f.bottom + 4, stroke=INK))
        for i, line in enumerate(text.split("\n")):
            parts.append(_label(px, f.bottom + 16 + 12 * i, line, fill=INK if i == 0 else MUTED))
        lines = max(lines, text.count("\n") + 1)
    parts.append(_el("line", x1=f.left, x2=f.left, y1=f.top, y2=f.bottom, stroke=INK))
    parts.append(_el("line", x1=f.left, x2=f.right, y1=f.bottom, y2=f.bottom, stroke=INK))
    if xlabel:
        parts.append(_label((f.left + f.right) / 2, f.bottom + 20 + 12 * lines, xlabel, font_weight="bold"))
    if ylabel:
        x, y = f.left - 46, (f.top + f.bottom) / 2
        parts.append(_label(x, y, ylabel, font_weight="bold", transform=f"rotate(-90 {_px(x)} {_px(y)})"))
    return "".join(parts)


def _bar(f: Frame, x0: float, x1: float, y: float, fill: str, tip: str, **attrs: Any) -> str:
    """One bar from the x axis (y = y0) up to y, spanning x0..x1 in data coordinates."""
    left, right, top, base = f.px(x0), f.px(x1), f.py(y), f.py(f.y0)
    return _el("rect", _tip(tip), x=left, y=top, width=max(right - left, 0.5), height=max(base - top, 0.0),
               fill=fill, class_="bar", **attrs)


def _histogram(f: Frame, edges: Sequence[float], heights: Sequence[float], fills: Sequence[str],
               tips: Sequence[str], *, opacity: float = 1.0, outline: str | None = None) -> str:
    """Bars on [edges[i], edges[i+1]] with their own fill, and optionally a step line over their tops."""
    parts = [_bar(f, a, b, h, fill, tip, fill_opacity=opacity if opacity < 1 else None)
             for a, b, h, fill, tip in zip(edges, edges[1:], heights, fills, tips)]
    if outline and heights:
        points = [(f.px(edges[0]), f.py(f.y0))]
        for a, b, h in zip(edges, edges[1:], heights):
            points += [(f.px(a), f.py(h)), (f.px(b), f.py(h))]
        points.append((f.px(edges[-1]), f.py(f.y0)))
        d = "M" + " L".join(f"{_px(x)} {_px(y)}" for x, y in points)
        parts.append(_el("path", d=d, fill="none", stroke=outline, stroke_width=1.6))
    return "".join(parts)


@dataclass(frozen=True)
class Series:
    """One coloured series of a grouped bar chart: a value (or None) per category."""

    name: str
    colour: str
    values: Sequence[float | None]


def _grouped_bars(f: Frame, categories: Sequence[str], series: Sequence[Series], fmt=_pct,
                  max_px: float = 56) -> str:
    """Category i spans [i, i+1] on the x axis; its bars share up to 80% of it (at most max_px each), centred."""
    width = min(0.8 / max(len(series), 1), max_px * (f.x1 - f.x0) / f.width)
    start = 0.5 - width * len(series) / 2
    parts = []
    for i, category in enumerate(categories):
        for j, s in enumerate(series):
            v = s.values[i] if i < len(s.values) else None
            if v is None:
                continue
            x0 = i + start + j * width
            parts.append(_bar(f, x0, x0 + width, v, s.colour, f"{category}: {s.name} {fmt(v)}"))
    return "".join(parts)


def _vline(f: Frame, x: float, colour: str, tip: str, label: str = "") -> str:
    px = f.px(x)
    out = _el("line", _tip(tip), x1=px, x2=px, y1=f.top, y2=f.bottom, stroke=colour, stroke_width=1.5,
              stroke_dasharray="5 3")
    return out + (_label(px, f.top - 3, label, fill=colour, font_size=10) if label else "")


def _hline(f: Frame, y: float, colour: str, tip: str) -> str:
    py = f.py(y)
    return _el("line", _tip(tip), x1=f.left, x2=f.right, y1=py, y2=py, stroke=colour, stroke_width=1.5,
               stroke_dasharray="5 3")


def _legend(x: float, y: float, items: Sequence[tuple[str, str, str]]) -> str:
    """A row of legend entries (label, colour, "box" or "dash") starting at (x, y)."""
    parts = []
    for text, colour, kind in items:
        if kind == "dash":
            parts.append(_el("line", x1=x, x2=x + 16, y1=y - 4, y2=y - 4, stroke=colour, stroke_width=2,
                             stroke_dasharray="5 3"))
        else:
            parts.append(_el("rect", x=x + 3, y=y - 9, width=10, height=10, fill=colour))
        parts.append(_label(x + 20, y, text, anchor="start"))
        x += 32 + 6.2 * len(text)
    return _el("g", "".join(parts), class_="legend")


def _no_data(f: Frame, message: str) -> str:
    box = _el("rect", x=f.left, y=f.top, width=f.width, height=f.height, fill="#fafafa", stroke=GRID)
    return box + _label((f.left + f.right) / 2, (f.top + f.bottom) / 2, message, fill=MUTED)


def _svg(width: int, height: int, title: str, body: str) -> str:
    """A standalone SVG document (well-formed XML) with its title drawn and given as ``<title>``."""
    heading = _label(width / 2, 18, title, font_size=13, font_weight="bold")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" font-family="system-ui, -apple-system, Segoe UI, Helvetica, Arial, '
            f'sans-serif" font-size="11" fill="{INK}">{_tip(title)}{heading}{body}</svg>')


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{caption}</figcaption></figure>"


WIDTH, HEIGHT = 760, 320
MARGIN = {"left": 70, "right": 20, "top": 58, "bottom": 56}


def _frame(x0: float, x1: float, y0: float, y1: float, left: float = MARGIN["left"],
           width: float = WIDTH - MARGIN["left"] - MARGIN["right"], top: float = MARGIN["top"]) -> Frame:
    return Frame(left, top, width, HEIGHT - top - MARGIN["bottom"], x0, x1, y0, y1)


def _bar_chart(title: str, categories: Sequence[str], series: Sequence[Series], xlabel: str,
               lines: Sequence[tuple[float | None, str, str]] = ()) -> str:
    """Grouped bars of fractions in [0, 1] per category, with optional horizontal reference lines."""
    series = [s for s in series if any(v is not None for v in s.values)]
    f = _frame(0, max(len(categories), 1), 0, 1)
    if not categories or not series:
        return _svg(WIDTH, HEIGHT, title, _no_data(f, "no data in this report"))
    legend = _legend(f.left, 40, [(s.name, s.colour, "box") for s in series]
                     + [(f"{label} ({_pct(y)})", colour, "dash") for y, label, colour in lines if y is not None])
    every = math.ceil(len(categories) / 20)  # at most ~20 labels on the x axis
    xticks = [(i + 0.5, c) for i, c in enumerate(categories) if i % every == 0]
    body = _axes(f, xticks, _ticks(0, 1, 5, _percent_tick), xlabel, "accuracy")
    body += _grouped_bars(f, [c.replace("\n", " · ") for c in categories], series)
    for y, label, colour in lines:
        if y is not None:
            body += _hline(f, y, colour, f"{label}: {_pct(y)}")
    return _svg(WIDTH, HEIGHT, title, legend + body)


# --------------------------------------------------------------------------- the four plots


def _proxy_plot(report: dict) -> str:
    """(a) The forget set's proxy values, bars coloured by the bin they fall into, thresholds as dashed lines."""
    proxy = _dict(report.get("proxy"))
    values = _nums(proxy.get("forget_values"))
    thresholds = sorted(_nums(proxy.get("thresholds")))
    k = len(thresholds) + 1
    levels = dict(zip(range(k), _level_names(k)))
    for b in _list(report.get("bins")):
        index = _num(_dict(b).get("index"))
        if index is not None and _dict(b).get("level") not in (None, ""):
            levels[int(index)] = str(_dict(b)["level"])
    name = str(proxy.get("name") or "proxy")
    title = f"Forget set by memorization proxy ({name}), {k} bin{'s' if k > 1 else ''}"
    names = [f"bin {i}" if levels[i] == f"bin{i}" else f"bin {i} · {levels[i]}" for i in range(k)]
    legend = _legend(MARGIN["left"], 40, [(n, BIN_COLOURS[i % len(BIN_COLOURS)], "box") for i, n in enumerate(names)]
                     + ([("threshold", INK, "dash")] if thresholds else []))
    if not values:
        return _svg(WIDTH, HEIGHT, title, legend + _no_data(_frame(0, 1, 0, 1), "no proxy values in this report"))
    lo, hi = min(values + thresholds), max(values + thresholds)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    # Each band between thresholds gets its own equal-width bars, so no bar straddles a bin boundary.
    edges: list[float] = [lo]
    for a, b in zip([lo, *thresholds], [*thresholds, hi]):
        pieces = max(1, round(30 * (b - a) / (hi - lo))) if b > a else 0
        edges += [a + (b - a) * (i + 1) / pieces for i in range(pieces)]
    counts = [0] * (len(edges) - 1)
    for v in values:  # a value on an edge counts in the bar that ends there
        counts[min(max(bisect.bisect_left(edges, v) - 1, 0), len(counts) - 1)] += 1
    # A value on a threshold belongs to the lower bin (the engine's rule), as does the bar ending there.
    bins = [bisect.bisect_left(thresholds, (a + b) / 2) for a, b in zip(edges, edges[1:])]
    tips = [f"{a:.4g} to {b:.4g}: {c} samples · bin {i} ({levels[i]})"
            for a, b, c, i in zip(edges, edges[1:], counts, bins)]
    f = _frame(lo, hi, 0, _nice_top(max(counts)))
    body = _axes(f, _ticks(lo, hi, 8), _ticks(0, f.y1, 5), f"proxy value ({name}); higher = more memorized",
                 "forget samples per bar")
    body += _histogram(f, edges, counts, [BIN_COLOURS[i % len(BIN_COLOURS)] for i in bins], tips, opacity=0.85)
    body += "".join(_vline(f, t, INK, f"threshold {i + 1}: {t:.6g}", f"{t:.3g}") for i, t in enumerate(thresholds))
    return _svg(WIDTH, HEIGHT, title, legend + body)


def _confidence_plot(report: dict) -> str:
    """(b) Two panels, before and after: share of forget vs test examples by confidence in the true label."""
    conf = _dict(report.get("confidence"))
    edges = [i / 20 for i in range(21)]

    def shares(values: list[float]) -> list[float]:
        counts = [0] * 20
        for v in values:
            counts[min(max(int(v * 20), 0), 19)] += 1
        return [c / len(values) for c in counts]

    panels = []
    for when in ("before", "after"):
        forget, test = _nums(conf.get(f"forget_{when}")), _nums(conf.get(f"test_{when}"))
        panels.append((when, [("forget", FORGET, forget), ("test", TEST, test)]))
    top = max([max(shares(v)) for _, series in panels for _, _, v in series if v] or [1.0])
    title = "Confidence in the true label: forget vs test examples"
    legend = _legend(MARGIN["left"], 40, [("forget set", FORGET, "box"), ("test set", TEST, "box")])
    body = ""
    gap, width = 70, (WIDTH - MARGIN["left"] - MARGIN["right"] - 70) / 2
    for p, (when, series) in enumerate(panels):
        f = _frame(0, 1, 0, _nice_top(top), left=MARGIN["left"] + p * (width + gap), width=width, top=88)
        present = [(name, colour, v) for name, colour, v in series if v]
        means = ", ".join(f"{name} {sum(v) / len(v):.3f}" for name, _, v in present)
        body += _label((f.left + f.right) / 2, f.top - 22, f"{when} unlearning", font_weight="bold", font_size=12)
        if means:
            body += _label((f.left + f.right) / 2, f.top - 8, f"mean confidence: {means}", fill=MUTED)
        if not present:
            body += _no_data(f, f"no confidences {when} unlearning")
            continue
        body += _axes(f, _ticks(0, 1, 5), _ticks(0, f.y1, 5, _percent_tick), "confidence p(true label)",
                      "share of examples" if p == 0 else "")
        for name, colour, v in present:
            heights = shares(v)
            tips = [f"{name} {when}: {a:.2f} to {b:.2f}: {_pct(h)} of {len(v):,}"
                    for a, b, h in zip(edges, edges[1:], heights)]
            body += _histogram(f, edges, heights, [colour] * 20, tips, opacity=0.3, outline=colour)
    return _svg(WIDTH, HEIGHT, title, legend + body)


def _per_class_plot(report: dict) -> str:
    """(c) Test accuracy per class: before, after and (when given) the retrain reference."""
    pca = _dict(report.get("per_class_accuracy"))
    raw = {key: [_num(v) for v in _list(pca.get(key))] for key in ("before", "after", "reference")}
    classes = _list(pca.get("classes")) or list(range(max(len(v) for v in raw.values())))
    series = [Series("before", BEFORE, raw["before"]), Series("after", AFTER, raw["after"])]
    if pca.get("reference") is not None:
        series.append(Series("retrain reference", REFERENCE, raw["reference"]))
    return _bar_chart("Test accuracy per class", [str(c) for c in classes], series, "class")


def _per_bin_plot(report: dict) -> str:
    """(d) Forget accuracy of each bin before and after its step, against the test accuracy after."""
    bins = sorted((_dict(b) for b in _list(report.get("bins"))),
                  key=lambda b: _num(b.get("index")) if _num(b.get("index")) is not None else math.inf)
    categories = [f"bin {_count(b.get('index'))} · {b.get('level') or DASH}\n{b.get('method') or DASH}" for b in bins]
    series = [Series(name, colour, [_num(_dict(b.get(name)).get("acc_forget")) for b in bins])
              for name, colour in (("before", BEFORE), ("after", AFTER))]
    metrics = _dict(report.get("metrics"))
    lines = [(_num(_dict(metrics.get("after")).get("acc_test")), "test accuracy after", TEST),
             (_num(_dict(metrics.get("reference")).get("acc_forget")), "retrain forget accuracy, all bins", REFERENCE)]
    return _bar_chart("Forget accuracy per memorization bin", categories, series, "bin (level, unlearner)", lines)


# --------------------------------------------------------------------------- page sections


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], **attrs: str) -> str:
    """A table; headers are plain text (escaped here), cells are markup (escaped by the caller)."""
    attributes = "".join(f' {k.rstrip("_")}="{_esc(v)}"' for k, v in attrs.items())
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{attributes}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fields(rows: Sequence[tuple[str, str]], **attrs: str) -> str:
    """A two-column field/value table; names are plain text, values are markup."""
    attributes = "".join(f' {k.rstrip("_")}="{_esc(v)}"' for k, v in attrs.items())
    body = "".join(f'<tr><th scope="row">{_esc(name)}</th><td>{value}</td></tr>' for name, value in rows)
    return f'<table class="fields"{attributes}><tbody>{body}</tbody></table>'


def _passed(value: Any) -> str:
    return "passed" if value is True else "failed" if value is False else DASH


GUARD_OUTCOMES = {
    "within": ("ended within the guard", "ok"),
    "restored": ("went past the guard: its last state within it was kept", "warn"),
    "input": ("went past the guard: the bin's input model was kept", "warn"),
    "off": ("guard off", "info"),
}


def _guard_outcome(outcome) -> str:
    """What the unlearner's accuracy guard did in one bin (docs/unlearning.md), as a badge."""
    if outcome is None:
        return DASH
    text, kind = GUARD_OUTCOMES.get(str(outcome), (str(outcome), "info"))
    return _badge(text, kind)


def _badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{_esc(text)}</span>'


def _arrow(before: str, after: str) -> str:
    return f"{before} → {after}"


def _header(report: dict) -> str:
    job, metrics = _dict(report.get("job")), _dict(report.get("metrics"))
    before, after = _dict(metrics.get("before")), _dict(metrics.get("after"))
    reference = metrics.get("reference")
    status = job.get("status")
    status_kind = {"succeeded": "ok", "failed": "bad", "canceled": "bad"}.get(str(status), "info")
    passed = _dict(report.get("guardrails")).get("passed")
    guard = (_badge("guardrails passed", "ok") if passed is True
             else _badge("guardrails failed: production not moved", "bad") if passed is False
             else _badge("guardrails not evaluated", "info"))
    gap_before = _pts(_diff(before.get("acc_forget"), before.get("acc_test")))
    gap_after = _pts(_diff(after.get("acc_forget"), after.get("acc_test")))
    forget_acc = _arrow(_pct(before.get("acc_forget")), _pct(after.get("acc_forget")))
    test_acc = _arrow(_pct(before.get("acc_test")), _pct(after.get("acc_test")))
    mia = f"MIA efficacy {_arrow(_pct(before.get('mia')), _pct(after.get('mia')))}"
    if isinstance(reference, dict):
        mia += (f" (retrain reference {_pct(reference.get('mia'))}, reference forget accuracy "
                f"{_pct(reference.get('acc_forget'))})")
    else:
        mia += " (no retrain reference)"
    verdict = [f"Forget accuracy <b>{forget_acc}</b> against test accuracy {test_acc} "
               f"(forget − test gap {_arrow(gap_before, gap_after)})", mia]
    schema = report.get("schema")
    warning = ("" if schema == SCHEMA else
               f'<p class="warn">Unexpected report schema {_text(schema)} (expected {SCHEMA}); shown as far as '
               "it matches.</p>")
    return (
        f"<header><h1>Erasure record — job {_text(job.get('id'))}</h1>"
        f'<p class="sub">Model <b>{_text(job.get("model_name"))}</b> (id {_text(job.get("model_id"))}) · version '
        f"{_arrow(_version(job.get('base_version')), _version(job.get('new_version')))} · "
        f"{_badge(f'status: {status or DASH}', status_kind)} {guard}</p>"
        f'<p class="verdict">{"; ".join(verdict)}.</p>{warning}</header>'
    )


def _deadline(request: dict, finished: datetime | None) -> str:
    due = _when(request.get("due_by"))
    if due is None or finished is None:
        return DASH
    return _badge("met", "ok") if finished <= due else _badge("missed", "bad")


def _record(report: dict) -> str:
    """The erasure record (CONVENTIONS.md): case, requests, scope, actions, timings, evidence, tamper evidence."""
    job, dataset = _dict(report.get("job")), _dict(report.get("dataset"))
    forget, proxy = _dict(report.get("forget_set")), _dict(report.get("proxy"))
    checkpoint, metrics = _dict(report.get("checkpoint")), _dict(report.get("metrics"))
    requests = [_dict(r) for r in _list(report.get("requests"))]
    finished = _when(job.get("finished_at"))

    case = _fields([
        ("Case (job) id", _text(job.get("id"))),
        ("Model", f"{_text(job.get('model_name'))} (id {_text(job.get('model_id'))})"),
        ("Status", _text(job.get("status"))),
        ("Created / started / finished", " / ".join(_text(job.get(k)) for k in ("created_at", "started_at",
                                                                                 "finished_at"))),
    ])
    request_rows = [[
        _code(r.get("id")), _text(r.get("reason")), _short_hash(r.get("subject_hash")), _text(r.get("received_at")),
        _text(r.get("due_by")), _deadline(r, finished), _count(r.get("n_samples")), _count(r.get("n_new_samples")),
        ", ".join(_code(x) for x in _list(r.get("linked_to"))) or DASH,
    ] for r in requests]
    request_table = (_table(["Request", "Reason", "Subject (hash)", "Received", "Due by", "Deadline", "Samples",
                             "New samples", "Linked to"], request_rows, class_="requests")
                     if requests else "<p>No deletion requests in this report.</p>")

    proxy_text = (f"memorization proxy <b>{_text(proxy.get('name'))}</b>, {_text(proxy.get('source'))}"
                  f" ({_seconds(proxy.get('compute_seconds'))} to compute), params {_json_code(proxy.get('params'))}"
                  if proxy else DASH)
    scope = _fields([
        ("Dataset", f"{_text(dataset.get('name'))} (id {_text(dataset.get('id'))}), "
                    f"{_count(dataset.get('n_train'))} train / {_count(dataset.get('n_test'))} test rows"),
        ("Dataset sha256", _code(dataset.get("sha256"))),
        ("Forget set (this job)", f"{_count(forget.get('n'))} samples"),
        ("Forget-set sample ids sha256", _code(forget.get("sample_ids_sha256"))),
        ("Forgotten before, still excluded", f"{_count(forget.get('n_excluded_before'))} samples kept out of the "
                                             "retain set"),
        ("Derived caches", proxy_text),
        ("Model version trained on them", _version(job.get("base_version"))),
    ])

    aliases = [str(a) for a in _list(report.get("aliases_moved"))]
    alias_text = ", ".join(_code(a) for a in aliases) or "none"
    if "production" not in aliases:
        alias_text += ' <span class="muted">(production not moved)</span>'
    actions = _fields([
        ("Batched into", f"job {_text(job.get('id'))} ({len(requests)} request{'s' if len(requests) != 1 else ''})"),
        ("Method", _code(report.get("method"))),
        ("Config sha256", _code(report.get("config_sha256"))),
        ("Seed", _text(report.get("seed"))),
        ("Versions", f"{_arrow(_version(job.get('base_version')), _version(job.get('new_version')))}"),
        ("Aliases moved", alias_text),
        ("Actor (worker / device)", f"{_text(job.get('worker'))} / {_text(job.get('device'))}"),
        ("Attempts", _text(job.get("attempts"))),
        ("Checkpoint", f"sha256 {_code(checkpoint.get('sha256'))}, {_size(checkpoint.get('size_bytes'))}"
         if checkpoint else DASH),
    ])

    timings = _dict(job.get("timings"))
    total = _num(timings.get("total"))
    stages = [(k, v) for k, v in timings.items() if k != "total"] + ([("total", timings["total"])]
                                                                     if "total" in timings else [])
    share = [_pct(_num(v) / total) if _num(v) is not None and total else DASH for _, v in stages]
    timing_table = (_table(["Stage", "Time", "Share of total"],
                           [[_esc(k), _seconds(v), s] for (k, v), s in zip(stages, share)], class_="timings")
                    if stages else "<p>No timings in this report.</p>")

    before, after = _dict(metrics.get("before")), _dict(metrics.get("after"))
    reference = metrics.get("reference")
    evidence = _fields([
        ("Forget accuracy", _arrow(_pct(before.get("acc_forget")), _pct(after.get("acc_forget")))),
        ("Test accuracy", _arrow(_pct(before.get("acc_test")), _pct(after.get("acc_test")))),
        ("MIA efficacy", _arrow(_pct(before.get("mia")), _pct(after.get("mia")))),
        ("Retrain reference", "forget accuracy " + _pct(_dict(reference).get("acc_forget")) + ", MIA efficacy "
         + _pct(_dict(reference).get("mia")) if isinstance(reference, dict) else "not requested by the policy"),
        ("Guardrails", _passed(_dict(report.get("guardrails")).get("passed"))),
        ("Run time", _seconds(timings.get("total"))),
        ("Details", '<a href="#metrics">metrics</a>, <a href="#plots">plots</a>'),
    ])
    return (
        '<section id="record"><h2>Erasure record</h2>'
        f"<h3>Case</h3>{case}<h3>Requests</h3>{request_table}<h3>Scope</h3>{scope}<h3>Actions</h3>{actions}"
        f"<h3>Timings</h3>{timing_table}<h3>Evidence of effect</h3>{evidence}"
        '<p class="note">Tamper evidence: this record is also written to the tenant\'s append-only, hash-chained '
        "audit log (<code>GET /v1/audit-log</code>, which reports whether the chain is intact). Not part of this "
        "report: identity verification, legal or refusal ground (Art. 17(1)/(3)), notification of recipients "
        "(Art. 19) and the response to the subject.</p></section>"
    )


def _metrics(report: dict) -> str:
    metrics, guard = _dict(report.get("metrics")), _dict(report.get("guardrails"))
    before, after = _dict(metrics.get("before")), _dict(metrics.get("after"))
    reference = metrics.get("reference")
    has_reference = isinstance(reference, dict)
    headers = ["Metric", "Before", "After", "Change"] + (["Reference (retrain)", "After − reference"]
                                                         if has_reference else [])
    rows = []
    for key, name in METRIC_ROWS:
        row = [f"{_esc(name)} <code>{key}</code>", _pct(before.get(key)), _pct(after.get(key)),
               _pts(_diff(after.get(key), before.get(key)))]
        if has_reference:
            row += [_pct(reference.get(key)), _pts(_diff(after.get(key), reference.get(key)))]
        rows.append(row)
    table = _table(headers, rows, id="metrics-table", class_="metrics")

    tow = [(name, metrics.get(key)) for key, name in (("tow", "ToW (after vs reference)"),
                                                      ("tow_mia", "ToW-MIA (after vs reference)"),
                                                      ("tow_before", "ToW before unlearning"))]
    tow_html = (_fields([(name, _dec(v)) for name, v in tow if v is not None], id="tow")
                if any(v is not None for _, v in tow) else
                '<p class="muted">ToW and ToW-MIA need a retrain reference; none in this report.</p>')

    def check(limit: Any, measured: Any) -> str:
        lim, m = _num(limit), _num(measured)
        if lim is None or m is None:
            return DASH
        return _badge("pass", "ok") if m <= lim + 1e-12 else _badge("fail", "bad")

    guard_rows = [[_esc(name), _pct(guard.get(limit)), _pct(guard.get(measured)), check(guard.get(limit),
                                                                                          guard.get(measured))]
                  for name, limit, measured in (("Test accuracy drop", "max_test_drop", "test_drop"),
                                                ("Retain accuracy drop", "max_retain_drop", "retain_drop"))]
    passed = guard.get("passed")
    guard_rows.append(["<b>Overall</b>", "", "", _badge("passed", "ok") if passed is True
                       else _badge("failed", "bad") if passed is False else DASH])

    bin_rows = []
    for b in (_dict(b) for b in _list(report.get("bins"))):
        b_before, b_after = _dict(b.get("before")), _dict(b.get("after"))
        run = _dict(b.get("run"))
        bin_rows.append([
            _text(b.get("index")), _text(b.get("level")), _count(b.get("n")), _code(b.get("method")),
            _json_code(b.get("hparams")), _seconds(b.get("seconds")), _pct(run.get("cost_share")),
            _guard_outcome(_dict(run.get("guard")).get("outcome")),
            _arrow(_pct(b_before.get("acc_forget")), _pct(b_after.get("acc_forget"))),
            _arrow(_pct(b_before.get("mia")), _pct(b_after.get("mia"))),
        ])
    bins_html = (_table(["Bin", "Level", "Samples", "Unlearner", "Hyperparameters", "Time", "Work (of training)",
                         "Guard", "Forget accuracy", "MIA efficacy"], bin_rows, class_="bins")
                 if bin_rows else "<p>No bins in this report.</p>")
    return (
        '<section id="metrics"><h2>Metrics</h2>'
        "<p>Accuracies on the forget set, the retain set (training data kept) and the test set; MIA efficacy is "
        "the share of forget examples a membership-inference attack calls non-member (higher = more forgotten; "
        "compare it with the retrain reference, not with 0 or 1).</p>"
        f"{table}{tow_html}<h3>Guardrails</h3>"
        f"{_table(['Guardrail', 'Largest allowed drop', 'Measured drop', 'Result'], guard_rows, class_='guard')}"
        f"<h3>Unlearning steps (per memorization bin)</h3>{bins_html}</section>"
    )


def _plots(report: dict) -> str:
    proxy = _dict(report.get("proxy"))
    thresholds = _nums(proxy.get("thresholds"))
    cuts = (f"thresholds on the proxy's training-set distribution ({_esc(', '.join(f'{t:.6g}' for t in thresholds))})"
            if thresholds else "no thresholds in this report, so a single bin")
    figures = [
        _figure(_proxy_plot(report),
                f"<b>(a)</b> How the forget set spreads over memorization bins. Bin boundaries (dashed) are {cuts}; "
                "a value on a threshold belongs to the lower bin. RUM unlearns the bins one after another, low to "
                "high; many examples in the high bin make forgetting harder. Proxy values were "
                f"{_text(proxy.get('source'))}. Hover a bar for its exact range and count."),
        _figure(_confidence_plot(report),
                "<b>(b)</b> Share of examples by the model's confidence in their true label. Before unlearning, "
                "forget examples (seen in training) sit near 1 while test examples spread lower. After unlearning "
                "the forget distribution should look like the test distribution: then a membership-inference "
                "attack cannot tell them apart."),
        _figure(_per_class_plot(report),
                "<b>(c)</b> Test accuracy per class before and after unlearning"
                + (" and for the model retrained without the forget set" if isinstance(
                    _dict(report.get("per_class_accuracy")).get("reference"), list) else "")
                + ". Look for a class that lost much more than the others: unlearning damaged it (often a class "
                  "the forget set is concentrated in)."),
        _figure(_per_bin_plot(report),
                "<b>(d)</b> Forget accuracy of each bin before and after its unlearning step. Forgetting shows as "
                "a drop toward the test accuracy (dashed line); a drop far below it over-forgets, which is itself "
                "a membership signal."),
    ]
    return '<section id="plots"><h2>Plots</h2>' + "".join(figures) + "</section>"


def _config(report: dict) -> str:
    config = report.get("config")
    return (
        '<section id="config"><h2>Configuration and attack</h2>'
        f"<p>Method {_code(report.get('method'))}, seed {_text(report.get('seed'))}, config sha256 "
        f"{_code(report.get('config_sha256'))}.</p>"
        f"<pre>{_esc(_json(config, indent=2)) if config is not None else DASH}</pre>"
        f"<h3>Membership-inference attack</h3><p>{_text(report.get('mia_attack'))}</p></section>"
    )


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#222;margin:0;background:#fff}
main{max-width:1000px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:20px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:#f4f4f4}table.fields th{background:#fafafa;width:240px;font-weight:600}
table.metrics td:not(:first-child),table.guard td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;word-break:break-all}
pre{background:#f6f8fa;border:1px solid #ddd;padding:10px;overflow:auto;font-size:12px}
.sub{margin:0 0 8px;color:#444}.verdict{font-size:15px;background:#f6f8fa;border-left:4px solid #0072B2;
padding:8px 12px}.warn{color:#9a3412}.muted,.note{color:#666}.note{font-size:13px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.ok{background:#dcfce7;color:#166534}.bad{background:#fee2e2;color:#991b1b}.info{background:#e0e7ff;color:#3730a3}
.badge.warn{background:#fef3c7;color:#92400e}
figure{margin:16px 0 28px}figure svg{max-width:100%;height:auto;display:block}
figcaption{font-size:13px;color:#444;max-width:760px}
footer{margin-top:40px;color:#888;font-size:12px}
@media print{main{max-width:none;padding:0}figure,table{break-inside:avoid}}
"""


def render_html(report: dict) -> str:
    """The job report (schema ``unlearnd.report/1``) as a self-contained HTML page.

    Sections: header with the verdict; the erasure record (case, requests, scope, actions, timings,
    evidence of effect); metrics, ToW, guardrails and per-bin steps; four inline SVG plots (proxy
    distribution by bin, forget vs test confidence before/after, per-class test accuracy, per-bin
    forget accuracy); config and the membership-inference attack. Never raises on null, missing or
    mistyped values.
    """
    report = _dict(report)
    job = _dict(report.get("job"))
    title = f"Erasure record — job {job.get('id') if job.get('id') is not None else DASH}"
    if job.get("model_name"):
        title += f" · {job['model_name']}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"{_header(report)}{_record(report)}{_metrics(report)}{_plots(report)}{_config(report)}"
        f"<footer>unlearnd · report schema {_text(report.get('schema'))}</footer>"
        "</main></body></html>\n"
    )


# --------------------------------------------------------------------------- calibration report


def _score_row(name: str, scores: Any) -> str:
    s = _dict(scores)
    return (f"<tr><th>{_esc(name)}</th><td>{_dec(s.get('score'))}</td><td>{_dec(s.get('tow'))}</td>"
            f"<td>{_dec(s.get('tow_mia'))}</td><td>{_pct(s.get('cost_share'))}</td></tr>")


def render_calibration_html(report: dict) -> str:
    """A calibration job's report (schema ``unlearnd.calibration/1``) as a self-contained page: the
    scores on the search and check sets (and the uncalibrated default's on the check set), the
    chosen policy and revision, cost and payback, and the trials table. Never raises on null,
    missing or mistyped values."""
    report = _dict(report)
    job = _dict(report.get("job"))
    rev = _dict(report.get("revision"))
    pay = _dict(report.get("payback"))
    title = f"Calibration — job {job.get('id') if job.get('id') is not None else DASH}"
    if job.get("model_name"):
        title += f" · {job['model_name']}"
    scores = ("<table><thead><tr><th></th><th>(ToW + ToW-MIA)/2</th><th>ToW</th><th>ToW-MIA</th>"
              "<th>cost (share of a retrain)</th></tr></thead><tbody>"
              f"{_score_row('search set (calibrated)', report.get('search'))}"
              f"{_score_row('check set (calibrated)', report.get('check'))}"
              f"{_score_row('check set (uncalibrated default)', report.get('default_check'))}</tbody></table>")
    rows = []
    for t in _list(report.get("trials")):
        t = _dict(t)
        rows.append(f"<tr><td>{_text(t.get('number'))}</td><td>{_text(t.get('state'))}</td>"
                    f"<td>{_dec(t.get('score'))}</td><td>{_dec(t.get('tow'))}</td><td>{_dec(t.get('tow_mia'))}</td>"
                    f"<td>{_pct(t.get('cost_share'))}</td><td>{_seconds(t.get('seconds'))}</td>"
                    f"<td>{_json_code(t.get('params'))}</td></tr>")
    trials = ("<table><thead><tr><th>#</th><th>state</th><th>score</th><th>ToW</th><th>ToW-MIA</th><th>cost</th>"
              f"<th>time</th><th>parameters</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    applied = "applied (current)" if rev.get("applied") else "recorded, not applied (the policy is pinned)"
    summary = (f"<p>Policy revision {_text(rev.get('number'))} ({_esc(applied)}), from revision "
               f"{_text(rev.get('previous'))}; base version {_text(job.get('base_version'))}. Cost "
               f"{_dec(report.get('cost_retrains'), 2)} retrain-equivalents in {_seconds(report.get('seconds'))}. "
               f"{_text(pay.get('summary'))}.</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{_esc(title)}</h1>{summary}<h2>Scores</h2>{scores}"
        f"<h2>Chosen policy</h2><p>{_json_code(report.get('policy'))}</p>"
        f"<h2>Trials</h2>{trials}"
        f"<h2>Settings and recipe</h2><p>{_json_code(report.get('settings'))}</p>"
        f"<p>{_json_code(report.get('recipe'))}</p>"
        f"<footer>unlearnd · report schema {_text(report.get('schema'))}</footer>"
        "</main></body></html>\n"
    )
