"""The report's figures, drawn with matplotlib as inline SVG.

Deterministic: the same report gives the same bytes (``svg.hashsalt`` fixed, no date or creator in
the metadata, text kept as text), so a stored page can be rendered again and compared. The figures
are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot's global state, with the
Agg backend selected for anything that asks.

What a reader needs from a figure is also printed: counts above the histogram bars, accuracies on
the per-bin bars, and the per-class and per-band values in the tables beside the figures
(templates/job.html.j2). Every colour drawn has a legend entry; bars never overlap. An accuracy
axis is zoomed to the data so that a drop of a few points shows, and then says where it starts.
"""

from __future__ import annotations

import bisect
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

# Okabe–Ito colours (told apart with the common colour-vision deficiencies).
BEFORE, AFTER, REFERENCE = "#999999", "#0072B2", "#E69F00"
FORGET, TEST = "#D55E00", "#0072B2"
BIN_COLOURS = ("#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#D55E00", "#0072B2", "#F0E442", "#000000")
INK = "#222222"

RC = {
    "svg.hashsalt": "unlearnd-report",
    "svg.fonttype": "none",  # text stays text: searchable, selectable, small
    "text.parse_math": False,  # a user's "$" is a dollar sign, not mathtext
    "text.usetex": False,
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial"],
    "font.size": 9,
    "axes.edgecolor": INK,
    "axes.labelcolor": INK,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "axes.axisbelow": True,
    "grid.color": "#e3e3e3",
    "legend.frameon": False,
    "figure.dpi": 72,
    "path.simplify": False,
}
WIDTH = 9.0  # inches, at 72 dpi: 648 px, the page's column


@dataclass(frozen=True)
class Axis:
    """A zoomed accuracy axis: its limits and whether it starts above 0."""

    low: float
    high: float

    @property
    def zoomed(self) -> bool:
        return self.low > 0

    def label(self, what: str) -> str:
        return f"{what} (axis starts at {self.low * 100:.0f}%, not 0)" if self.zoomed else what


def accuracy_axis(values: Sequence[float | None]) -> Axis:
    """Limits for fractions in [0, 1] that show their differences: a margin around the data, the low end
    on a whole percent (a multiple of 5 when the data spread widely), 0 when the data reach near 0."""
    data = [v for v in values if v is not None and math.isfinite(v)]
    if not data:
        return Axis(0.0, 1.0)
    lo, hi = min(data), max(data)
    pad = max(0.01, 0.15 * (hi - lo))
    step = 0.05 if hi - lo > 0.2 else 0.01
    low = max(0.0, math.floor((lo - pad) / step) * step)
    if low < 0.1:
        low = 0.0
    return Axis(round(low, 4), min(1.0, hi) + pad)


def _percent_axis(ax, axis: Axis) -> None:
    ax.set_ylim(axis.low, axis.high)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ticks = [t for t in ax.get_yticks() if axis.low - 1e-9 <= t <= 1.0 + 1e-9]
    ax.set_yticks(ticks)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 100:.0f}%" if abs(v * 100 - round(v * 100)) < 1e-6
                                               else f"{v * 100:.1f}%"))
    ax.set_ylim(axis.low, axis.high)


def _figure(height: float, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(WIDTH, height))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def to_svg(fig: Figure, prefix: str) -> str:
    """The figure as an ``<svg>`` element to inline in HTML: no XML declaration, doctype or metadata;
    every id prefixed so that two figures on one page never share one."""
    buffer = io.StringIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buffer, format="svg", bbox_inches="tight", pad_inches=0.05,
                    metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(r'url\(#([^)]+)\)', rf'url(#{prefix}-\1)', svg)
    svg = re.sub(r'xlink:href="#([^"]+)"', rf'xlink:href="#{prefix}-\1"', svg)
    return svg.replace("<svg ", '<svg role="img" ', 1).strip()


def _draw(fn):
    """Draw under the report's rcParams (so that fonts and sizes are the same as when saved)."""
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return fn(*args, **kwargs)
    wrapper.__doc__, wrapper.__name__ = fn.__doc__, fn.__name__
    return wrapper


# --------------------------------------------------------------------------- (a) proxy values by bin


@dataclass(frozen=True)
class ProxyBar:
    low: float
    high: float
    count: int
    bin: int


def proxy_bars(values: Sequence[float], thresholds: Sequence[float]) -> list[ProxyBar]:
    """Equal-width bars within each band between thresholds (no bar straddles a bin boundary); a value
    on a threshold belongs to the lower bin, as in the engine (worker/engine/refine.py)."""
    thresholds = sorted(thresholds)
    lo, hi = min([*values, *thresholds]), max([*values, *thresholds])
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    edges = [lo]
    for a, b in zip([lo, *thresholds], [*thresholds, hi]):
        pieces = max(1, round(24 * (b - a) / (hi - lo))) if b > a else 0
        edges += [a + (b - a) * (i + 1) / pieces for i in range(pieces)]
    counts = [0] * (len(edges) - 1)
    for v in values:
        counts[min(max(bisect.bisect_left(edges, v) - 1, 0), len(counts) - 1)] += 1
    return [ProxyBar(a, b, c, bisect.bisect_left(thresholds, (a + b) / 2))
            for a, b, c in zip(edges, edges[1:], counts)]


@_draw
def proxy_plot(values: Sequence[float], thresholds: Sequence[float], bin_names: Sequence[str],
               proxy_name: str) -> Figure:
    fig, (ax,) = _figure(3.2)
    bars = proxy_bars(values, thresholds)
    for bar in bars:
        colour = BIN_COLOURS[bar.bin % len(BIN_COLOURS)]
        ax.bar(bar.low, bar.count, width=bar.high - bar.low, align="edge", color=colour, edgecolor="white",
               linewidth=0.5)
        if bar.count:
            ax.annotate(str(bar.count), ((bar.low + bar.high) / 2, bar.count), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7)
    for t in thresholds:
        ax.axvline(t, color=INK, linestyle="--", linewidth=1)
    handles = [Patch(color=BIN_COLOURS[i % len(BIN_COLOURS)], label=name)
               for i, name in enumerate(bin_names)]
    if thresholds:
        handles.append(Line2D([], [], color=INK, linestyle="--", linewidth=1, label="threshold"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, 1.16), ncol=len(handles), fontsize=8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: whole numbers only
    ax.set_ylim(0, max(1, max(b.count for b in bars)) * 1.15)
    ax.set_xlabel(f"proxy value ({proxy_name}); higher = more memorized")
    ax.set_ylabel("forget examples")
    return fig


# --------------------------------------------------------------------------- (b) confidence


BANDS = 10


def confidence_shares(values: Sequence[float]) -> list[float | None]:
    """The share of examples in each confidence band [0, 0.1), …, [0.9, 1.0]."""
    if not values:
        return [None] * BANDS
    counts = [0] * BANDS
    for v in values:
        counts[min(max(int(v * BANDS), 0), BANDS - 1)] += 1
    return [c / len(values) for c in counts]


@_draw
def confidence_plot(panels: Sequence[tuple[str, Sequence[float], Sequence[float]]]) -> Figure:
    """One panel per (title, forget confidences, test confidences); forget and test bars side by side."""
    fig, axes = _figure(3.0, ncols=len(panels))
    width = 0.4 / BANDS
    top = 0.0
    for ax, (title, forget, test) in zip(axes, panels):
        for offset, colour, values, label in ((-width / 2, FORGET, forget, "forget set"),
                                              (width / 2, TEST, test, "test set")):
            shares = [s or 0.0 for s in confidence_shares(values)]
            centres = [(i + 0.5) / BANDS + offset for i in range(BANDS)]
            ax.bar(centres, shares, width=width, color=colour, label=f"{label} (n = {len(values):,})")
            top = max(top, *shares)
        ax.set_title(title, fontsize=10, fontweight="bold")
        ax.set_xlim(0, 1)
        ax.set_xticks([i / BANDS for i in range(0, BANDS + 1, 2)])
        ax.set_xlabel("confidence p(true label)")
        ax.legend(loc="upper left", fontsize=8)
    for ax in axes:
        ax.set_ylim(0, max(top, 0.01) * 1.12)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 100:.0f}%"))
    axes[0].set_ylabel("share of examples")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- (c), (d) grouped bars


@dataclass(frozen=True)
class Series:
    name: str
    colour: str
    values: Sequence[float | None]


@_draw
def accuracy_bars(categories: Sequence[str], series: Sequence[Series], xlabel: str, ylabel: str, *,
                  lines: Sequence[tuple[float, str, str]] = (), labels_on_bars: bool = False,
                  height: float = 3.2) -> tuple[Figure, Axis]:
    """Grouped bars of accuracies per category, side by side, with optional horizontal reference lines
    (value, legend label, colour); the axis zoomed to the data."""
    fig, (ax,) = _figure(height)
    axis = accuracy_axis([v for s in series for v in s.values] + [y for y, _, _ in lines])
    width = 0.8 / max(len(series), 1)
    for j, s in enumerate(series):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(categories))]
        heights = [v if v is not None else 0.0 for v in s.values]
        bars = ax.bar(xs, [h - axis.low for h in heights], bottom=axis.low, width=width * 0.95, color=s.colour,
                      label=s.name)
        if labels_on_bars:
            ax.bar_label(bars, labels=[f"{v * 100:.1f}%" if v is not None else "—" for v in s.values],
                         padding=2, fontsize=7)
    for y, label, colour in lines:
        ax.axhline(y, color=colour, linestyle="--", linewidth=1.2, label=label)
    _percent_axis(ax, axis)
    ax.set_xticks(range(len(categories)), categories, fontsize=8)
    ax.set_xlim(-0.6, len(categories) - 0.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(axis.label(ylabel))
    ax.legend(loc="upper left", bbox_to_anchor=(0, 1.18), ncol=len(series) + len(lines), fontsize=8)
    return fig, axis


__all__ = ["AFTER", "BEFORE", "BIN_COLOURS", "FORGET", "REFERENCE", "TEST", "Axis", "ProxyBar", "Series",
           "accuracy_axis", "accuracy_bars", "confidence_plot", "confidence_shares", "proxy_bars", "proxy_plot",
           "to_svg"]
