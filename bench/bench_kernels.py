"""Benchmark the Triton kernels against PyTorch: correctness on CUDA first, then speed and memory.

    PYTHONPATH=. python3 bench/bench_kernels.py                         # on a lent GPU (torch 2.11, triton 3.6)
    PYTHONPATH=. python3 bench/bench_kernels.py --out $OUT/kernels.md   # also write the tables as markdown
    .venv/bin/python bench/bench_kernels.py                             # CPU: interpreted correctness smoke only

1. Correctness on the device against the references (attention_ref, logprob_ref in fp32 from the same
   inputs): outputs and all gradients, bf16 and fp16, GQA, left padding, odd T. Exits 1 on a mismatch,
   before timing anything.
2. Attention, causal, bf16: forward and forward+backward TFLOP/s of `kernels.attention` vs torch SDPA pinned
   to the flash backend (sdpa_kernel(SDPBackend.FLASH_ATTENTION)) with enable_gqa=True; if this torch's flash
   backend refuses GQA, K/V are repeated before the timed region (the table says which).
   FLOPs (Triton tutorial 06): 2 matmuls of 2*B*H*T*T*hd each, halved for causal; backward = 2.5x forward.
3. Log-probs, bf16, N = 16384 rows: `kernels.token_logprobs` vs the naive
   `log_softmax((h @ W.T).float(), -1).gather(-1, y)` (fp32 log-softmax: the same numerics as ours), forward
   and forward+backward (grads of h and W) time, and peak memory above the inputs.

Timings use triton.testing.do_bench (median ms). Without CUDA only step 1 runs, in the Triton interpreter,
on tiny shapes; nothing is timed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels import
os.environ["RLCD_KERNELS"] = "triton"  # the checks below must exercise the kernels, also on CPU tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch.nn.functional as F  # noqa: E402

from kernels import HAS_TRITON, attention, attention_ref, logprob_ref, token_logprobs  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# max |got - want| / max |want| allowed, per dtype (want: fp32 reference from the same inputs)
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


# ----------------------------------------------------------------------------------------------------------
# 1. correctness
# ----------------------------------------------------------------------------------------------------------
def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()


def check_attention(B, H, H_kv, T, hd, dtype, padded: bool) -> list[tuple[str, float, bool]]:
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, T, H, hd, generator=g).to(DEVICE, dtype).transpose(1, 2).requires_grad_()  # model layout
    k = torch.randn(B, H_kv, T, hd, generator=g).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(B, H_kv, T, hd, generator=g).to(DEVICE, dtype).requires_grad_()
    do = torch.randn(B, H, T, hd, generator=g).to(DEVICE, dtype)
    start = torch.randint(0, T // 2, (B,), generator=g).to(DEVICE) if padded else None
    o = attention(q, k, v, start)
    got = [o, *torch.autograd.grad(o, (q, k, v), do)]
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    o32 = attention_ref(q32, k32, v32, start)
    want = [o32, *torch.autograd.grad(o32, (q32, k32, v32), do.float())]
    label = f"attention {str(dtype)[6:]} B={B} H={H} H_kv={H_kv} T={T} hd={hd}{' padded' if padded else ''}"
    return [(f"{label} {n}", e := _rel_err(a, b), e <= REL_TOL[dtype]) for n, a, b in zip(("o", "dq", "dk", "dv"), got, want)]


def check_logprob(N, V, D, dtype, temperature: float) -> list[tuple[str, float, bool]]:
    g = torch.Generator().manual_seed(V)
    h = torch.randn(N, D, generator=g).to(DEVICE, dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g) * D**-0.5 * 3).to(DEVICE, dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    mask = (torch.rand(N, generator=g) > 0.2).to(DEVICE)
    g_lp, g_ent = torch.randn(N, generator=g).to(DEVICE), torch.randn(N, generator=g).to(DEVICE)

    def run(fn, h, W):
        lp, ent = fn(h, W, y, temperature, mask, return_entropy=True)
        return [lp, ent, *torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (h, W))]

    got = run(token_logprobs, h, W)
    want = run(logprob_ref, *(x.detach().float().requires_grad_() for x in (h, W)))
    label = f"logprob {str(dtype)[6:]} N={N} V={V} D={D} T={temperature}"
    return [(f"{label} {n}", e := _rel_err(a, b), e <= REL_TOL[dtype]) for n, a, b in zip(("logp", "entropy", "dh", "dW"), got, want)]


def check_correctness() -> bool:
    if ON_GPU:
        results = (
            check_attention(2, 6, 2, 300, 64, torch.bfloat16, padded=True)
            + check_attention(2, 8, 1, 257, 128, torch.float16, padded=True)
            + check_attention(1, 4, 4, 129, 64, torch.float32, padded=False)
            + check_logprob(1000, 49152, 576, torch.bfloat16, 0.7)
            + check_logprob(300, 32003, 256, torch.float16, 1.0)
        )
    else:  # the interpreter: tiny shapes
        results = check_attention(1, 3, 1, 20, 32, torch.float32, padded=True) + check_logprob(20, 300, 16, torch.float32, 0.7)
    for name, err, ok in results:
        print(f"  {'ok  ' if ok else 'FAIL'} {name:70s} rel err {err:.1e}")
    return all(ok for _, _, ok in results)


# ----------------------------------------------------------------------------------------------------------
# 2. attention speed
# ----------------------------------------------------------------------------------------------------------
def bench_attention(do_bench) -> list[str]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = ["| B | H | H_kv | T | hd | Triton fwd | SDPA fwd | Triton fwd+bwd | SDPA fwd+bwd | SDPA GQA via |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for B, H, H_kv, T, hd in [(8, 16, 16, 2048, 128), (8, 32, 8, 2048, 128), (32, 9, 3, 512, 64)]:
        q = torch.randn(B, T, H, hd, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        k = torch.randn(B, H_kv, T, hd, device="cuda", dtype=torch.bfloat16).requires_grad_()
        v = torch.randn(B, H_kv, T, hd, device="cuda", dtype=torch.bfloat16).requires_grad_()
        do = torch.randn(B, H, T, hd, device="cuda", dtype=torch.bfloat16)
        fwd_flops = 2 * 2.0 * B * H * T * T * hd * 0.5  # QK^T and PV, causal half
        tflops = lambda ms, mult: mult * fwd_flops / (ms * 1e-3) / 1e12  # noqa: E731

        # SDPA, flash backend; GQA natively if this torch allows it, else K/V repeated outside the timing
        gqa_mode = "enable_gqa"
        k_s, v_s, kw = k, v, dict(enable_gqa=True)
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except RuntimeError:
            gqa_mode = "repeat_interleave"
            k_s = k.detach().repeat_interleave(H // H_kv, 1).requires_grad_()
            v_s = v.detach().repeat_interleave(H // H_kv, 1).requires_grad_()
            kw = {}
        if H == H_kv:
            gqa_mode = "(MHA)"

        def sdpa_fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k_s, v_s, is_causal=True, **kw)

        def sdpa_fwd_bwd():
            return torch.autograd.grad(sdpa_fwd(), (q, k_s, v_s), do)

        def tri_fwd():
            return attention(q, k, v)

        def tri_fwd_bwd():
            return torch.autograd.grad(attention(q, k, v), (q, k, v), do)

        with torch.no_grad():
            t_fwd, s_fwd = do_bench(tri_fwd), do_bench(sdpa_fwd)
        t_all, s_all = do_bench(tri_fwd_bwd), do_bench(sdpa_fwd_bwd)
        rows.append(
            f"| {B} | {H} | {H_kv} | {T} | {hd} "
            f"| {t_fwd:.3f} ms, {tflops(t_fwd, 1):.0f} TFLOP/s | {s_fwd:.3f} ms, {tflops(s_fwd, 1):.0f} TFLOP/s "
            f"| {t_all:.3f} ms, {tflops(t_all, 3.5):.0f} TFLOP/s | {s_all:.3f} ms, {tflops(s_all, 3.5):.0f} TFLOP/s "
            f"| {gqa_mode} |"
        )
        print(rows[-1], flush=True)
        del q, k, v, do, k_s, v_s
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------------
# 3. log-prob speed and memory
# ----------------------------------------------------------------------------------------------------------
def _peak_mib(fn) -> float:
    """Peak allocated memory during fn() above what was allocated before, MiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_logprob(do_bench) -> list[str]:
    rows = ["| N | V | D | impl | fwd ms | fwd peak MiB | fwd+bwd ms | fwd+bwd peak MiB |", "|---|---|---|---|---|---|---|---|"]
    N = 16384
    for V, D in [(49152, 576), (128256, 4096)]:
        h = torch.randn(N, D, device="cuda", dtype=torch.bfloat16).requires_grad_()
        W = (torch.randn(V, D, device="cuda") * D**-0.5).to(torch.bfloat16).requires_grad_()
        y = torch.randint(0, V, (N,), device="cuda")
        g = torch.randn(N, device="cuda")

        def naive(h, W, y):
            return torch.log_softmax((h @ W.T).float(), dim=-1).gather(-1, y[:, None]).squeeze(-1)  # (N,)

        for name, fn in (("triton fused", token_logprobs), ("naive", naive)):
            def fwd():
                with torch.no_grad():
                    return fn(h, W, y)

            def fwd_bwd():
                return torch.autograd.grad((fn(h, W, y) * g).sum(), (h, W))

            try:
                cells = [f"{do_bench(fwd):.2f}", f"{_peak_mib(fwd):.0f}", f"{do_bench(fwd_bwd):.2f}", f"{_peak_mib(fwd_bwd):.0f}"]
            except torch.cuda.OutOfMemoryError:
                cells = ["OOM"] * 4
                torch.cuda.empty_cache()
            rows.append(f"| {N} | {V} | {D} | {name} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
        del h, W, y, g
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the report (markdown) here")
    args = ap.parse_args()
    if not HAS_TRITON:
        print("triton is not installed: nothing to benchmark")
        return 1
    import triton

    device = torch.cuda.get_device_name() if ON_GPU else "CPU (Triton interpreter)"
    header = [
        f"## {device}, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"torch {torch.__version__}, triton {triton.__version__}",
        "",
    ]
    print("\n".join(header))
    print("1. correctness against the references")
    if not check_correctness():
        print("correctness check FAILED: no timings")
        return 1
    if not ON_GPU:
        print("no CUDA device: correctness smoke only (interpreted); no timings")
        return 0

    do_bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    print("\n2. attention, causal, bf16 (ms median, TFLOP/s)")
    attn_rows = bench_attention(do_bench)
    print("\n3. log-probs, bf16 (naive = log_softmax((h @ W.T).float()).gather)")
    lp_rows = bench_logprob(do_bench)
    report = header + ["### attention, causal, bf16", *attn_rows, "", "### log-probs, bf16", *lp_rows, ""]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(report))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
