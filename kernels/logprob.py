"""Token log-probabilities from hidden states: fused output head + log-softmax + gather (+ entropy).

Shapes: N rows (all leading dimensions of h flattened), D hidden size, V vocabulary size.
  h (..., D) hidden states, weight (V, D) output head (tied to the input embedding in the default model),
  targets (...) int64 in [0, V) wherever mask is True, mask (...) bool or None.

Math, per row n with temperature tau (Ziegler et al. 2019 / lm-human-preference-details: logits are divided
by the sampling temperature before the log-softmax):
  z_j    = (h_n . w_j) / tau                          (fp32)
  lse    = log sum_j exp(z_j)
  logp   = z_y - lse                                  y = targets[n]
  H      = -sum_j p_j log p_j = lse - sum_j p_j z_j   p_j = exp(z_j - lse)
  dlogp/dz_j = 1[j = y] - p_j
  dH/dz_j    = -p_j (log p_j + H)                     (differentiate -sum p log p with dp_k/dz_j = p_k(1[k=j] - p_j))
  dL/dh = (dL/dz / tau) W,   dL/dW = (dL/dz / tau)^T h

Triton path (never builds the (N, V) logits):
  forward  _logprob_fwd: one program per (BLOCK_N rows, slice of V). It walks over the slice BLOCK_V columns
           at a time; each (BLOCK_N, BLOCK_V) logit tile is a small matmul over D in BLOCK_D steps, folded at
           once into an online log-sum-exp (running max m, sum s of exp(z - m), and t = sum exp(z - m)(z - m)
           for the entropy), then dropped. Splitting V over several programs (flash-decoding style) keeps the
           GPU busy when N is small; the per-slice (m, s, t, z_y) are merged on the host in O(N * splits).
  backward chunk over N. For each chunk of rows, _logprob_bwd_dz recomputes the logit tiles, turns them into
           dL/dz / tau with the saved lse and H, and writes that (chunk, V) slab; then dh = slab @ W (torch
           matmul) and dW += slab^T h (_mm_tn, accumulating in an fp32 (V, D) buffer: per-chunk partial sums,
           no atomics, no rounding of partials). Peak extra memory: one slab (~256 MiB by default) + fp32 dW.
  Both logp and entropy are differentiable on both paths (the entropy gradient is in the kernel too).
  Masked rows (mask False) output 0, get zero gradient, and a block of BLOCK_N rows that are all masked
  skips its matmuls entirely.

Torch path (CPU default), over chunks of _TORCH_CHUNK_ROWS rows, so that neither the forward nor the
backward ever holds more than one (chunk, V) slab of logits: log-probs alone by _TorchLogprobs (the GEMM
writes the slab, the softmax passes work on it in place, backward recomputes it); with the entropy,
logprob_ref under activation checkpointing.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils.checkpoint import checkpoint

from .dispatch import triton, tl, use_triton

# Incremented by the Triton host functions, so tests can assert the kernels really ran.
KERNEL_CALLS: Counter = Counter()

_TORCH_CHUNK_ROWS = 512  # rows per chunk on the torch path: (512, 49152) fp32 logits = 100 MB
_DZ_CHUNK_BYTES = 256 * 2**20  # budget for the (chunk, V) dL/dz slab of the Triton backward


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------
def logprob_ref(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch: materialises the (..., V) logits. Math in float32 (float64 if h or weight is);
    returns logp (...) [and entropy (...)] in that dtype. Masked positions give 0 and no gradient."""
    ct = torch.float64 if torch.float64 in (h.dtype, weight.dtype) else torch.float32
    logits = (h.to(ct) @ weight.to(ct).T) / temperature  # (..., V)
    logz = torch.log_softmax(logits, dim=-1)  # (..., V)
    safe_targets = targets if mask is None else targets.masked_fill(~mask, 0)  # masked slots may hold -100
    logp = logz.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (...)
    zero = torch.zeros((), dtype=ct, device=h.device)
    if mask is not None:
        logp = torch.where(mask, logp, zero)
    if not return_entropy:
        return logp
    entropy = -(logz.exp() * logz).sum(-1)  # (...)
    if mask is not None:
        entropy = torch.where(mask, entropy, zero)
    return logp, entropy


def _logprob_torch_chunked(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None,
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The torch path. Log-probs alone go through _TorchLogprobs (in-place passes over one reused (chunk, V)
    buffer); with the entropy, logprob_ref runs over row chunks, each checkpointed under autograd (its
    logits are recomputed in backward). Either way memory holds one (chunk, V) slab, never (N, V)."""
    D = h.shape[-1]
    lead = h.shape[:-1]
    h2, t1 = h.reshape(-1, D), targets.reshape(-1)  # (N, D), (N,)
    m1 = None if mask is None else mask.reshape(-1)  # (N,)
    if h2.shape[0] == 0:  # no rows
        empty = h.new_zeros(lead, dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
        return empty, (empty.clone() if return_entropy else None)
    if not return_entropy:
        return _TorchLogprobs.apply(h2, weight, t1, m1, float(temperature)).view(lead), None
    keep_graph = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    logps, ents = [], []
    for c0 in range(0, h2.shape[0], _TORCH_CHUNK_ROWS):
        c = slice(c0, c0 + _TORCH_CHUNK_ROWS)
        args = (h2[c], weight, t1[c], temperature, None if m1 is None else m1[c], True)
        lp, ent = checkpoint(logprob_ref, *args, use_reentrant=False) if keep_graph else logprob_ref(*args)
        logps.append(lp)
        ents.append(ent)
    return torch.cat(logps).view(lead), torch.cat(ents).view(lead)


class _TorchLogprobs(torch.autograd.Function):
    """logp (N,) of h2 (N, D), weight (V, D), targets (N,), mask (N,) bool or None, on the torch path.

    Per chunk of rows, one (chunk, V) buffer takes the logits z = (h / tau) W^T from the GEMM and is then
    worked in place: forward z -> exp(z - max) for the log-sum-exp (logp = z_y - lse); backward recomputes
    z and turns it into dL/dz = g (1[j = y] - exp(z - lse)), then dh = dL/dz W / tau and
    dW += dL/dz^T h / tau. The reference's log_softmax, division and their gradients each allocated and
    walked a fresh (N, V) tensor; on CPU those passes cost as much as the GEMMs."""

    @staticmethod
    def forward(ctx, h2, weight, targets, mask, temperature):
        ct = torch.float64 if torch.float64 in (h2.dtype, weight.dtype) else torch.float32
        w = weight.to(ct)
        safe = targets if mask is None else targets.masked_fill(~mask, 0)  # masked slots may hold -100
        N, V = h2.shape[0], w.shape[0]
        rows = min(N, _TORCH_CHUNK_ROWS)
        z = torch.empty(rows, V, dtype=ct, device=h2.device)  # the one (chunk, V) buffer
        lse = torch.empty(N, dtype=ct, device=h2.device)
        logp = torch.empty(N, dtype=ct, device=h2.device)
        for c0 in range(0, N, rows):
            c = slice(c0, c0 + rows)
            zc = z[: h2[c].shape[0]]
            torch.mm(h2[c].to(ct) / temperature, w.T, out=zc)  # (n, V) logits / tau
            z_y = zc.gather(1, safe[c, None]).squeeze(1)  # (n,)
            m = zc.amax(1)  # (n,)
            lse[c] = m + zc.sub_(m[:, None]).exp_().sum(1).log_()
            logp[c] = z_y - lse[c]
        if mask is not None:
            logp = logp.masked_fill_(~mask, 0.0)
        ctx.save_for_backward(h2, weight, safe, mask, lse)
        ctx.temperature = temperature
        return logp

    @staticmethod
    def backward(ctx, g):
        h2, weight, safe, mask, lse = ctx.saved_tensors
        tau = ctx.temperature
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ct = lse.dtype
        w = weight.to(ct)
        g = g.to(ct) if mask is None else g.to(ct).masked_fill(~mask, 0.0)  # masked rows: no gradient
        N, V = h2.shape[0], w.shape[0]
        rows = min(N, _TORCH_CHUNK_ROWS)
        z = torch.empty(rows, V, dtype=ct, device=h2.device)
        dh = torch.empty(N, w.shape[1], dtype=ct, device=h2.device) if need_dh else None
        dw = torch.zeros_like(w) if need_dw else None
        for c0 in range(0, N, rows):
            c = slice(c0, c0 + rows)
            hc = h2[c].to(ct)
            zc = z[: hc.shape[0]]
            torch.mm(hc / tau, w.T, out=zc)
            # dL/dz_j = g (1[j = y] - p_j), p = exp(z - lse)
            zc.sub_(lse[c, None]).exp_().mul_(-g[c, None]).scatter_add_(1, safe[c, None], g[c, None])
            if need_dh:
                torch.mm(zc, w, out=dh[c]).div_(tau)
            if need_dw:
                dw.addmm_(zc.T, hc, alpha=1.0 / tau)
        return (None if dh is None else dh.to(h2.dtype), None if dw is None else dw.to(weight.dtype),
                None, None, None)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _logprob_fwd(
    H, W, TGT, MASK, M_PART, S_PART, T_PART, ZY_PART,
    N, V, D, V_PER_SPLIT, stride_hn, stride_hd, stride_wv, stride_wd, inv_temp,
    HAS_MASK: tl.constexpr, WITH_ENTROPY: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """grid = (cdiv(N, BLOCK_N), splits). Program (i, s) covers rows [i*BLOCK_N, +BLOCK_N) and vocabulary
    columns [s*V_PER_SPLIT, +V_PER_SPLIT), and writes, per row, into the (splits, N) partial buffers:
      M_PART  m = max_j z_j                   S_PART  s = sum_j exp(z_j - m)
      T_PART  t = sum_j exp(z_j - m) (z_j - m)   (only WITH_ENTROPY)
      ZY_PART z_y = h . w_y / tau               (slice 0 only; 0 from the others)"""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = offs_n < N
    row_ok = row_in
    if HAS_MASK:
        row_ok = row_ok & (tl.load(MASK + offs_n, mask=row_in, other=0) != 0)
    tgt = tl.load(TGT + offs_n, mask=row_in, other=-1)
    offs_d = tl.arange(0, BLOCK_D)
    # row pointers (int64: N * D may pass 2^31); rows past N wrap onto real rows (% N) so the inner loop
    # needs no row mask; their results are never stored
    h_rows = H + (offs_n % N).to(tl.int64)[:, None] * stride_hn

    # all rows masked out: empty loops below, nothing computed (the host ignores masked rows' partials)
    d_hi = tl.where(tl.max(row_ok.to(tl.int32), 0) > 0, D, 0)

    # the target logit z_y = h . w_y / tau, one dot product per row over D (fp32), by slice 0's program.
    # Cheaper than picking column y out of every logit tile; masked rows (targets may be -100) read row 0.
    zy = tl.zeros([BLOCK_N], dtype=tl.float32)
    if pid_s == 0:
        w_rows = W + tl.where(row_ok, tgt, 0).to(tl.int64)[:, None] * stride_wv
        for d0 in range(0, d_hi, BLOCK_D):
            dmask = offs_d[None, :] < D - d0
            h = tl.load(h_rows + (d0 + offs_d)[None, :] * stride_hd, mask=dmask, other=0.0).to(tl.float32)
            w = tl.load(w_rows + (d0 + offs_d)[None, :] * stride_wd, mask=dmask, other=0.0).to(tl.float32)
            zy += tl.sum(h * w, 1)
        zy = zy * inv_temp

    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.where(d_hi > 0, tl.minimum(v_lo + V_PER_SPLIT, V), v_lo)
    # m starts finite so that m - m_new and exp(m - m_new) never meet inf - inf
    m_i = tl.zeros([BLOCK_N], dtype=tl.float32) - 1.0e30
    s_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v[None, :] < V  # (1, BLOCK_V)
        # (BLOCK_N, BLOCK_V) tile of h W^T: a small matmul over D in BLOCK_D steps, fp32 accumulation
        h_ptrs = h_rows + offs_d[None, :] * stride_hd  # (BLOCK_N, BLOCK_D)
        w_ptrs = W + (offs_v % V).to(tl.int64)[:, None] * stride_wv + offs_d[None, :] * stride_wd  # (BLOCK_V, BLOCK_D)
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            if EVEN_D:
                h = tl.load(h_ptrs)
                w = tl.load(w_ptrs)
            else:
                h = tl.load(h_ptrs, mask=offs_d[None, :] < D - d0, other=0.0)
                w = tl.load(w_ptrs, mask=offs_d[None, :] < D - d0, other=0.0)
            acc = tl.dot(h.to(COMPUTE_DTYPE), tl.trans(w.to(COMPUTE_DTYPE)), acc=acc, input_precision=PRECISION)
            h_ptrs += BLOCK_D * stride_hd
            w_ptrs += BLOCK_D * stride_wd
        z = tl.where(col_ok, acc * inv_temp, float("-inf"))  # z = logits / temperature; no column past V
        # 1. new running max
        m_new = tl.maximum(m_i, tl.max(z, 1))
        # 2. this tile's exp(z - m_new): 0 on missing columns
        zm = z - m_new[:, None]
        e = tl.exp(zm)
        # 3. factor moving the old sums from reference m_i to m_new
        alpha = tl.exp(m_i - m_new)
        # 4. t = sum e (z - m): each old term is scaled by alpha and its (z - m) grows by (m_i - m_new)
        #    (uses the old s_i, so it comes before step 5). Keeping z - m rather than z avoids cancelling
        #    large numbers when the entropy lse - E[z] is formed at the end. (z - m is -inf on missing
        #    columns, where e = 0: zero it first so 0 * -inf does not make a NaN.)
        if WITH_ENTROPY:
            t_i = alpha * (t_i + s_i * (m_i - m_new)) + tl.sum(e * tl.where(col_ok, zm, 0.0), 1)
        # 5. s = sum e, rescaled then extended
        s_i = alpha * s_i + tl.sum(e, 1)
        m_i = m_new

    part = pid_s.to(tl.int64) * N + offs_n  # (splits, N) row-major
    tl.store(M_PART + part, m_i, mask=row_in)
    tl.store(S_PART + part, s_i, mask=row_in)
    if WITH_ENTROPY:
        tl.store(T_PART + part, t_i, mask=row_in)
    tl.store(ZY_PART + part, zy, mask=row_in)


@triton.jit
def _logprob_bwd_dz(
    H, W, TGT, MASK, LSE, ENT, G_LOGP, G_ENT, DZ,
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, stride_dzn, inv_temp,
    HAS_MASK: tl.constexpr, HAS_G_ENT: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """grid = (cdiv(N, BLOCK_N), cdiv(V, BLOCK_V)), rows of one chunk (axis 0 fastest: programs running
    together share a W tile and the chunk of h stays in L2). Writes the (N, V) slab
    DZ = dL/dlogits = (g_logp (1[j=y] - p_j) - g_ent p_j (log p_j + H)) / tau, 0 on masked rows."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_n < N
    row_ok = row_in
    if HAS_MASK:
        row_ok = row_ok & (tl.load(MASK + offs_n, mask=row_in, other=0) != 0)
    tgt = tl.load(TGT + offs_n, mask=row_in, other=-1)
    lse = tl.load(LSE + offs_n, mask=row_in, other=0.0)
    g_logp = tl.load(G_LOGP + offs_n, mask=row_in, other=0.0)

    # recompute the (BLOCK_N, BLOCK_V) logit tile as the forward did (rows past N, columns past V wrap
    # onto real ones and are not stored); all rows masked out: skip the matmul, the result is zeroed below
    d_hi = tl.where(tl.max(row_ok.to(tl.int32), 0) > 0, D, 0)
    h_ptrs = H + (offs_n % N).to(tl.int64)[:, None] * stride_hn + offs_d[None, :] * stride_hd
    w_ptrs = W + (offs_v % V).to(tl.int64)[:, None] * stride_wv + offs_d[None, :] * stride_wd
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, d_hi, BLOCK_D):
        if EVEN_D:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            h = tl.load(h_ptrs, mask=offs_d[None, :] < D - d0, other=0.0)
            w = tl.load(w_ptrs, mask=offs_d[None, :] < D - d0, other=0.0)
        acc = tl.dot(h.to(COMPUTE_DTYPE), tl.trans(w.to(COMPUTE_DTYPE)), acc=acc, input_precision=PRECISION)
        h_ptrs += BLOCK_D * stride_hd
        w_ptrs += BLOCK_D * stride_wd
    z = acc * inv_temp  # logits / temperature
    log_p = z - lse[:, None]  # log p_j from the saved log-sum-exp
    p = tl.exp(log_p)
    onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0)
    dz = g_logp[:, None] * (onehot - p)  # dlogp_y/dz_j = 1[j=y] - p_j
    if HAS_G_ENT:
        ent = tl.load(ENT + offs_n, mask=row_in, other=0.0)
        g_ent = tl.load(G_ENT + offs_n, mask=row_in, other=0.0)
        dz -= g_ent[:, None] * p * (log_p + ent[:, None])  # dH/dz_j = -p_j (log p_j + H)
    dz = dz * inv_temp  # z = logits / tau
    dz = tl.where(row_ok[:, None], dz, 0.0)
    tl.store(
        DZ + offs_n.to(tl.int64)[:, None] * stride_dzn + offs_v[None, :],
        dz.to(DZ.dtype.element_ty), mask=row_in[:, None] & (offs_v[None, :] < V),
    )


@triton.jit
def _mm_tn(
    A, B, C, M, N, K,
    stride_ak, stride_am, stride_bk, stride_bn, stride_cm, stride_cn,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """C (+)= A^T B with A (K, M), B (K, N), C (M, N) fp32; grid = (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),).
    Here: dW (V, D) += dz^T h for one chunk, A = dz (n, V), B = h (n, D), K = n rows.

    A is read in its natural (BLOCK_K, BLOCK_M) layout and transposed in registers (cheaper for the compiler
    than a strided (BLOCK_M, BLOCK_K) load). Programs are numbered with the N-blocks fastest, so those sharing
    one BLOCK_M slice of the tall dz run together and read it from DRAM once; h (one chunk) stays in L2.
    """
    pid = tl.program_id(0)
    n_blocks_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_blocks_n
    pid_n = pid % n_blocks_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # columns past M / N wrap onto real ones (tutorial 03 trick): the only mask in the loop is the one on K;
    # the wrapped results are not stored
    a_ptrs = A + offs_k.to(tl.int64)[:, None] * stride_ak + (offs_m % M)[None, :] * stride_am  # (BLOCK_K, BLOCK_M)
    b_ptrs = B + offs_k.to(tl.int64)[:, None] * stride_bk + (offs_n % N)[None, :] * stride_bn  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=offs_k[:, None] < K - k0, other=0.0).to(COMPUTE_DTYPE)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k0, other=0.0).to(COMPUTE_DTYPE)
        acc = tl.dot(tl.trans(a), b, acc=acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = C + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ACCUMULATE:
        # chunks run one after another and this program alone owns its C tile: read-add-write, no atomics,
        # and the partial sums stay fp32 (no rounding per chunk)
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc, mask=c_mask)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------
def _configs(dtype: torch.dtype, on_gpu: bool) -> dict:
    """Tile sizes.

    GPU: matmul-like tiles, chosen by compiling for sm_90 without a GPU (python -m kernels.aot_check) and
    keeping configs without register spills; smaller for fp32 (no tensor-core path, 2x the bytes). Not timed
    on a GPU. Interpreter: 16 rows and 16-deep D steps (the least tl.dot takes) so small tests cross
    several blocks, but wide V tiles: the interpreter pays per program and per loop trip, not per element.
    """
    if on_gpu and dtype != torch.float32:
        return dict(
            fwd=dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3),
            dz=dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=3),
            mm=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
        )
    if on_gpu:
        return dict(
            fwd=dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=2),
            dz=dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, num_warps=8, num_stages=2),
            mm=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
        )
    return dict(
        fwd=dict(BLOCK_N=16, BLOCK_V=512, BLOCK_D=16),
        dz=dict(BLOCK_N=16, BLOCK_V=512, BLOCK_D=16),
        mm=dict(BLOCK_M=512, BLOCK_N=16, BLOCK_K=16),
    )


def _compute_types(dtype: torch.dtype, on_gpu: bool):
    """(dtype fed to tl.dot, its input_precision): the input dtype on GPU (fp32 with exact 'ieee' products),
    always fp32 in the interpreter, where bf16 arithmetic is wrong."""
    if not on_gpu or dtype == torch.float32:
        return tl.float32, "ieee"
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], "tf32"


def _n_splits(n_row_blocks: int, n_col_blocks: int, device: torch.device) -> int:
    """How many slices of V each row block is cut into. GPU: enough programs for ~2 waves over the SMs.
    Interpreter: 2 (when V allows), only so that the tests exercise the merge of partial results."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, n_row_blocks)
    else:
        want = 2
    return max(1, min(want, n_col_blocks))


def _common_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """dtype h and W are brought to before the kernels: fp32 in the interpreter, else their promotion."""
    if not h.is_cuda:
        return torch.float32
    ct = torch.promote_types(h.dtype, weight.dtype)
    assert ct in (torch.float32, torch.float16, torch.bfloat16), f"dtype {ct} not supported by the kernels"
    return ct


def _logprob_forward(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """h (N, D), weight (V, D) in a common dtype, targets (N,) int64, mask (N,) uint8 or None.
    Returns logp, entropy (None unless with_entropy), lse, each (N,) fp32, 0 on masked rows."""
    KERNEL_CALLS["logprob_fwd"] += 1
    N, D = h.shape
    V = weight.shape[0]
    on_gpu = h.is_cuda
    cfg = _configs(h.dtype, on_gpu)["fwd"]
    compute_dtype, precision = _compute_types(h.dtype, on_gpu)
    n_row_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    n_col_blocks = triton.cdiv(V, cfg["BLOCK_V"])
    splits = _n_splits(n_row_blocks, n_col_blocks, h.device)
    v_per_split = triton.cdiv(n_col_blocks, splits) * cfg["BLOCK_V"]  # whole tiles per slice
    splits = triton.cdiv(V, v_per_split)  # no empty slice
    m, s, t, zy = torch.empty(4, splits, N, dtype=torch.float32, device=h.device)  # partials (splits, N)
    _logprob_fwd[(n_row_blocks, splits)](
        h, weight, targets, mask if mask is not None else targets, m, s, t, zy,
        N, V, D, v_per_split, *h.stride(), *weight.stride(), 1.0 / temperature,
        HAS_MASK=mask is not None, WITH_ENTROPY=with_entropy, EVEN_D=D % cfg["BLOCK_D"] == 0,
        COMPUTE_DTYPE=compute_dtype, PRECISION=precision, **cfg,
    )
    # merge the slices (log-sum-exp of log-sum-exps): move every slice onto the common reference M
    M = m.max(0).values  # (N,)
    r = torch.exp(m - M)  # (splits, N) rescale factors
    S = (s * r).sum(0)  # sum_j exp(z_j - M)
    lse = M + torch.log(S)
    logp = zy.sum(0) - lse  # only slice 0 wrote a non-zero z_y
    entropy = None
    if with_entropy:
        tz = (r * (t + s * (m - M))).sum(0)  # sum_j exp(z_j - M) (z_j - M)
        entropy = torch.log(S) - tz / S  # H = lse - E_p[z] = log S - E_p[z - M]
    if mask is not None:  # masked rows hold no valid partials (their S may be 0)
        keep = mask.bool()
        logp = torch.where(keep, logp, 0.0)
        lse = torch.where(keep, lse, 0.0)
        entropy = None if entropy is None else torch.where(keep, entropy, 0.0)
    return logp, entropy, lse


def _logprob_backward(
    g_logp: torch.Tensor | None,
    g_ent: torch.Tensor | None,
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    need_dh: bool,
    need_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dh (N, D) in h's dtype and dW (V, D) fp32, chunk by chunk over N (see the module docstring)."""
    KERNEL_CALLS["logprob_bwd"] += 1
    N, D = h.shape
    V = weight.shape[0]
    on_gpu = h.is_cuda
    cfgs = _configs(h.dtype, on_gpu)
    cfg, mm_cfg = cfgs["dz"], cfgs["mm"]
    compute_dtype, precision = _compute_types(h.dtype, on_gpu)
    g_logp = torch.zeros(N, dtype=torch.float32, device=h.device) if g_logp is None else g_logp
    g_logp = g_logp.float().contiguous()
    g_ent = None if g_ent is None else g_ent.float().contiguous()

    # rows per chunk: as many as fit the slab budget, a multiple of BLOCK_N, at least one block
    rows = _DZ_CHUNK_BYTES // (V * h.element_size()) // cfg["BLOCK_N"] * cfg["BLOCK_N"]
    rows = min(max(rows, cfg["BLOCK_N"]), N)
    dz = torch.empty(rows, V, dtype=h.dtype, device=h.device)  # (chunk, V) slab, reused by every chunk
    dh = torch.empty_like(h) if need_dh else None
    dw = torch.empty(V, D, dtype=torch.float32, device=h.device) if need_dw else None  # first chunk writes it
    for c0 in range(0, N, rows):
        n = min(rows, N - c0)
        h_c = h[c0 : c0 + n]  # (n, D) view
        dz_c = dz[:n]  # (n, V)
        _logprob_bwd_dz[(triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))](
            h_c, weight, targets[c0:], mask[c0:] if mask is not None else targets, lse[c0:],
            entropy[c0:] if g_ent is not None else lse, g_logp[c0:], g_ent[c0:] if g_ent is not None else lse,
            dz_c,
            n, V, D, *h_c.stride(), *weight.stride(), dz_c.stride(0), 1.0 / temperature,
            HAS_MASK=mask is not None, HAS_G_ENT=g_ent is not None, EVEN_D=D % cfg["BLOCK_D"] == 0,
            COMPUTE_DTYPE=compute_dtype, PRECISION=precision, **cfg,
        )
        if need_dh:
            torch.mm(dz_c, weight, out=dh[c0 : c0 + n])  # (n, V) @ (V, D)
        if need_dw:
            grid = (triton.cdiv(V, mm_cfg["BLOCK_M"]) * triton.cdiv(D, mm_cfg["BLOCK_N"]),)
            _mm_tn[grid](  # dW (V, D) (+)= dz_c^T (V, n) @ h_c (n, D)
                dz_c, h_c, dw, V, D, n, *dz_c.stride(), *h_c.stride(), *dw.stride(),
                ACCUMULATE=c0 > 0, COMPUTE_DTYPE=compute_dtype, PRECISION=precision, **mm_cfg,
            )
    return dh, dw


class _TokenLogprobs(torch.autograd.Function):
    """Outputs logp, or (logp, entropy) when with_entropy."""

    @staticmethod
    def forward(ctx, h, weight, targets, mask, temperature, with_entropy):
        logp, entropy, lse = _logprob_forward(h, weight, targets, mask, temperature, with_entropy)
        ctx.save_for_backward(h, weight, targets, mask, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an unused output (often the entropy) arrives as None: skip its term
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        h, weight, targets, mask, lse, entropy = ctx.saved_tensors
        dh, dw = _logprob_backward(
            g_logp, g_ent, h, weight, targets, mask, lse, entropy, ctx.temperature,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )
        dw = None if dw is None else dw.to(weight.dtype)  # fp32 accumulator -> parameter dtype, rounded once
        return dh, dw, None, None, None, None


def token_logprobs(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax((h @ weight.T) / temperature)[targets], computed in fp32 without the full logits.

    h (..., D) any float dtype, weight (V, D), targets (...) int64 (in [0, V) where mask is True), mask (...)
    bool or None. Returns logp (...) float32 [and entropy (...) float32 of softmax(logits / temperature)].
    Both are differentiable in h and weight (the entropy too, on both paths); masked positions are 0 with
    zero gradient. A weight shared with the embedding gets its gradient accumulated by autograd as usual.
    Triton when use_triton(h), else the torch path in chunks of rows (see the module docstring).
    """
    assert h.shape[-1] == weight.shape[1], f"h (..., {h.shape[-1]}) does not fit weight {tuple(weight.shape)}"
    assert targets.shape == h.shape[:-1], f"targets {tuple(targets.shape)} must be h.shape[:-1]"
    assert mask is None or mask.shape == targets.shape, "mask must have the shape of targets"
    if not use_triton(h) or h.numel() == 0:
        logp, ent = _logprob_torch_chunked(h, weight, targets, temperature, mask, return_entropy)
        return (logp, ent) if return_entropy else logp

    lead, D = h.shape[:-1], h.shape[-1]
    ct = _common_dtype(h, weight)
    h2 = h.reshape(-1, D).to(ct)  # (N, D); a view when h is contiguous and already ct
    w = weight.to(ct)
    t1 = targets.reshape(-1).to(torch.int64).contiguous()  # (N,)
    m1 = None if mask is None else mask.reshape(-1).contiguous().view(torch.uint8)  # (N,) 0/1 bytes
    # the casts above are autograd ops: dh and dW come back in ct and autograd casts them to h's and
    # weight's dtypes
    if not return_entropy:
        return _TokenLogprobs.apply(h2, w, t1, m1, float(temperature), False).view(lead)
    logp, ent = _TokenLogprobs.apply(h2, w, t1, m1, float(temperature), True)
    return logp.view(lead), ent.view(lead)
