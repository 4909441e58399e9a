"""The loss plot of a run, drawn by lfw from trainer_log.jsonl as an SVG file (no matplotlib: lfw starts
LLaMA-Factory without it, which saves about a second of imports per run; see launch.child_env).
The raw training loss is drawn faintly, its moving average boldly (as LLaMA-Factory's own plot does),
and the eval loss as dots when there is one."""

from __future__ import annotations

import math
from html import escape
from pathlib import Path

W, H = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 64, 20, 40, 48


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average, heavier for longer series (LLaMA-Factory's rule of thumb)."""
    if not values:
        return []
    if weight is None:
        weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0]
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def loss_svg(records: list[dict], title: str = "training loss") -> str | None:
    """The SVG text for the loss records of trainer_log.jsonl; None when no step logged a loss."""
    train = [(r["current_steps"], float(r["loss"])) for r in records
             if isinstance(r.get("loss"), (int, float)) and isinstance(r.get("current_steps"), int)
             and math.isfinite(r["loss"])]
    evals = [(r["current_steps"], float(r["eval_loss"])) for r in records
             if isinstance(r.get("eval_loss"), (int, float)) and isinstance(r.get("current_steps"), int)
             and math.isfinite(r["eval_loss"])]
    if not train:
        return None
    steps = [s for s, _ in train + evals]
    values = [v for _, v in train + evals]
    x0, x1 = min(steps), max(steps)
    y0, y1 = min(values), max(values)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def x(s: float) -> float:
        return LEFT + (s - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def y(v: float) -> float:
        return TOP + (y1 - v) / (y1 - y0) * (H - TOP - BOTTOM)

    def line(points: list[tuple[float, float]]) -> str:
        return " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)

    ema = list(zip([s for s, _ in train], smooth([v for _, v in train])))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="none" stroke="#444"/>']
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{LEFT - 4}" x2="{W - RIGHT}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 8}" y="{y(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in _ticks(x0, x1):
        if float(t).is_integer():
            out.append(f'<text x="{x(t):.1f}" y="{H - BOTTOM + 18}" text-anchor="middle">{int(t)}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 10}" text-anchor="middle">step</text>')
    out.append(f'<polyline class="loss" points="{line(train)}" fill="none" stroke="#1f77b4" stroke-opacity="0.35"/>')
    out.append(f'<polyline class="smoothed" points="{line(ema)}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
    for s, v in evals:
        out.append(f'<circle class="eval" cx="{x(s):.1f}" cy="{y(v):.1f}" r="3.5" fill="#d62728"/>')
    legend = [("#1f77b4", "loss (moving average bold)")] + ([("#d62728", "eval loss")] if evals else [])
    for i, (color, text) in enumerate(legend):
        ly = TOP + 16 + 16 * i
        out.append(f'<line x1="{W - RIGHT - 190}" x2="{W - RIGHT - 170}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{W - RIGHT - 165}" y="{ly}">{text}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_loss_svg(records: list[dict], path: Path, title: str = "training loss") -> bool:
    text = loss_svg(records, title)
    if text is None:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return True
