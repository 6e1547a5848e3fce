"""One decoding step's attention on CPU: torch's SDPA against the grouped fp32 path bf16 decoding uses.

    python bench/bench_attention.py                  # batch 32, the default model's heads, 64/120/256 keys

For one query row per sequence (a decode step), times `F.scaled_dot_product_attention` on bf16 q, k, v (the
padding mask and grouped-query heads as in a real step) against `models.llama.attend_fp32` on the same
tensors, and prints ms per call (best of --repeats) and each one's largest difference from a float64 SDPA.
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
from models.llama import attend_fp32  # noqa: E402
from rlcd.cli import parse_args  # noqa: E402


@dataclass
class Args:
    batch: int = 32
    heads: int = 9                         # query heads (SmolLM2-135M)
    kv_heads: int = 3
    head_dim: int = 64
    keys: list[int] = field(default_factory=lambda: [64, 120, 256])   # cached columns
    repeats: int = 50
    threads: int = 2


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 1e3 * best


def main() -> None:
    args = parse_args(Args, prog="bench_attention.py")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, H, Hk, hd = args.batch, args.heads, args.kv_heads, args.head_dim
    print(f"# {datetime.date.today()}  {cpu_name()}  threads={args.threads}  torch {torch.__version__}  "
          f"batch {B}, {H} query / {Hk} key heads of {hd}, one query row, bf16: ms per call (max |diff| from fp64)")
    for L in args.keys:
        q = torch.randn(B, H, 1, hd, dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hk, L, hd, dtype=torch.bfloat16) for _ in range(2))
        mask = torch.ones(B, 1, 1, L, dtype=torch.bool)
        mask[::2, :, :, :L // 8] = False                                   # left padding on half the rows
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
        sides = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                 "grouped fp32": lambda: attend_fp32(q, k, v, mask)}
        cells = [f"{name} {best_ms(fn, args.repeats):.3f} ms ({(fn().double() - ref).abs().max().item():.1e})"
                 for name, fn in sides.items()]
        print(f"keys {L:4d}: " + "  ".join(cells))


if __name__ == "__main__":
    main()
