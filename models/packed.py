"""Pre-packed fp32 GEMM for decoding on CPU.

Decoding multiplies the same weight matrices by a few rows (one per sequence) at every step. MKL's
plain GEMM re-packs the weight panel into its blocked layout on every call, which dominates at 4-64
rows; its packed API (`cblas_sgemm_pack`, which PyTorch exposes as `torch.ops.mkl._mkl_linear`, the op
inductor's freezing pass emits) packs once for a fixed row count. On the 2-core AVX-512 machine this
makes the default model's decode-step GEMMs 1.3-1.8x faster at 4-64 rows (`bench/bench_gemm.py`); on the
AMD EPYC, where MKL runs its AVX2 kernels, it does not pay, so the model packs only on an Intel processor
with AVX-512 in use (`PAYS`).

`Packed` holds one weight's packed copy; `linear` uses it when it applies (no autograd, the row count it
was packed for, the weight's storage and version counter unchanged since) and falls back to `F.linear`
otherwise. The version check is only a guard: the fused AdamW writes parameters in place without
bumping their version counter, which is why the model packs in `setup_cache` and drops the packs in
`clear_cache`, so that a pack lives for one generation call and never outlasts a training step. Under
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


# Packing pays with MKL's AVX-512 kernels (Intel Xeon: 1.3-1.8x at 4-64 rows, README "Generation") and not
# with its AVX2 ones (AMD EPYC, 1 thread, 2026-11-28: 0.97-1.03x at 4-32 rows, while packing the default
# model costs ~0.5 s per generation call).
PAYS = AVAILABLE and _intel_avx512()
MIN_ROWS = 2     # at 1 row MKL's packed path is no faster than its GEMV (bench/bench_gemm.py)


def worth_packing(weight: Tensor, rows: int) -> bool:
    return (PAYS and weight.device.type == "cpu" and weight.dtype == torch.float32
            and rows >= MIN_ROWS)


def _key(weight: Tensor) -> tuple[int, int]:
    # Storage and version counter: an in-place write (optimizer step, copy_) bumps the version. Tensors
    # made under torch.inference_mode have no version counter; they are taken as unchanged.
    return weight.data_ptr(), (-1 if weight.is_inference() else weight._version)


class Packed:
    """`weight` (N, K) packed by MKL for products with exactly `rows` rows."""

    def __init__(self, weight: Tensor, rows: int):
        self.rows = rows
        self.key = _key(weight)
        self.data = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)

    def fresh(self, weight: Tensor, rows: int) -> bool:
        return self.rows == rows and self.key == _key(weight)


def repack(packed: Packed | None, weight: Tensor, rows: int) -> Packed | None:
    """The pack to keep for `weight` at `rows` rows: the old one if still fresh, a new one, or None
    where packing does not pay (not CPU fp32, no MKL, a single row)."""
    if not worth_packing(weight, rows):
        return None
    if packed is not None and packed.fresh(weight, rows):
        return packed
    return Packed(weight, rows)


def linear(x: Tensor, weight: Tensor, packed: Packed | None, bias: Tensor | None = None) -> Tensor:
    """x (..., K) @ weight (N, K).T (+ bias (N,)), through `packed` when it applies."""
    if packed is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling() \
            and x.dtype == torch.float32 and x.numel() == packed.rows * x.shape[-1] \
            and packed.fresh(weight, packed.rows):
        y = torch.ops.mkl._mkl_linear(x.reshape(packed.rows, -1), packed.data, weight, bias, packed.rows)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)
