"""Which implementation runs: the Triton kernels or the plain-PyTorch references.

RLCD_KERNELS (read on every call, so tests can flip it with monkeypatch):
  "triton"        always the Triton kernels, also on CPU tensors (this is how the tests run the real kernels:
                  with TRITON_INTERPRET=1 set before `kernels` is imported, Triton interprets them on the CPU)
  "torch"         always the references
  unset / "auto"  Triton iff the tensor is on CUDA and triton imports

The package imports without triton installed; then only the torch path exists and forcing "triton" raises.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: only the reference path exists
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for `triton` and `triton.language` so the kernel modules still import: `@triton.jit`
        leaves the function as it is and `tl.constexpr` annotations resolve. No kernel ever runs."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    triton = tl = _NoTriton()  # type: ignore[assignment]

# Triton decides at decoration time (i.e. when kernels/*.py is imported) whether @triton.jit compiles for a
# GPU or builds an interpreter function, so what matters is the value at import, not at call.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor) -> bool:
    """True if the Triton kernels should handle tensor `t` (see the module docstring for the rule)."""
    mode = os.environ.get("RLCD_KERNELS", "auto").strip().lower()
    if mode == "torch":
        return False
    if mode == "triton":
        if not HAS_TRITON:
            raise RuntimeError("RLCD_KERNELS=triton but triton is not installed")
        if not t.is_cuda and not INTERPRET:
            raise RuntimeError(
                "RLCD_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1 in the environment "
                "before `kernels` is imported (Triton reads it when the kernels are decorated)"
            )
        return True
    if mode in ("", "auto"):
        return HAS_TRITON and t.is_cuda
    raise ValueError(f"RLCD_KERNELS must be 'triton', 'torch' or 'auto', got {mode!r}")
