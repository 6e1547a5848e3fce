"""Pre-packed fp32 GEMM for decoding on CPU.

Decoding multiplies the same weight matrices by a few rows (one per sequence) at every step. MKL's
plain GEMM re-packs the weight panel into its blocked layout on every call, which dominates at 4-64
rows; its packed API (`cblas_sgemm_pack`, which PyTorch exposes as `torch.ops.mkl._mkl_linear`, the op
inductor's freezing pass emits) packs once for a fixed row count. On the 2-core AVX-512 machine this
makes the default model's decode-step GEMMs 1.3-1.8x faster at 4-64 rows (`bench/bench_gemm.py`).

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
MIN_ROWS = 2     # at 1 row MKL's packed path is no faster than its GEMV (bench/bench_gemm.py)


def worth_packing(weight: Tensor, rows: int) -> bool:
    return (AVAILABLE and weight.device.type == "cpu" and weight.dtype == torch.float32
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
