"""Triton attention against the float64 reference: output and every gradient, GQA, left padding, odd T.

On a CPU machine the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before `kernels` is
imported: tests/conftest.py does it, and so does the line below when this file runs alone). On a GPU machine
the same tests run the compiled kernels. RLCD_KERNELS=triton forces the Triton path also for CPU tensors;
every check asserts that the Triton host functions really ran (KERNEL_CALLS), so the reference is never
compared with itself.
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

from kernels import HAS_TRITON, attention, attention_ref, use_triton  # noqa: E402

attn_mod = importlib.import_module("kernels.attention")  # the module (kernels.attention is the function)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")

# (dtype, atol, rtol) against float64. fp16/bf16 errors are dominated by rounding the output/gradients to
# the input dtype (and, on GPU, by P being fed to the matmuls in that dtype). fp32: the shapes here have
# hd <= 64 and T <= 130 keys, O(1) inputs, so each reduction (q.k over hd, P.V and the backward's sums over
# T) rounds by about u sqrt(n) |terms| <= 6e-8 * 12 * ~2 ~ 1.5e-6, and the online softmax's rescalings add
# a few u each: 2e-5 is ~10x that (tests/numerics.py); make test-portable measured 0.29 of it as the worst
# case under ATen default / AVX2 and MKL SSE4.2 / AVX2 kernels.
TOL = {
    torch.float32: (torch.float32, 2e-5, 2e-5),
    torch.float16: (torch.float16, 5e-3, 5e-3),
    torch.bfloat16: (torch.bfloat16, 4e-2, 4e-2),
}


def _inputs(B, H, H_kv, T, hd, dtype, seed=0, kv_contiguous=True):
    """q as the model makes it: a (B, H, T, hd) view of a (B, T, H, hd) tensor (non-contiguous)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, hd, generator=g).to(DEVICE, dtype).transpose(1, 2)  # (B, H, T, hd) view
    if kv_contiguous:
        k = torch.randn(B, H_kv, T, hd, generator=g).to(DEVICE, dtype)
        v = torch.randn(B, H_kv, T, hd, generator=g).to(DEVICE, dtype)
    else:  # views of (B, T, H_kv, hd) as well
        k = torch.randn(B, T, H_kv, hd, generator=g).to(DEVICE, dtype).transpose(1, 2)
        v = torch.randn(B, T, H_kv, hd, generator=g).to(DEVICE, dtype).transpose(1, 2)
    do = torch.randn(B, H, T, hd, generator=g).to(DEVICE, dtype)  # random upstream gradient
    return [x.requires_grad_() for x in (q, k, v)], do


def _triton_vs_ref(monkeypatch, q, k, v, do, start=None, sm_scale=None):
    """Run the Triton path and the float64 reference; returns ([o, dq, dk, dv] Triton, same reference)."""
    monkeypatch.setenv("RLCD_KERNELS", "triton")
    calls = dict(attn_mod.KERNEL_CALLS)
    o = attention(q, k, v, start, sm_scale)
    grads = torch.autograd.grad(o, (q, k, v), do)
    assert attn_mod.KERNEL_CALLS["attention_fwd"] == calls.get("attention_fwd", 0) + 1, "Triton fwd did not run"
    assert attn_mod.KERNEL_CALLS["attention_bwd"] == calls.get("attention_bwd", 0) + 1, "Triton bwd did not run"

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    o64 = attention_ref(q64, k64, v64, start, sm_scale)
    grads64 = torch.autograd.grad(o64, (q64, k64, v64), do.double())
    return [o, *grads], [o64, *grads64]


def _assert_close(got, want, dtype):
    _, atol, rtol = TOL[dtype]
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m: f"{name} ({dtype}): {m}")


# ---------------------------------------------------------------------------------------------------------
# correctness
# ---------------------------------------------------------------------------------------------------------
@needs_triton
def test_realistic_shape(monkeypatch):
    """The default model's geometry in miniature: 9 query heads on 3 KV heads (ratio 3), hd 64, padding."""
    (q, k, v), do = _inputs(B=2, H=6, H_kv=2, T=64, hd=64, dtype=torch.float32)
    start = torch.tensor([0, 13], device=DEVICE)
    got, want = _triton_vs_ref(monkeypatch, q, k, v, do, start)
    _assert_close(got, want, torch.float32)


@needs_triton
@pytest.mark.parametrize("T", [1, 17, 123])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_odd_lengths(monkeypatch, T, group, padded):
    """T not a multiple of any block (and T = 1), GQA ratios 1 and 3, with and without left padding."""
    H_kv = 2 if group == 1 else 1
    (q, k, v), do = _inputs(B=2, H=H_kv * group, H_kv=H_kv, T=T, hd=32, dtype=torch.float32, seed=T)
    # row 0 unpadded; row 1 padded up to a position that is not block aligned (T = 1: the whole row)
    start = torch.tensor([0, min(T, 5 if T < 100 else 70)], device=DEVICE) if padded else None
    got, want = _triton_vs_ref(monkeypatch, q, k, v, do, start)
    _assert_close(got, want, torch.float32)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(monkeypatch, dtype):
    """fp16 and bf16 inputs (the interpreter upcasts them to fp32 on load; the GPU uses tensor cores)."""
    (q, k, v), do = _inputs(B=2, H=6, H_kv=2, T=50, hd=32, dtype=dtype, seed=1)
    got, want = _triton_vs_ref(monkeypatch, q, k, v, do, torch.tensor([3, 20], device=DEVICE))
    _assert_close(got, want, dtype)


@needs_triton
def test_head_dim_128_group_8_strided_kv_custom_scale(monkeypatch):
    """hd = 128, 8 query heads per KV head, K/V as transposed views too, sm_scale given."""
    (q, k, v), do = _inputs(B=1, H=8, H_kv=1, T=40, hd=128, dtype=torch.float32, seed=2, kv_contiguous=False)
    got, want = _triton_vs_ref(monkeypatch, q, k, v, do, torch.tensor([9], device=DEVICE), sm_scale=0.05)
    _assert_close(got, want, torch.float32)


@needs_triton
def test_padding_is_inert(monkeypatch):
    """Padded query rows give exactly 0 and no gradient; whatever sits at padded positions changes nothing."""
    monkeypatch.setenv("RLCD_KERNELS", "triton")
    (q, k, v), do = _inputs(B=2, H=3, H_kv=1, T=40, hd=32, dtype=torch.float32, seed=3)
    start = torch.tensor([0, 21], device=DEVICE)
    o = attention(q, k, v, start)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    assert torch.count_nonzero(o[1, :, :21]) == 0
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.count_nonzero(g[1, :, :21]) == 0, f"{name} is non-zero at padded positions"
        assert torch.count_nonzero(g[1, :, 21:]) > 0 and torch.count_nonzero(g[0]) > 0, name

    # large values at padded positions (as if from garbage embeddings) leave the real rows unchanged
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[1, :, :21] = 1e3 * torch.randn_like(x[1, :, :21])
    o2 = attention(q2, k2, v2, start)
    torch.testing.assert_close(o2, o.detach(), atol=0, rtol=0)


@needs_triton
def test_partial_gradients_and_layout(monkeypatch):
    """Only some inputs need gradients (the others are skipped, not computed); dq has q's memory layout."""
    (q, k, v), do = _inputs(B=2, H=4, H_kv=2, T=21, hd=32, dtype=torch.float32, seed=5)
    got, want = _triton_vs_ref(monkeypatch, q, k, v, do)
    assert got[1].stride() == q.stride()  # (B, H, T, hd) view of a (B, T, H, hd) buffer, like q
    k.requires_grad_(False)
    v.requires_grad_(False)
    (dq,) = torch.autograd.grad(attention(q, k, v), (q,), do)
    torch.testing.assert_close(dq.double(), want[1], atol=2e-5, rtol=2e-5)
    q.requires_grad_(False)
    v.requires_grad_(True)
    (dv,) = torch.autograd.grad(attention(q, k, v), (v,), do)
    torch.testing.assert_close(dv.double(), want[3], atol=2e-5, rtol=2e-5)


def test_reference_matches_sdpa():
    """attention_ref itself: no padding, it must equal SDPA with is_causal and repeated K/V."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 23, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 23, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 23, 16, generator=g, dtype=torch.float64)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True)
    torch.testing.assert_close(attention_ref(q, k, v), want)
    # with padding, a real row's output equals attention over its unpadded suffix alone
    start = torch.tensor([0, 7])
    o = attention_ref(q, k, v, start)
    torch.testing.assert_close(o[1, :, 7:], attention_ref(q[1:, :, 7:], k[1:, :, 7:], v[1:, :, 7:])[0])
    assert torch.count_nonzero(o[1, :, :7]) == 0


# ---------------------------------------------------------------------------------------------------------
# dispatch and packaging
# ---------------------------------------------------------------------------------------------------------
def test_use_triton_respects_env(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.setenv("RLCD_KERNELS", "torch")
    assert use_triton(t) is False
    calls = attn_mod.KERNEL_CALLS["attention_fwd"]
    (q, k, v), _ = _inputs(B=1, H=2, H_kv=1, T=5, hd=32, dtype=torch.float32)
    attention(q, k, v)
    assert attn_mod.KERNEL_CALLS["attention_fwd"] == calls, "RLCD_KERNELS=torch still ran the kernel"
    monkeypatch.setenv("RLCD_KERNELS", "auto")
    assert use_triton(t) is False  # a CPU tensor
    monkeypatch.delenv("RLCD_KERNELS")
    assert use_triton(t) is False
    if torch.cuda.is_available():
        assert use_triton(t.cuda()) is HAS_TRITON
    monkeypatch.setenv("RLCD_KERNELS", "bogus")
    with pytest.raises(ValueError):
        use_triton(t)
    if HAS_TRITON:
        monkeypatch.setenv("RLCD_KERNELS", "triton")
        if torch.cuda.is_available():
            assert use_triton(t.cuda()) is True
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):   # a CPU tensor, no interpreter
                use_triton(t)
        else:
            assert use_triton(t) is True          # conftest set TRITON_INTERPRET=1 on a CPU-only machine


def test_imports_and_falls_back_without_triton():
    """With triton unimportable, kernels imports, runs the references, and refuses RLCD_KERNELS=triton."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, os\n"
        "from kernels import attention, attention_ref, token_logprobs, logprob_ref, use_triton, HAS_TRITON\n"
        "assert not HAS_TRITON\n"
        "torch.manual_seed(0)\n"
        "q = torch.randn(1, 2, 5, 16); k = torch.randn(1, 1, 5, 16)\n"
        "assert torch.equal(attention(q, k, k), attention_ref(q, k, k))\n"
        "h = torch.randn(3, 8); W = torch.randn(11, 8); y = torch.tensor([1, 2, 3])\n"
        # The chunked torch path adds the logits' 8 terms and the log-sum-exp's 11 in other orders than the
        # reference: ~1e-6 apart at these magnitudes (|logits| < ~10), absolute where a log-prob is near 0.
        "torch.testing.assert_close(token_logprobs(h, W, y), logprob_ref(h, W, y), atol=1e-5, rtol=1e-5)\n"
        "os.environ['RLCD_KERNELS'] = 'triton'\n"
        "try:\n    use_triton(q)\nexcept RuntimeError:\n    print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RLCD_KERNELS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _ptxas_available() -> bool:
    if not HAS_TRITON:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="triton without its NVIDIA backend (ptxas)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the tests above run the compiled kernels")
def test_attention_kernels_compile_for_sm90():
    """The interpreter never builds GPU code: compile the attention kernels for sm_90 at the launch configs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "kernels.aot_check", "--quick", "--only", "attention"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 failure(s)" in out.stdout and "attention fwd" in out.stdout, out.stdout
