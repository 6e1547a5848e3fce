"""Decoding layouts of the weights on CPU: products with a few rows, prepared once per generation call.

Decoding multiplies the same weight matrices by a few rows (one per sequence) at every step, and which
layout runs those products fastest depends on the processor's MKL code path:
- "mkl": MKL's plain GEMM re-packs the weight panel into its blocked layout on every call, which dominates
  at 4-64 rows; its packed API (`cblas_sgemm_pack`, which PyTorch exposes as `torch.ops.mkl._mkl_linear`,
  the op inductor's freezing pass emits) packs once for a fixed row count. With MKL's AVX-512 kernels
  (Intel Xeon) this makes the default model's decode-step GEMMs 1.3-1.8x faster at 4-64 rows
  (`bench/bench_gemm.py`). On the AMD EPYC, where MKL runs its AVX2 kernels, it gave 0.97-1.03x at 4-32
  rows for ~0.5 s of packing per call, so it is used only on an Intel processor with AVX-512 (`PAYS`).
- "transposed": at one row a product is a GEMV that streams the weight from memory, and MKL's AVX2 GEMV
  reads a (N, K) weight at ~11 GB/s where the same product as x @ W^T with W^T stored (K, N) contiguous
  reaches ~20 GB/s (AMD EPYC, 1 thread, 2026-11-28: one decode step's products 46.5 -> 31.8 ms, 1.46x;
  at 4 and 16 rows it is slower, 0.83x and 0.92x). Used at one row where MKL runs its AVX2 kernels
  (`TRANSPOSE_GEMV`: MKL present, not an Intel processor with AVX-512).

`Packed` holds one weight's copy in its layout; `linear` uses it when it applies (no autograd, the row
count it was made for, the weight's storage and version counter unchanged since) and falls back to
`F.linear` otherwise. The version check is only a guard: the fused AdamW writes parameters in place
without bumping their version counter, which is why the model packs in `setup_cache` and drops the packs
in `clear_cache`, so that a pack lives for one generation call and never outlasts a training step. Under
torch.compile it stands aside (inductor packs weights itself when asked to freeze them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

AVAILABLE = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _intel_avx512() -> bool:
    """An Intel processor with AVX-512 in use. MKL takes its AVX-512 code path on Intel processors only: the
    project's AMD EPYC (Zen 4) has AVX-512 too, but MKL runs its AVX2 kernels there."""
    try:
        with open("/proc/cpuinfo") as f:
            intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False
    return intel and torch.backends.cpu.get_cpu_capability() == "AVX512"


INTEL_AVX512 = _intel_avx512()
PAYS = AVAILABLE and INTEL_AVX512                 # the "mkl" layout (at MIN_ROWS rows and more)
TRANSPOSE_GEMV = AVAILABLE and not INTEL_AVX512   # the "transposed" layout at one row (MKL's AVX2 GEMV)
MIN_ROWS = 2     # at 1 row MKL's packed path is no faster than its GEMV (bench/bench_gemm.py)


def layout(weight: Tensor, rows: int) -> str | None:
    """The decoding layout that pays for `weight` at `rows` rows on this processor, or None. None under CPU
    autocast (bf16 precision): the products then run in bf16 through F.linear, whose autocast casts each weight
    once per generation call, where an fp32 copy would either run in fp32 or be cast again at every step."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return None
    if PAYS and rows >= MIN_ROWS:
        return "mkl"
    if TRANSPOSE_GEMV and rows == 1:
        return "transposed"
    return None


def _key(weight: Tensor) -> tuple[int, int]:
    # Storage and version counter: an in-place write (optimizer step, copy_) bumps the version. Tensors
    # made under torch.inference_mode have no version counter; they are taken as unchanged.
    return weight.data_ptr(), (-1 if weight.is_inference() else weight._version)


class Packed:
    """`weight` (N, K) in `kind`'s layout ("mkl" or "transposed") for products with exactly `rows` rows."""

    def __init__(self, weight: Tensor, rows: int, kind: str = "mkl"):
        self.rows, self.kind = rows, kind
        self.key = _key(weight)
        w = weight.detach()
        self.data = torch.ops.mkl._mkl_reorder_linear_weight(w, rows) if kind == "mkl" else w.t().contiguous()

    def fresh(self, weight: Tensor, rows: int) -> bool:
        return self.rows == rows and self.key == _key(weight)


def repack(packed: Packed | None, weight: Tensor, rows: int) -> Packed | None:
    """The pack to keep for `weight` at `rows` rows: the old one if still fresh, a new one, or None
    where no layout pays (not CPU fp32, or no layout for this row count on this processor)."""
    kind = layout(weight, rows)
    if kind is None:
        return None
    if packed is not None and packed.kind == kind and packed.fresh(weight, rows):
        return packed
    return Packed(weight, rows, kind)


def linear(x: Tensor, weight: Tensor, packed: Packed | None, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ weight (N, K).T (+ bias (N,)), through `packed` when it applies."""
    if packed is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling() \
            and not torch.is_autocast_enabled("cpu") and x.dtype == torch.float32 \
            and x.numel() == packed.rows * x.shape[-1] and packed.fresh(weight, packed.rows):
        x2 = x.reshape(packed.rows, -1)
        if packed.kind == "mkl":
            y = torch.ops.mkl._mkl_linear(x2, packed.data, weight, bias, packed.rows)
        else:
            y = x2 @ packed.data if bias is None else torch.addmm(bias, x2, packed.data)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
