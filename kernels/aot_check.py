"""Compile the Triton kernels for an NVIDIA GPU on a machine without one (ahead of time).

The tests run the kernels in the Triton interpreter, which never builds the GPU code: a type error in a branch
that only the compiler sees, an unsupported op, or a tile that does not fit in shared memory would first show
up on a lent GPU. Triton can compile to a cubin without a GPU (ptxas ships in the triton wheel), so this
compiles each kernel at the exact launch configs of the host code, for sm_90 (H100/H200), and reports
registers, stack (a non-zero stack here means register spills) and shared memory.

    python -m kernels.aot_check          # every kernel x dtype x head dim; prints a table, exits 1 on failure
    python -m kernels.aot_check --quick  # a representative subset (what the tests run)
    python -m kernels.aot_check --only attention   # or logprob

TRITON_INTERPRET must be unset when the kernels are decorated (at import), so the tests run this in a
subprocess. Checked with the local triton (3.9); the GPU machines run 3.6, so this catches most, not all,
version differences.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.dispatch import INTERPRET

if INTERPRET:  # `python -m kernels.aot_check` imported the package, hence decorated the kernels, already
    sys.exit("kernels.aot_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
attn = importlib.import_module("kernels.attention")  # (`kernels.attention` the attribute is the function)
lp = importlib.import_module("kernels.logprob")

# scalar arguments that are not integers
_FLOATS = {"qk_scale", "sm_scale", "inv_temp"}


def _signature(fn, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Triton type string per argument: pointers as given, constexprs marked, floats fp32, the rest i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in _FLOATS else "i32"
    return sig


def _resources(kernel) -> str:
    """'REG:n STACK:n' from the cubin (cuobjdump ships next to ptxas)."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    fields = dict(tok.split(":", 1) for line in out.splitlines() if "REG:" in line for tok in line.split() if ":" in tok)
    return f"regs {fields.get('REG', '?'):>3}  stack {fields.get('STACK', '?'):>4}"


def _jobs(quick: bool, only: str | None):
    """(label, kernel, pointer types, constexprs, launch options) at the host code's GPU configs. The flags
    (HAS_START, HAS_MASK, ...) are compiled both on and off for the first dtype; on for the others."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32} if quick else \
        {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    hds = [64, 128] if quick else [32, 64, 128]

    for i, (dt, tdt) in enumerate(dtypes.items() if only in (None, "attention") else []):
        compute, precision = attn._compute_types(tdt, on_gpu=True)
        ptrs = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")}
        ptrs.update(LSE="*fp32", DELTA="*fp32", START="*i64")
        for hd in hds if not (quick and dt == "fp32") else hds[:1]:
            cfgs = attn._configs(hd, tdt, on_gpu=True)
            for has_start in (True, False) if i == 0 else (True,):
                for name, fn in (("fwd", attn._attn_fwd), ("dkdv", attn._attn_bwd_dkdv), ("dq", attn._attn_bwd_dq)):
                    cfg = dict(cfgs[name])
                    opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                    c = dict(cfg, HEAD_DIM=hd, HAS_START=has_start, COMPUTE_DTYPE=compute, PRECISION=precision)
                    yield f"attention {name} {dt} hd={hd}{'' if has_start else ' no-start'}", fn, ptrs, c, opts
            cfg = cfgs["pre"]
            yield (f"attention preprocess {dt} hd={hd}", attn._attn_bwd_preprocess, ptrs,
                   dict(HEAD_DIM=hd, BLOCK_M=cfg["BLOCK_M"]), dict(num_warps=cfg["num_warps"], num_stages=1))

    for i, (dt, tdt) in enumerate(dtypes.items() if only in (None, "logprob") else []):
        compute, precision = lp._compute_types(tdt, on_gpu=True)
        cfgs = lp._configs(tdt, on_gpu=True)
        ptrs = {n: f"*{dt}" for n in ("H", "W", "DZ", "A", "B")}
        ptrs.update(TGT="*i64", MASK="*u8", C="*fp32")
        ptrs.update({n: "*fp32" for n in ("M_PART", "S_PART", "T_PART", "ZY_PART", "LSE", "ENT", "G_LOGP", "G_ENT")})
        for flag in (True, False) if i == 0 else (True,):
            for name, fn, flags in (
                ("fwd", lp._logprob_fwd, dict(HAS_MASK=flag, WITH_ENTROPY=flag, EVEN_D=flag)),
                ("dz", lp._logprob_bwd_dz, dict(HAS_MASK=flag, HAS_G_ENT=flag, EVEN_D=flag)),
                ("mm", lp._mm_tn, dict(ACCUMULATE=flag)),
            ):
                cfg = dict(cfgs[name])
                opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
                c = dict(cfg, COMPUTE_DTYPE=compute, PRECISION=precision, **flags)
                yield f"logprob {name} {dt}{'' if flag else ' flags-off'}", fn, ptrs, c, opts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="representative subset only")
    ap.add_argument("--only", choices=["attention", "logprob"], help="one module's kernels")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = H100/H200)")
    args = ap.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for label, fn, ptrs, constexprs, opts in _jobs(args.quick, args.only):
        t0 = time.time()
        try:
            src = ASTSource(fn=fn, signature=_signature(fn, ptrs, constexprs), constexprs=constexprs)
            kernel = triton.compile(src, target=target, options=opts)
            res = f"{_resources(kernel)}  shared {kernel.metadata.shared:>6}"
        except Exception as e:  # report every failure, not just the first
            failures += 1
            res = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"{label:34s} {res}  ({time.time() - t0:.1f}s)", flush=True)
    print(f"{failures} failure(s) for sm_{args.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
