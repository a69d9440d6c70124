"""HTML reports of ``faultwatch eval``: one self-contained page per file, plots as inline SVG.

No plotting library: the page is text, opens in any browser, and needs nothing
installed on the machine that made it. Each page stacks, on one time axis:
every channel with the model's forecast of it, the anomaly score with its
threshold, and each baseline's score, all over a shaded background of the
labelled anomaly (red) and the raised fault (amber), with ▲/▼ marks where a
fault was raised/cleared and a dashed line where the test rows begin.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

WIDTH = 1100  # px of plot area
LEFT = 70  # px for the y labels
LABEL_COLOR = "#d62728"
FAULT_COLOR = "#ff9f1a"
COLORS = {"reading": "#1f77b4", "forecast": "#ff7f0e", "score": "#2c3e50", "threshold": "#d62728"}


@dataclass
class Panel:
    title: str
    lines: list[tuple[np.ndarray, str, str]] = field(default_factory=list)  # (values, color, label)
    height: int = 110
    log: bool = False


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.diff(np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True))


def _decimate(x: np.ndarray, y: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """At most 2 points per bucket (its min and max), so a long series keeps its spikes."""
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) <= 2 * buckets:
        return x, y
    edges = np.linspace(0, len(x), buckets + 1).astype(int)
    xs, ys = [], []
    for lo, hi in itertools.pairwise(edges):
        if hi <= lo:
            continue
        seg = y[lo:hi]
        i, j = lo + int(np.argmin(seg)), lo + int(np.argmax(seg))
        for k in sorted((i, j)):
            xs.append(x[k])
            ys.append(y[k])
    return np.asarray(xs), np.asarray(ys)


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return "0"
    a = abs(v)
    if a >= 1000 or a < 0.01:
        return f"{v:.2e}"
    return f"{v:.3g}"


def _panel_svg(panel: Panel, x: np.ndarray, x0: float, x1: float, label: np.ndarray | None,
               fault: np.ndarray | None, marks: Sequence[tuple[float, str]], split: float | None) -> str:
    h, pad = panel.height, 6
    values = [v for v, _, _ in panel.lines]
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.zeros(0)
    if panel.log:
        finite = finite[finite > 0]
    if len(finite) == 0:
        finite = np.array([0.0, 1.0])
    lo, hi = finite.min(), finite.max()
    if panel.log:  # three decades below the top are enough to see a score against its threshold
        lo = max(lo, hi / 1000)
    if panel.log:
        lo, hi = math.log10(max(lo, 1e-6)), math.log10(max(hi, 1e-6))
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5

    def px(v: Any) -> Any:  # a timestamp or an array of them → pixels, the same shape
        return LEFT + (v - x0) / max(x1 - x0, 1e-9) * WIDTH

    def py(v: np.ndarray) -> np.ndarray:
        v = np.log10(np.maximum(v, 1e-6)) if panel.log else v
        return pad + (1 - (v - lo) / (hi - lo)) * (h - 2 * pad)

    parts = [f'<svg width="{LEFT + WIDTH + 10}" height="{h}" xmlns="http://www.w3.org/2000/svg" '
             f'font-family="sans-serif" font-size="10">',
             f'<rect x="{LEFT}" y="0" width="{WIDTH}" height="{h}" fill="#fafafa" stroke="#ddd"/>']
    for mask, color, y, height in ((label, LABEL_COLOR, 0, h), (fault, FAULT_COLOR, 0, h)):
        if mask is None:
            continue
        for a, b in _runs(mask):
            xa = px(x[a])
            xb = px(x[b - 1]) if b - 1 > a else xa + 1
            parts.append(f'<rect x="{xa:.1f}" y="{y}" width="{max(xb - xa, 1):.1f}" height="{height}" '
                         f'fill="{color}" fill-opacity="0.13"/>')
    if split is not None:
        parts.append(f'<line x1="{px(split):.1f}" x2="{px(split):.1f}" y1="0" y2="{h}" stroke="#555" '
                     f'stroke-dasharray="4,3"/>')
    for at, kind in marks:
        color = "#c0392b" if kind == "raised" else "#27ae60"
        parts.append(f'<line x1="{px(at):.1f}" x2="{px(at):.1f}" y1="0" y2="{h}" stroke="{color}" '
                     f'stroke-width="1" stroke-opacity="0.7"/>')
    for values, color, _ in reversed(panel.lines):  # the first line (the reading) drawn on top
        xs, ys = _decimate(x, values, WIDTH)
        if len(xs) < 2:
            continue
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px(xs), py(ys), strict=True))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1"/>')
    top, bottom = (10**hi, 10**lo) if panel.log else (hi, lo)
    parts.append(f'<text x="{LEFT - 4}" y="{pad + 8}" text-anchor="end">{_fmt(top)}</text>')
    parts.append(f'<text x="{LEFT - 4}" y="{h - pad}" text-anchor="end">{_fmt(bottom)}</text>')
    legend = " · ".join(f'<tspan fill="{c}">{html.escape(name)}</tspan>' for _, c, name in panel.lines)
    parts.append(f'<text x="{LEFT + 6}" y="12" font-size="11"><tspan font-weight="bold">'
                 f'{html.escape(panel.title)}</tspan>  {legend}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _axis_svg(x0: float, x1: float, unit: str, scale: float) -> str:
    ticks = np.linspace(x0, x1, 9)
    parts = [f'<svg width="{LEFT + WIDTH + 10}" height="18" xmlns="http://www.w3.org/2000/svg" '
             f'font-family="sans-serif" font-size="10">']
    for t in ticks:
        xp = LEFT + (t - x0) / max(x1 - x0, 1e-9) * WIDTH
        parts.append(f'<text x="{xp:.1f}" y="12" text-anchor="middle">{(t - x0) / scale:.0f} {unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_page(title: str, subtitle: str, summary_rows: list[dict], panels: list[Panel],
                timestamps: np.ndarray, label: np.ndarray | None, fault: np.ndarray | None,
                marks: Sequence[tuple[float, str]], split_ts: float | None) -> str:
    """One report page. ``summary_rows``: one dict per detector (same keys), shown as a table."""
    x = np.asarray(timestamps, dtype=np.float64)
    x0, x1 = float(x[0]), float(x[-1])
    span = x1 - x0
    unit, scale = (("min", 60.0) if span < 6 * 3600 else ("h", 3600.0) if span < 4 * 86400
                   else ("days", 86400.0))
    head = ""
    if summary_rows:
        keys = list(summary_rows[0])
        head = ("<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in keys) + "</tr>"
                          for r in summary_rows) + "</table>")
    body = "\n".join(_panel_svg(p, x, x0, x1, label, fault, marks, split_ts) for p in panels)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 18px; margin: 0 0 4px; }} p {{ margin: 4px 0 10px; font-size: 13px; }}
table {{ border-collapse: collapse; font-size: 12px; margin-bottom: 10px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
th {{ background: #f0f0f0; }} svg {{ display: block; }}
.key span {{ display: inline-block; padding: 0 6px; margin-right: 8px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(subtitle)}</p>
{head}
<p class="key"><span style="background:{LABEL_COLOR}22">labelled anomaly</span>
<span style="background:{FAULT_COLOR}22">fault active (faultwatch)</span>
<span style="color:#c0392b">| fault raised</span><span style="color:#27ae60">| fault cleared</span>
<span>┆ test rows begin</span></p>
{body}
{_axis_svg(x0, x1, unit, scale)}
</body></html>
"""


def render_index(title: str, subtitle: str, rows: list[dict], links: list[tuple[str, str]]) -> str:
    """The run's index page: the summary table and a link per file."""
    keys = list(rows[0]) if rows else []
    table = ("<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in keys) + "</tr>"
                       for r in rows) + "</table>")
    items = "".join(f'<li><a href="{html.escape(href)}">{html.escape(name)}</a></li>' for name, href in links)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body {{ font-family: sans-serif; margin: 16px; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
th {{ background: #f0f0f0; }}</style>
</head><body><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p>{table}<ul>{items}</ul></body></html>
"""
