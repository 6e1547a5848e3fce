"""Line plots of a run's metrics.jsonl as a standalone SVG (no plotting library needed): `render` for the
pipeline's report, and a command line.

    python -m rlcd.plot --log runs/harmless/ppo/metrics.jsonl --keys score kl --out docs/ppo_curves.svg

One panel per key, side by side, x = "step" (the PPO iteration). Records without the key (sample logs,
checkpoint timings) are skipped. A thin line shows each value, a thick one its running mean over
--smooth records.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rlcd.cli import parse_args

W, H = 360, 240                      # one panel, pixels
ML, MR, MT, MB = 56, 12, 28, 36      # margins: left (y labels), right, top (title), bottom (x labels)


@dataclass
class Args:
    log: str                                                              # metrics.jsonl of a run
    out: str                                                              # SVG file to write
    keys: list[str] = field(default_factory=lambda: ["score", "kl"])      # metrics to plot, one panel each
    smooth: int = 5                                                       # running-mean window (1 = off)
    title: str = ""                                                       # caption above the panels


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def panel(xs: list[float], ys: list[float], key: str, x0: float, smooth: int) -> str:
    """SVG group of one line plot at horizontal offset x0."""
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    xl, xh = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def px(x):
        return x0 + ML + (x - xl) / (xh - xl) * (W - ML - MR)

    def py(y):
        return MT + (1 - (y - lo) / (hi - lo)) * (H - MT - MB)

    g = [f'<text x="{x0 + W / 2:.1f}" y="18" text-anchor="middle" font-weight="bold">{key}</text>',
         f'<rect x="{x0 + ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" fill="none" stroke="#999"/>']
    for t in nice_ticks(lo, hi):
        g.append(f'<line x1="{x0 + ML}" x2="{x0 + W - MR}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
        g.append(f'<text x="{x0 + ML - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.4g}</text>')
    for t in nice_ticks(xl, xh):
        g.append(f'<text x="{px(t):.1f}" y="{H - MB + 16}" text-anchor="middle">{t:.4g}</text>')
    g.append(f'<text x="{x0 + ML + (W - ML - MR) / 2:.1f}" y="{H - 4}" text-anchor="middle">iteration</text>')
    pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
    g.append(f'<polyline points="{pts}" fill="none" stroke="#9ecae1" stroke-width="1"/>')
    if smooth > 1:
        ms = [sum(ys[max(0, i - smooth + 1):i + 1]) / len(ys[max(0, i - smooth + 1):i + 1]) for i in range(len(ys))]
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ms))
        g.append(f'<polyline points="{pts}" fill="none" stroke="#08519c" stroke-width="2"/>')
    return "\n".join(g)


def render(records: list[dict], keys: list[str], smooth: int = 5, title: str = "") -> str:
    """The SVG text: one panel per key over the records that have it."""
    top = 20 if title else 0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * len(keys)}" height="{H + top}" '
             f'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    if title:
        parts.append(f'<text x="8" y="14">{title}</text>')
    parts.append(f'<g transform="translate(0,{top})">')
    for i, k in enumerate(keys):
        rows = [r for r in records if isinstance(r.get(k), (int, float)) and "step" in r]
        if not rows:
            raise ValueError(f"no record has {k!r}")
        parts.append(panel([r["step"] for r in rows], [float(r[k]) for r in rows], k, i * W, smooth))
    parts += ["</g>", "</svg>"]
    return "\n".join(parts) + "\n"


def main() -> None:
    a = parse_args(Args, prog="python -m rlcd.plot")
    records = [json.loads(line) for line in Path(a.log).read_text().splitlines() if line.strip()]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(render(records, a.keys, a.smooth, a.title))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
