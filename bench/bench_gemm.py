"""The decode step's matrix products on CPU: plain F.linear against MKL-packed weights (models/packed.py).

    python bench/bench_gemm.py                    # rows 1 2 4 8 16 32 64, the default model's shapes, fp32
    python bench/bench_gemm.py --bf16 --rows 1 16 32   # bf16 weights: F.linear vs the transposed layout, beside fp32

For each row count (the batch of a decoding step) it times one step's worth of products with the default
model's shapes: 30 layers x (wqkv 960x576, wo 576x576, w13 3072x576, w2 576x1536) plus the 49152x576
head, every layer with its own weights, so they stream from memory as in a real step (one weight
multiplied again and again would sit in cache and flatter both sides). Prints ms per step and the
GFLOP/s of each side; the best of --repeats after a warm-up.
"""
from __future__ import annotations

import datetime
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cpu_name  # noqa: E402
from models import packed as pk  # noqa: E402
from rlcd.cli import parse_args  # noqa: E402

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]   # (N, K) of wqkv, wo, w13, w2
HEAD_SHAPE = (49152, 576)


@dataclass
class Args:
    rows: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])  # rows per product
    layers: int = 30                       # layers of distinct weights
    repeats: int = 5                       # timed steps per row count and side (best reported)
    threads: int = 2                       # torch threads (0 = leave as is)
    bf16: bool = False                     # bf16 weights instead: F.linear and x @ W^T (W^T stored contiguous), beside fp32 F.linear


def sides_bf16(weights: list[torch.Tensor], rows: int) -> dict:
    """One step's products three ways: fp32 F.linear, bf16 F.linear, bf16 against W^T stored (K, N)."""
    w16 = [w.to(torch.bfloat16) for w in weights]
    t16 = [w.t().contiguous() for w in w16]
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    x16 = {k: v.to(torch.bfloat16) for k, v in xs.items()}
    return {"fp32 F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in weights],
            "bf16 F.linear": lambda: [F.linear(x16[w.shape[1]], w) for w in w16],
            "bf16 x @ W^T": lambda: [x16[t.shape[0]] @ t for t in t16]}


def timed(sides: dict, repeats: int) -> dict:
    """The best of `repeats` interleaved runs of each side, after one warm-up each."""
    best = {}
    with torch.no_grad():
        for fn in sides.values():
            fn()
        for _ in range(repeats):
            for name, fn in sides.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    return best


def main() -> None:
    a = parse_args(Args, prog="bench_gemm.py")
    if not pk.AVAILABLE:
        sys.exit("this torch build has no MKL: nothing to compare")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    weights = [torch.randn(n, k) for _ in range(a.layers) for n, k in LAYER_SHAPES] + [torch.randn(*HEAD_SHAPE)]
    flop = 2 * sum(w.numel() for w in weights)                       # per row
    if a.bf16:
        params = sum(w.numel() for w in weights)
        print(f"# {datetime.date.today()}  {cpu_name()}  threads={torch.get_num_threads()}  torch {torch.__version__}  "
              f"{a.layers} layers + head: ms per step (GFLOP/s, GB/s of weights read)")
        for rows in a.rows:
            best = timed(sides_bf16(weights, rows), a.repeats)
            print(f"rows {rows:>3}: " + "  ".join(
                f"{k} {v * 1e3:.1f} ms ({flop * rows / v / 1e9:.0f}, {params * (4 if k.startswith('fp32') else 2) / v / 1e9:.1f})"
                for k, v in best.items()), flush=True)
        return
    print(f"# {datetime.date.today()}  {cpu_name()}  packing pays here: {pk.PAYS}  "
          f"threads={torch.get_num_threads()}  torch {torch.__version__}  fp32, {a.layers} layers + head")
    print(f"{'rows':>4} {'plain ms':>9} {'packed ms':>10} {'speed-up':>8} {'plain GF/s':>10} {'packed GF/s':>11}")
    for rows in a.rows:
        xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
        packs = [pk.Packed(w, rows) for w in weights]

        def plain():
            for w in weights:
                F.linear(xs[w.shape[1]], w)

        def packed():
            for w, p in zip(weights, packs):
                torch.ops.mkl._mkl_linear(xs[w.shape[1]], p.data, w, None, rows)

        best = {}
        with torch.no_grad():
            for name, fn in (("plain", plain), ("packed", packed)):
                fn()
            for _ in range(a.repeats):                               # interleaved: noise hits both
                for name, fn in (("plain", plain), ("packed", packed)):
                    t0 = time.perf_counter()
                    fn()
                    best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
        gf = {k: flop * rows / v / 1e9 for k, v in best.items()}
        print(f"{rows:>4} {best['plain'] * 1e3:>9.1f} {best['packed'] * 1e3:>10.1f} "
              f"{best['plain'] / best['packed']:>7.2f}x {gf['plain']:>10.0f} {gf['packed']:>11.0f}", flush=True)
        del packs


if __name__ == "__main__":
    main()
