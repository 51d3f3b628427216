"""``report.html``: one offline file, no external resource, drawn by its own script.

The data goes in as JSON (series thinned to at most :data:`MAX_POINTS` per plot, keeping
each bucket's first, lowest, highest and last point so no spike is lost); a small script
draws each plot as SVG: the equity, the drawdown, and per symbol the close with the grid
levels (every limit price placed) and the fills (buys green, sells red). Each plot marks
itself ``data-drawn="1"`` once drawn, and any script error is shown on the page in
``#errors`` (the headless Chromium test reads both).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from gridstream.core.backtest import CLOSE_PLACES, BacktestResult
from gridstream.core.performance import HEADLINE, drawdown

MAX_POINTS: Final = 2000
MAX_LEVELS: Final = 4000
MAX_FILLS: Final = 4000


def thin(
    xs: Sequence[int] | np.ndarray, ys: Sequence[float] | np.ndarray, limit: int = MAX_POINTS
) -> list[list[float]]:
    """At most about ``limit`` points: per bucket the first, min, max and last."""
    x = np.asarray(xs, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    n = len(x)
    if n <= limit:
        small: list[list[float]] = np.column_stack((x, y)).tolist() if n else []
        return small
    size = max(1, (4 * n) // limit)
    buckets = n // size
    head = y[: buckets * size].reshape(buckets, size)
    base = np.arange(buckets) * size
    picks = np.concatenate(
        (base, base + head.argmin(axis=1), base + head.argmax(axis=1), base + size - 1)
    )
    if buckets * size < n:
        picks = np.concatenate((picks, [buckets * size, n - 1]))
    idx = np.unique(picks)
    points: list[list[float]] = np.column_stack((x[idx], y[idx])).tolist()
    return points


def _every(items: Sequence[Any], limit: int) -> list[Any]:
    if len(items) <= limit:
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def payload(
    result: BacktestResult, metrics: Mapping[str, Any], series: Mapping[str, Any]
) -> dict[str, Any]:
    times = np.asarray(result.equity.times, dtype=np.int64)
    eq = result.equity.equity_floats()
    _mdd, _dur, dd = drawdown(times, eq)
    symbols = []
    for sym in result.symbols:
        bars = series[sym]
        prices = (
            bars.close_units / 10**CLOSE_PLACES
            if len(bars.close_units) == len(bars)
            else np.asarray(bars.close, dtype=np.float64)
        )
        closes = thin(bars.open_time + bars.interval_ms - 1, prices)
        fills = _every(
            [
                [f.time_ms, float(f.price), 1 if f.side == "BUY" else -1]
                for f in result.fills
                if f.symbol == sym
            ],
            MAX_FILLS,
        )
        levels = _every(
            [[t, float(p), 1 if s == "BUY" else -1] for t, s, p in result.levels.get(sym, [])],
            MAX_LEVELS,
        )
        symbols.append({"symbol": sym, "close": closes, "fills": fills, "levels": levels})
    return {
        "title": f"{metrics.get('strategy', '')} on {', '.join(result.symbols)}",
        "equity": thin(times, eq),
        "drawdown": thin(times, -dd),
        "symbols": symbols,
    }


_SCRIPT: Final = r"""
(function () {
  const data = JSON.parse(document.getElementById("data").textContent);
  const NS = "http://www.w3.org/2000/svg";
  const W = 960, H = 260, L = 70, R = 10, T = 10, B = 24;
  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function plot(id, lines, marks) {
    const svg = document.getElementById(id);
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    let xs = [], ys = [];
    for (const ln of lines) for (const p of ln.points) { xs.push(p[0]); ys.push(p[1]); }
    for (const m of marks) for (const p of m.points) { xs.push(p[0]); ys.push(p[1]); }
    if (!xs.length) { el("text", {x: L, y: H / 2}, svg).textContent = "no data"; svg.dataset.drawn = "1"; return; }
    let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    if (x1 === x0) x1 = x0 + 1;
    if (y1 === y0) { y1 = y0 + 1; y0 = y0 - 1; }
    const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
    const sy = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
    el("rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#ccc"}, svg);
    for (let i = 0; i <= 4; i++) {
      const v = y0 + (y1 - y0) * i / 4;
      el("text", {x: L - 4, y: sy(v) + 4, "text-anchor": "end", "font-size": 10}, svg).textContent = v.toPrecision(6);
    }
    for (let i = 0; i <= 4; i++) {
      const t = x0 + (x1 - x0) * i / 4;
      el("text", {x: sx(t), y: H - 6, "text-anchor": "middle", "font-size": 10}, svg).textContent =
        new Date(t).toISOString().slice(0, 16).replace("T", " ");
    }
    for (const ln of lines) {
      const d = ln.points.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join("");
      el("path", {d: d, fill: "none", stroke: ln.color, "stroke-width": 1.2, class: "line"}, svg);
    }
    for (const m of marks) {
      for (const p of m.points) {
        const c = p[2] > 0 ? m.up : m.down;
        if (m.kind === "tick") el("line", {x1: sx(p[0]) - 2, x2: sx(p[0]) + 2, y1: sy(p[1]), y2: sy(p[1]), stroke: c, "stroke-opacity": 0.5, class: "mark"}, svg);
        else el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: c, class: "mark"}, svg);
      }
    }
    svg.dataset.drawn = "1";
  }
  plot("equity", [{points: data.equity, color: "#1f5fbf"}], []);
  plot("drawdown", [{points: data.drawdown, color: "#c0392b"}], []);
  data.symbols.forEach((s, i) => plot("price-" + i, [{points: s.close, color: "#333"}],
    [{points: s.levels, kind: "tick", up: "#27ae60", down: "#c0392b"},
     {points: s.fills, kind: "dot", up: "#1e8449", down: "#922b21"}]));
  document.body.dataset.ready = "1";
})();
"""

_STYLE: Final = """
body { font: 14px system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; } td, th { padding: 2px 12px; text-align: right; }
th:first-child, td:first-child { text-align: left; } svg.plot { width: 100%; max-width: 960px; }
#errors { color: #c0392b; white-space: pre; }
"""


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.6g}" if isinstance(x, float) else html.escape(str(x))


def render(result: BacktestResult, metrics: Mapping[str, Any], series: Mapping[str, Any]) -> str:
    data = payload(result, metrics, series)
    bh = metrics.get("buy_and_hold", {})
    rows = []
    for key in HEADLINE:
        v, b = metrics.get(key), bh.get(key)
        rows.append(f"<tr><td>{key}</td><td>{_fmt(v)}</td><td>{_fmt(b)}</td></tr>")
    plots = [
        '<h2>Equity</h2><svg class="plot" id="equity"></svg>',
        '<h2>Drawdown</h2><svg class="plot" id="drawdown"></svg>',
    ]
    for i, s in enumerate(data["symbols"]):
        plots.append(
            f"<h2>{html.escape(s['symbol'])}: price, grid levels, fills</h2>"
            f'<svg class="plot" id="price-{i}"></svg>'
        )
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(data["title"])
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>gridstream backtest: {title}</title><style>{_STYLE}</style>"
        "<script>window.onerror=function(m,s,l,c,e){document.getElementById('errors')"
        ".textContent+=m+'\\n';};</script></head><body>"
        f'<h1>gridstream backtest: {title}</h1><div id="errors"></div>'
        "<table><tr><th>metric</th><th>strategy</th><th>buy &amp; hold</th></tr>"
        + "".join(rows)
        + "</table>"
        + "".join(plots)
        + f'<script id="data" type="application/json">{blob}</script>'
        + f"<script>{_SCRIPT}</script></body></html>\n"
    )


def write_report(
    result: BacktestResult, metrics: Mapping[str, Any], series: Mapping[str, Any], path: Path
) -> None:
    path.write_text(render(result, metrics, series))
