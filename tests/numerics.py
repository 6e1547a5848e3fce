"""Tolerances that follow from the arithmetic, not from one machine's rounding.

The same fp32 quantity computed two ways (a chunked and an unchunked path, a KV cache and a full
forward, MKL's AVX-512 kernels on one machine and its AVX2 kernels on the next) differs because the
terms of each reduction are added in another order. For a sum of n terms t_i, each evaluation is off
from the exact value by about

    lam * sqrt(n) * u * sum_i |t_i|,        u = 2^-24 (fp32 unit roundoff),

the probabilistic rounding-error bound of Higham & Mary (SIAM J. Sci. Comput. 2019), where lam is a
small constant; the worst case is n * u * sum |t_i|, which blocked GEMMs and pairwise sums never come
near. Two evaluations compared with each other differ by up to twice that. The helpers below turn
this into tolerances, with lam = 4 by default (a rounding error beyond 4 "standard deviations" of the
random-walk model has probability far below 1e-4 per element), so that a test fails on a real bug and
never on the order in which another processor happens to add.

Quantities that pass through several reductions (a network's logits) add their errors: the tests
that use these helpers say in a comment how they chose n and the magnitude.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

U32 = 2.0 ** -24        # fp32 unit roundoff (half of torch.finfo(torch.float32).eps)
LAM = 4.0               # how many "standard deviations" of the random-walk rounding model we allow

# Two fp32 forwards of a tiny test model (tests/conftest.py: D = 64, F = 128, 2 blocks, V = 320) that
# differ only in the order of their sums: through the KV cache vs a full forward, packed vs plain
# weights, left-padded vs alone, naive vs SDPA attention. A logit goes through ~12 chained reductions
# of n <= 128 terms (q/k/v, scores, attention-weighted values, o, gate/up, down: per block; the head);
# the terms' root-mean-square is <= ~0.3 after RMSNorm with these weights, so each reduction rounds by
# about u * sqrt(n) * sqrt(n * 0.3^2) ~ 2e-7 in the random-walk model, and 12 of them, amplified by
# O(1) weights, stay below ~2.5e-6. NET_TOL allows 4x that plus a relative part for logits up to ~10
# (the same 1e-5 relative): measured under ATen's default / AVX2 and MKL's SSE4.2 / AVX2 kernels the
# worst case used 0.18 of it (`make test-portable` writes the margins).
NET_TOL = dict(atol=1e-5, rtol=1e-5)


def fp32_sum_tol(n: int, magnitude: float | Tensor, lam: float = LAM) -> float | Tensor:
    """|a - b| allowed between two fp32 evaluations (in different orders) of a sum of n terms whose
    absolute values add up to `magnitude` (a number, or a tensor for an element-wise bound)."""
    return 2 * lam * math.sqrt(max(n, 1)) * U32 * magnitude


def assert_within(got: Tensor, want: Tensor, bound: float | Tensor, name: str = "") -> None:
    """Element-wise |got - want| <= bound, with a message naming the worst element and its bound."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bound = torch.as_tensor(bound, dtype=torch.float64, device=got.device).expand_as(got)
    err = (got - want).abs()
    bad = ~(err <= bound)                   # NaN in either side counts as bad
    _note((err / bound.clamp_min(1e-300)).max().item() if err.numel() else 0.0)
    if bad.any():
        ratio = torch.where(bad, err / bound.clamp_min(1e-300), torch.zeros_like(err))
        i = int(ratio.flatten().argmax())
        idx = tuple(torch.unravel_index(torch.tensor(i), got.shape))
        raise AssertionError(f"{name}: {int(bad.sum())} of {got.numel()} elements beyond the bound; worst at "
                             f"{tuple(int(j) for j in idx)}: got {got.flatten()[i]:.9g}, want "
                             f"{want.flatten()[i]:.9g}, |diff| {err.flatten()[i]:.3g} > bound "
                             f"{bound.flatten()[i]:.3g}")


# --- margins: how much of each tolerance a run used ---------------------------------------------------------
_MARGINS: dict[str, float] = {}


def _site() -> str:
    """file:line of the test code that called the assertion."""
    import traceback

    for fr in reversed(traceback.extract_stack()[:-2]):
        if "/tests/" in fr.filename and not fr.filename.endswith(("numerics.py", "conftest.py")):
            return f"{fr.filename.rsplit('/tests/', 1)[1]}:{fr.lineno}"
    return "?"


def _note(used: float) -> None:
    site = _site()
    _MARGINS[site] = max(_MARGINS.get(site, 0.0), used)


def record_margins(path: str) -> None:
    """Wrap torch.testing.assert_close so that every call records max |a - b| / (atol + rtol |b|) for its
    call site, and write the sites sorted by that fraction to `path` at exit. Run the suite under another
    instruction set (make test-portable) and a fraction near 1 shows a tolerance that holds by luck."""
    import atexit

    import torch.testing

    original = torch.testing.assert_close

    def assert_close(actual, expected, *args, rtol=None, atol=None, **kw):
        try:
            if isinstance(actual, Tensor) and isinstance(expected, Tensor) and actual.is_floating_point() \
                    and actual.shape == expected.shape and actual.numel():
                if rtol is None or atol is None:
                    from torch.testing._comparison import default_tolerances
                    rtol, atol = default_tolerances(actual, expected)
                a, b = actual.detach().double(), expected.detach().double().to(actual.device)
                ok = torch.isfinite(b)
                if ok.any():
                    used = ((a - b).abs() / (atol + rtol * b.abs()).clamp_min(1e-300))[ok].max().item()
                    _note(used)
        except Exception:               # the report must never change a test's outcome
            pass
        return original(actual, expected, *args, rtol=rtol, atol=atol, **kw)

    torch.testing.assert_close = assert_close

    def write():
        rows = sorted(_MARGINS.items(), key=lambda kv: -kv[1])
        with open(path, "w") as f:
            f.write("# fraction of the tolerance used, worst first (1.0 = at the limit)\n")
            for site, used in rows:
                f.write(f"{used:10.4f}  {site}\n")

    atexit.register(write)
