"""Fused log-prob (+ entropy) against the float64 reference: values, gradients of h and W, masks,
temperature, tied weights, chunked backward, and memory (no (N, V) tensor on the fused paths).

On a CPU machine the Triton kernels run in the interpreter (TRITON_INTERPRET=1 before `kernels` is imported;
tests/conftest.py does it, and so does the line below when this file runs alone); on a GPU, compiled.
Every Triton check asserts the kernels really ran (KERNEL_CALLS).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from kernels import HAS_TRITON, logprob_ref, token_logprobs  # noqa: E402

lp_mod = importlib.import_module("kernels.logprob")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

# (dtype, atol, rtol) against float64, applied to logp, entropy, dh and dW. logp/entropy are computed in
# fp32 from exactly upcast inputs; the gradients are rounded to the input dtype (on GPU dL/dz too). fp32:
# logits are D <= 64-term sums of O(1) terms (u sqrt(D) |terms| ~ 6e-8 * 8 * ~3 ~ 1.5e-6), the V-term
# sums of the softmax and dh add about u sqrt(V) ~ 2e-6 relative, dW's N-term sums less: 2e-5 is ~10x
# that (tests/numerics.py, and _fp32_bounds below for an element-wise version); make test-portable
# measured 0.27 of it as the worst case under ATen default / AVX2 and MKL SSE4.2 / AVX2 kernels.
TOL = {
    torch.float32: (torch.float32, 2e-5, 2e-5),
    torch.float16: (torch.float16, 3e-3, 3e-3),
    torch.bfloat16: (torch.bfloat16, 3e-2, 3e-2),
}


def _inputs(shape, V, D, dtype, seed=0, masked=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, D, generator=g).to(DEVICE, dtype).requires_grad_()
    W = (torch.randn(V, D, generator=g) * D**-0.5 * 3).to(DEVICE, dtype).requires_grad_()  # logits ~ N(0, 9)
    y = torch.randint(0, V, shape, generator=g).to(DEVICE)
    mask = None
    if masked:
        mask = (torch.rand(shape, generator=g) > 0.3).to(DEVICE)
        y = y.masked_fill(~mask, -100)  # masked slots may hold an ignore index
    return h, W, y, mask


def _run(fn, h, W, y, temperature, mask, with_entropy, g_lp, g_ent):
    """loss = <g_lp, logp> (+ <g_ent, entropy>); returns [logp, (entropy,) dh, dW]."""
    out = fn(h, W, y, temperature, mask, return_entropy=with_entropy)
    lp, ent = out if with_entropy else (out, None)
    loss = (lp * g_lp.to(lp.dtype)).sum() + ((ent * g_ent.to(ent.dtype)).sum() if with_entropy else 0)
    dh, dW = torch.autograd.grad(loss, (h, W))
    return [lp] + ([ent] if with_entropy else []) + [dh, dW]


def check_against_reference(monkeypatch, shape, V, D, dtype=torch.float32, temperature=1.0, masked=False, with_entropy=True, seed=0):
    monkeypatch.setenv("RLCD_KERNELS", "triton")
    h, W, y, mask = _inputs(shape, V, D, dtype, seed, masked)
    g = torch.Generator().manual_seed(seed + 1)
    g_lp, g_ent = torch.randn(shape, generator=g).to(DEVICE), torch.randn(shape, generator=g).to(DEVICE)
    calls = dict(lp_mod.KERNEL_CALLS)
    got = _run(token_logprobs, h, W, y, temperature, mask, with_entropy, g_lp, g_ent)
    assert lp_mod.KERNEL_CALLS["logprob_fwd"] == calls.get("logprob_fwd", 0) + 1, "Triton fwd did not run"
    assert lp_mod.KERNEL_CALLS["logprob_bwd"] == calls.get("logprob_bwd", 0) + 1, "Triton bwd did not run"

    h64, W64 = (x.detach().double().requires_grad_() for x in (h, W))
    want = _run(logprob_ref, h64, W64, y, temperature, mask, with_entropy, g_lp.double(), g_ent.double())
    names = ["logp"] + (["entropy"] if with_entropy else []) + ["dh", "dW"]
    out_dtypes = [torch.float32] * (len(names) - 2) + [dtype, dtype]
    _, atol, rtol = TOL[dtype]
    for name, a, b, dt in zip(names, got, want, out_dtypes):
        assert a.dtype == dt and a.shape == b.shape, f"{name}: {a.dtype} {tuple(a.shape)}"
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m: f"{name} ({dtype}): {m}")
    return got, mask


# ---------------------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------------------
@needs_triton
def test_realistic_shape(monkeypatch):
    """(B, T) = (2, 45) rows, D = 64, V = 1000, sampling temperature 0.7, mask, entropy."""
    check_against_reference(monkeypatch, (2, 45), V=1000, D=64, temperature=0.7, masked=True)


@needs_triton
def test_large_vocab_odd_rows(monkeypatch):
    """V = 32003 (no block divides it), 15 rows (not a multiple of the row block), small D."""
    check_against_reference(monkeypatch, (3, 5), V=32003, D=16, temperature=1.3, masked=True, seed=1)


@needs_triton
@pytest.mark.parametrize("with_entropy", [False, True])
def test_odd_hidden_size(monkeypatch, with_entropy):
    """D = 40 (not a multiple of the D step), 37 rows, with and without the entropy output."""
    check_against_reference(monkeypatch, (37,), V=1000, D=40, with_entropy=with_entropy, seed=2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(monkeypatch, dtype):
    check_against_reference(monkeypatch, (37,), V=1000, D=24, dtype=dtype, temperature=0.7, masked=True, seed=3)


@needs_triton
def test_chunked_backward(monkeypatch):
    """A small dL/dz budget forces several N chunks: dh pieces and the fp32 dW accumulation across chunks."""
    monkeypatch.setattr(lp_mod, "_DZ_CHUNK_BYTES", 16 * 1000 * 4)  # 16 rows per chunk: 3 chunks for 37 rows
    check_against_reference(monkeypatch, (37,), V=1000, D=24, masked=True, seed=4)


@needs_triton
def test_masked_rows_are_inert(monkeypatch):
    """Masked positions: logp = entropy = 0, dh = 0; a whole block of masked rows (the skip path) included."""
    monkeypatch.setenv("RLCD_KERNELS", "triton")
    h, W, y, _ = _inputs((2, 24), V=300, D=32, dtype=torch.float32, seed=5)
    mask = torch.ones(2, 24, dtype=torch.bool, device=DEVICE)
    mask[0, :20] = False  # with 16-row blocks in the interpreter, rows 0..15 form an all-masked block
    mask[1, 3] = False
    lp, ent = token_logprobs(h, W, y.masked_fill(~mask, -100), 0.9, mask, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert torch.count_nonzero(lp[~mask]) == 0 and torch.count_nonzero(ent[~mask]) == 0
    assert torch.count_nonzero(h.grad[~mask]) == 0
    assert torch.all(h.grad[mask].abs().sum(-1) > 0)
    assert torch.all(lp[mask] < 0) and torch.all(ent[mask] > 0)
    # and the kept rows equal an unmasked run on those rows alone
    lp_kept = token_logprobs(h.detach()[mask], W.detach(), y[mask], 0.9)
    torch.testing.assert_close(lp[mask].detach(), lp_kept, atol=1e-6, rtol=1e-6)


@needs_triton
@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_single_output_gradient(monkeypatch, which):
    """Only one output used: the other's gradient arrives as None and must be treated as 0."""
    monkeypatch.setenv("RLCD_KERNELS", "triton")
    h, W, y, _ = _inputs((20,), V=500, D=16, dtype=torch.float32, seed=6)
    lp, ent = token_logprobs(h, W, y, 1.0, None, return_entropy=True)
    (lp if which == "logp" else ent).sum().backward()
    h64, W64 = (x.detach().double().requires_grad_() for x in (h, W))
    lp64, ent64 = logprob_ref(h64, W64, y, 1.0, None, return_entropy=True)
    (lp64 if which == "logp" else ent64).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(W.grad.double(), W64.grad, atol=2e-5, rtol=2e-5)


@needs_triton
def test_tied_weight_accumulates(monkeypatch):
    """The output head is the input embedding (as in the default model): W's gradient is the sum of the
    embedding path and the head path; the frozen-h case (no dh wanted) also works."""
    monkeypatch.setenv("RLCD_KERNELS", "triton")
    g = torch.Generator().manual_seed(7)
    V, D = 400, 32
    W0 = torch.randn(V, D, generator=g) * 0.3
    mix = torch.randn(D, D, generator=g) * D**-0.5
    ids = torch.randint(0, V, (2, 11), generator=g)
    y = torch.randint(0, V, (2, 11), generator=g)

    def loss(fn, W):
        h = torch.tanh(F.embedding(ids.to(W.device), W) @ mix.to(W))  # (2, 11, D): embedding uses W
        return (fn(h, W, y.to(W.device), 0.8) * torch.arange(22.0).view(2, 11).to(W)).sum()

    W = W0.clone().to(DEVICE).requires_grad_()
    loss(token_logprobs, W).backward()
    W64 = W0.clone().double().requires_grad_()
    loss(logprob_ref, W64).backward()
    torch.testing.assert_close(W.grad.double().cpu(), W64.grad, atol=5e-5, rtol=5e-5)

    # head frozen from the loss' point of view: only dh is requested
    h = torch.randn(9, D, generator=g).to(DEVICE).requires_grad_()
    (dh,) = torch.autograd.grad(token_logprobs(h, W.detach(), y.view(-1)[:9].to(DEVICE)).sum(), (h,))
    h64 = h.detach().double().requires_grad_()
    (dh64,) = torch.autograd.grad(logprob_ref(h64, W.detach().double(), y.view(-1)[:9].to(DEVICE)).sum(), (h64,))
    torch.testing.assert_close(dh.double(), dh64, atol=2e-5, rtol=2e-5)


def _fp32_bounds(h, W, y, temperature, mask, g_lp, g_ent):
    """Element-wise bounds on |a - b| for two fp32 evaluations of [logp, entropy, dh, dW] that add in
    different orders (tests/numerics.py). Everything flows from the logits z = h W^T / t, a D-term sum:
    each z carries an error of at most dz_err = fp32_sum_tol(D, max row of |h| |W|^T / t). That error moves
    logp = z_y - logsumexp(z) and the entropy by at most 2 dz_err (times 1 + |log p| weights for the
    entropy), and every softmax probability, hence dL/dz, by a relative 2 dz_err. The V-term sums
    (logsumexp, entropy, dh = dL/dz W / t) and the N-term sum dW = dL/dz^T h / t add their own
    fp32_sum_tol over the magnitudes of their terms, taken from a float64 evaluation."""
    from numerics import fp32_sum_tol

    D, V = h.shape[-1], W.shape[0]
    h64, W64 = h.detach().double().reshape(-1, D), W.detach().double()
    z_abs = (h64.abs() @ W64.abs().T) / temperature                          # (N, V) |terms| of each logit
    dz_err = fp32_sum_tol(D, z_abs.amax(-1, keepdim=True))                  # (N, 1)
    z = (h64 @ W64.T / temperature).requires_grad_()                         # (N, V)
    logz = torch.log_softmax(z, -1)
    m = torch.ones(z.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1)
    lp = logz.gather(-1, y.reshape(-1, 1).clamp_min(0)).squeeze(-1)
    ent = -(logz.exp() * logz).sum(-1)
    ((lp * g_lp.reshape(-1).double() + ent * g_ent.reshape(-1).double()) * m).sum().backward()
    dz = z.grad.abs()                                                        # (N, V) |dL/dz|
    # logsumexp: a V-term sum of probabilities (their sum is 1) after a shift by max z, rounded once.
    lse_err = fp32_sum_tol(V, 1.0) + 2 * U_REL * z.detach().abs().amax(-1)
    ent_terms = (logz.exp() * logz.abs()).sum(-1).detach()                   # sum_v p |log p|
    b_lp = 2 * dz_err[:, 0] + lse_err + U_REL * lp.detach().abs()
    b_ent = 2 * dz_err[:, 0] * (1 + ent_terms) + lse_err + fp32_sum_tol(V, ent_terms)
    dh_terms = dz @ W64.abs() / temperature                                  # (N, D)
    dW_terms = dz.T @ h64.abs() / temperature                                # (V, D)
    b_dh = fp32_sum_tol(V, dh_terms) + 2 * dz_err * dh_terms
    b_dW = fp32_sum_tol(z.shape[0], dW_terms) + 2 * dz_err.amax() * dW_terms
    lead = h.shape[:-1]
    zero = torch.zeros((), dtype=torch.float64)
    return [torch.where(m, b_lp, zero).view(lead) + 0, torch.where(m, b_ent, zero).view(lead) + 0,
            b_dh.view(*lead, D), b_dW]


U_REL = 2.0 ** -24          # a final rounding of a stored fp32 value, relative


def test_torch_path_chunked(monkeypatch):
    """RLCD_KERNELS=torch: logprob_ref in checkpointed chunks must equal the unchunked reference, gradients
    included, up to the reordering of sums that chunking causes (bounds derived in _fp32_bounds), and
    must not touch the Triton kernels."""
    from numerics import assert_within

    monkeypatch.setenv("RLCD_KERNELS", "torch")
    monkeypatch.setattr(lp_mod, "_TORCH_CHUNK_ROWS", 16)
    h, W, y, mask = _inputs((3, 13), V=700, D=24, dtype=torch.float32, seed=8, masked=True)
    g = torch.Generator().manual_seed(9)
    g_lp, g_ent = torch.randn(3, 13, generator=g).to(DEVICE), torch.randn(3, 13, generator=g).to(DEVICE)
    calls = dict(lp_mod.KERNEL_CALLS)
    got = _run(token_logprobs, h, W, y, 1.5, mask, True, g_lp, g_ent)
    assert dict(lp_mod.KERNEL_CALLS) == calls, "RLCD_KERNELS=torch ran a Triton kernel"
    want = _run(logprob_ref, h, W, y, 1.5, mask, True, g_lp, g_ent)
    bounds = _fp32_bounds(h, W, y, 1.5, mask, g_lp, g_ent)
    for name, a, b, bound in zip(("logp", "entropy", "dh", "dW"), got, want, bounds):
        assert_within(a, b, bound, name)
    with torch.no_grad():  # no graph: plain chunks, same values
        assert_within(token_logprobs(h, W, y, 1.5, mask), want[0], bounds[0], "logp (no graph)")
        lp0, ent0 = token_logprobs(h[:0], W, y[:0], return_entropy=True)  # no rows at all
        assert lp0.shape == ent0.shape == (0, 13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_path_logprobs_only(monkeypatch, dtype):
    """RLCD_KERNELS=torch without the entropy: the in-place chunked autograd function (_TorchLogprobs)
    against the float64 reference, over several chunks (the last one short), with masked rows holding
    -100, a temperature, and gradients asked of h alone or of W alone."""
    monkeypatch.setenv("RLCD_KERNELS", "torch")
    monkeypatch.setattr(lp_mod, "_TORCH_CHUNK_ROWS", 16)
    h, W, y, mask = _inputs((5, 9), V=300, D=20, dtype=dtype, seed=12, masked=True)   # 45 rows: 16+16+13
    g_lp = torch.randn(5, 9, generator=torch.Generator().manual_seed(13), dtype=torch.float64).to(DEVICE)
    got = _run(token_logprobs, h, W, y, 0.7, mask, False, g_lp, None)
    h64, W64 = (x.detach().double().requires_grad_() for x in (h, W))
    want = _run(logprob_ref, h64, W64, y, 0.7, mask, False, g_lp, None)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for name, a, b in zip(("logp", "dh", "dW"), got, want):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == got[2].dtype == dtype
    assert (got[0][~mask] == 0).all() and (got[1][~mask] == 0).all()   # masked rows: 0, no gradient
    (dh_only,) = torch.autograd.grad((token_logprobs(h, W.detach(), y, 0.7, mask) * g_lp.to(dtype)).sum(), (h,))
    torch.testing.assert_close(dh_only, got[1])
    (dw_only,) = torch.autograd.grad((token_logprobs(h.detach(), W, y, 0.7, mask) * g_lp.to(dtype)).sum(), (W,))
    torch.testing.assert_close(dw_only, got[2])


def test_reference_against_naive():
    """logprob_ref itself, against F.cross_entropy (logp = -CE) and an explicit entropy."""
    g = torch.Generator().manual_seed(10)
    h, W = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(50, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (6,), generator=g)
    lp, ent = logprob_ref(h, W, y, 2.0, return_entropy=True)
    logits = h @ W.T / 2.0
    torch.testing.assert_close(lp, -F.cross_entropy(logits, y, reduction="none"))
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1))


# ---------------------------------------------------------------------------------------------------------
# memory: the fused paths never hold an (N, V) tensor
# ---------------------------------------------------------------------------------------------------------
class _LargestTensor(TorchDispatchMode):
    """Records the largest storage any aten op returns (allocations included: empty, mm, log_softmax ...).
    A robust CPU stand-in for peak memory: the reference's largest tensor is the (N, V) logits."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.untyped_storage().nbytes())
        return out


def _largest_tensor(fn, h, W, y):
    h, W = h.detach().requires_grad_(), W.detach().requires_grad_()
    with _LargestTensor() as probe:
        out, ent = fn(h, W, y, 1.0, None, return_entropy=True)
        (out.sum() + ent.sum()).backward()
    return probe.bytes


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
def test_fused_path_uses_far_less_memory(monkeypatch, path):
    N, V, D = 256, 4096, 16  # reference logits: 256 x 4096 fp32 = 4 MiB; W and a 16-row slab: 0.25 MiB
    if DEVICE == "cuda":
        # The compiled backward rounds its slab up to one BLOCK_N of rows (64 on a GPU: 1 MiB here), so
        # the reference needs 8x that many rows to be 8x larger (seen on an H200, 2026-11-28).
        N = 1024
    monkeypatch.setenv("RLCD_KERNELS", path)
    monkeypatch.setattr(lp_mod, "_DZ_CHUNK_BYTES", 16 * V * 4)  # 16-row dL/dz slabs
    monkeypatch.setattr(lp_mod, "_TORCH_CHUNK_ROWS", 16)  # 16-row checkpointed chunks
    g = torch.Generator().manual_seed(11)
    h, W = torch.randn(N, D, generator=g).to(DEVICE), torch.randn(V, D, generator=g).to(DEVICE)
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    calls = lp_mod.KERNEL_CALLS["logprob_fwd"]
    fused = _largest_tensor(token_logprobs, h, W, y)
    assert (lp_mod.KERNEL_CALLS["logprob_fwd"] > calls) == (path == "triton")
    ref = _largest_tensor(logprob_ref, h, W, y)
    assert ref >= N * V * 4, ref  # the probe does see the reference's logits
    assert fused * 8 <= ref, f"{path}: largest tensor {fused} B vs reference {ref} B"


# ---------------------------------------------------------------------------------------------------------
# GPU code path without a GPU
# ---------------------------------------------------------------------------------------------------------
def _ptxas_available() -> bool:
    if not HAS_TRITON:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="triton without its NVIDIA backend (ptxas)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above run the compiled kernels")
def test_logprob_kernels_compile_for_sm90():
    """The interpreter never builds GPU code: compile the log-prob kernels for sm_90 at the launch configs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "kernels.aot_check", "--quick", "--only", "logprob"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failure(s)" in out.stdout and "logprob fwd" in out.stdout, out.stdout
