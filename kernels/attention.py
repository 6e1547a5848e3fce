"""Causal self-attention in Triton (FlashAttention-2), forward and backward, with GQA and left padding.

Shapes (one letter per dimension, used throughout):
  B batch, H query heads, H_kv key/value heads (H % H_kv == 0, GROUP = H // H_kv), T positions, hd head dim.
  q (B, H, T, hd); k, v (B, H_kv, T, hd). Query head h reads KV head h // GROUP: K/V are never repeated in
  memory, the kernels just index the shared head.
  start (B,) int64 or None: first real position of each row (left padding).

Math, per (b, h), with i a query position and j a key position:
  S_ij = sm_scale * q_i . k_j                      visible iff start[b] <= j <= i (causal + padding mask)
  P_ij = exp(S_ij - LSE_i),  LSE_i = log sum_j exp(S_ij)     (softmax over the visible keys)
  O_i  = sum_j P_ij v_j
  Query rows i < start[b] are padding: they see no key, output exactly 0 and pass no gradient.

Forward (Dao 2023, "FlashAttention-2", Alg. 1; notation of the Triton tutorial 06-fused-attention): one
program per (BLOCK_M query rows, b, h) streams over blocks of BLOCK_N keys keeping, per row, the running
max m_i, the running denominator l_i and the unnormalised output acc (online softmax, Milakov & Gimelshein
2018). The (T, T) matrices S and P never exist in memory. Scores are kept in base 2 (qk_scale = sm_scale *
log2 e, exp2 instead of exp) because exp2 is the native instruction. The row log-sum-exp (base 2) is saved
so that backward recomputes P instead of storing it.

Backward (FA-2 Alg. 2), with Delta_i = sum_d dO_id O_id (= sum_j P_ij dP_ij):
  dV = P^T dO      dP = dO V^T      dS = P * (dP - Delta)      dQ = sm_scale dS K      dK = sm_scale dS^T Q
  _attn_bwd_dkdv: one program per (BLOCK_N keys, b, KV head) loops over the GROUP query heads of its KV
                  head and over the query blocks at or below the diagonal, so dK/dV come out already summed
                  over the group, in registers, without atomics.
  _attn_bwd_dq:   one program per (BLOCK_M queries, b, h) loops over key blocks up to the diagonal.
  Every load and store is masked, so T need not be a multiple of any block size (the tutorial's backward
  requires multiples of 128; PPO batches have arbitrary lengths).

Decoding one token against a KV cache does not come here: the model calls torch SDPA for that step (one query
row, no causal mask within the step, a cache longer than the query), which is memory-bound and well served by
SDPA. This module covers prefill and training, where q, k, v span the same T positions.
"""
from __future__ import annotations

from collections import Counter

import torch

from .dispatch import triton, tl, use_triton

# Incremented by the Triton host functions, so tests can assert the kernels really ran.
KERNEL_CALLS: Counter = Counter()


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------
def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch causal attention with the same semantics as `attention` (materialises (T, T)).

    Math in float32 (float64 if q is float64); output in q's dtype.
    """
    B, H, T, hd = q.shape
    H_kv = k.shape[1]
    sm_scale = hd**-0.5 if sm_scale is None else sm_scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k.repeat_interleave(H // H_kv, dim=1)  # (B, H, T, hd): KV head h // GROUP for query head h
    v = v.repeat_interleave(H // H_kv, dim=1)  # (B, H, T, hd)
    s = (q.to(ct) @ k.to(ct).transpose(-2, -1)) * sm_scale  # (B, H, T, T)
    i = torch.arange(T, device=q.device)[:, None]  # query position
    j = torch.arange(T, device=q.device)[None, :]  # key position
    visible = (j <= i)[None]  # (1, T, T) causal
    real_row = torch.ones(1, T, 1, dtype=torch.bool, device=q.device)  # (1, T, 1)
    if start is not None:
        first = start.to(q.device).view(B, 1, 1)
        visible = visible & (j >= first)  # (B, T, T): padding keys invisible
        real_row = i >= first  # (B, T, 1)
        # A padding row sees nothing; let it see itself so its softmax is finite (no NaN anywhere in the
        # graph, hence no NaN gradient), then zero its output below.
        visible = visible | (~real_row & (j == i))
    s = s.masked_fill(~visible[:, None], float("-inf"))  # (B, H, T, T)
    p = torch.softmax(s, dim=-1)
    o = p @ v.to(ct)  # (B, H, T, hd)
    o = torch.where(real_row[:, None], o, torch.zeros((), dtype=ct, device=q.device))
    return o.to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    K_head, V_head, stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, start_b, lo, hi, T, qk_scale,
    BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online-softmax update of (acc, l_i, m_i) with the keys [lo, hi), BLOCK_N at a time.

    DIAGONAL=False: keys strictly left of the query block, all causally visible (only the padding mask).
    DIAGONAL=True:  keys overlapping the query block, masked element by element (j <= i, j < T).
    """
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # (BLOCK_N, hd) tile of K; rows beyond T read as 0 and are masked out below
        k = tl.load(
            K_head + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
            mask=offs_n[:, None] < T, other=0.0,
        ).to(COMPUTE_DTYPE)
        # scores in base 2: qk_scale = sm_scale * log2(e), so exp2(qk) == exp(sm_scale * q.k)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N) fp32
        visible = offs_n[None, :] >= start_b  # left padding: keys before start[b] get no weight
        if DIAGONAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < T)
        qk = tl.where(visible, qk, float("-inf"))
        # 1. running max over all keys seen so far (m_i starts finite, so it stays finite even for a padding
        #    row that has seen only -inf: no inf - inf below)
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        # 2. this block's unnormalised probabilities relative to the new max (exp2(-inf) = 0 when masked)
        p = tl.math.exp2(qk - m_ij[:, None])
        # 3. factor that moves what was accumulated relative to the old max onto the new one
        alpha = tl.math.exp2(m_i - m_ij)
        # 4. rescale the denominator and add this block's mass
        l_i = l_i * alpha + tl.sum(p, 1)
        # 5. rescale the numerator and add this block's P V (P cast to the matmul dtype, accumulation fp32)
        v = tl.load(
            V_head + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :] * stride_vd,
            mask=offs_n[:, None] < T, other=0.0,
        ).to(COMPUTE_DTYPE)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(COMPUTE_DTYPE), v, acc=acc, input_precision=PRECISION)
        # 6. the new max becomes the reference for the next block
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, START,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, GROUP, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_START: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """grid = (cdiv(T, BLOCK_M), B * H). Writes O (B, H, T, hd) and LSE (B, H, T) in base 2."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)  # int64: b * stride_b can pass 2^31 elements
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP  # GQA: the KV head shared by GROUP consecutive query heads
    Q_head = Q + off_b * stride_qb + off_h * stride_qh
    K_head = K + off_b * stride_kb + off_hkv * stride_kh
    V_head = V + off_b * stride_vb + off_hkv * stride_vh
    O_head = O + off_b * stride_ob + off_h * stride_oh

    start_b = 0
    if HAS_START:
        start_b = tl.load(START + off_b).to(tl.int32)

    m0 = pid_m * BLOCK_M  # first query row of this program
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    # (BLOCK_M, hd) query tile, loaded once and kept in registers while all its key blocks stream past;
    # rows beyond T read as 0 and are never stored
    q = tl.load(
        Q_head + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :] * stride_qd,
        mask=offs_m[:, None] < T, other=0.0,
    ).to(COMPUTE_DTYPE)

    # m_i starts at a large finite negative number rather than -inf: a padding row only ever sees -inf
    # scores, and exp2(-inf - m_i) must give 0, not exp2(-inf + inf) = NaN.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # key blocks entirely before start[b] hold only padding: begin at the block containing start[b]
    lo = (start_b // BLOCK_N) * BLOCK_N
    # stage 1: key blocks left of this query block (m0 is a multiple of BLOCK_N): no causal mask needed
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, start_b, lo, m0, T, qk_scale,
        BLOCK_N, False, COMPUTE_DTYPE, PRECISION,
    )
    # stage 2: key blocks overlapping the query block, up to the last key a row of it can see
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_head, V_head, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, offs_d, start_b, tl.maximum(lo, m0), tl.minimum(m0 + BLOCK_M, T), T, qk_scale,
        BLOCK_N, True, COMPUTE_DTYPE, PRECISION,
    )

    # normalise: O_i = acc_i / l_i. Padding rows have l_i = 0 and acc_i = 0: divide by 1, store exact zeros.
    real_row = offs_m >= start_b
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    acc = tl.where(real_row[:, None], acc, 0.0)
    # LSE_i (base 2) = m_i + log2(l_i). For padding rows any finite value does (backward masks their P to
    # 0 whatever it is); 0 keeps it finite.
    lse = tl.where(real_row, m_i + tl.math.log2(l_safe), 0.0)
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)
    tl.store(
        O_head + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :] * stride_od,
        acc.to(O.dtype.element_ty), mask=offs_m[:, None] < T,
    )


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """grid = (cdiv(T, BLOCK_M), B * H). Delta_i = sum_d O_id dO_id in fp32, stored (B, H, T)."""
    # Why Delta: the softmax Jacobian gives dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik), and
    # sum_k P_ik dP_ik = sum_k P_ik (dO_i . v_k) = dO_i . (sum_k P_ik v_k) = dO_i . O_i.
    # So the row sum over all T keys is one hd-long dot product per row, computed once here instead of
    # inside every (query block, key block) pair of the two kernels below.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row = offs_m[:, None].to(tl.int64)
    o = tl.load(
        O + off_b * stride_ob + off_h * stride_oh + row * stride_ot + offs_d[None, :] * stride_od,
        mask=offs_m[:, None] < T, other=0.0,
    ).to(tl.float32)
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + row * stride_dot + offs_d[None, :] * stride_dod,
        mask=offs_m[:, None] < T, other=0.0,
    ).to(tl.float32)
    # padding rows: O = 0, so Delta = 0 (and their P is 0 anyway)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, START,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, H_KV, T, GROUP, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_START: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """grid = (cdiv(T, BLOCK_N), B * H_kv). dK, dV for BLOCK_N keys of one KV head, summed over its GROUP
    query heads: dV_j = sum_{h, i} P_ij dO_i,  dK_j = sm_scale sum_{h, i} dS_ij q_i."""
    # GQA: a KV head is read by GROUP query heads, so its gradient is the sum of their contributions. Looping
    # over the group inside the program (rather than one program per query head adding into dK/dV) keeps
    # the sum in fp32 registers: no atomics, no (B, H, T, hd) buffer of per-head partials, deterministic.
    pid_n = tl.program_id(0)
    pid_bhkv = tl.program_id(1)
    off_b = (pid_bhkv // H_KV).to(tl.int64)
    off_hkv = (pid_bhkv % H_KV).to(tl.int64)

    start_b = 0
    if HAS_START:
        start_b = tl.load(START + off_b).to(tl.int32)

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # this program's K and V tiles (BLOCK_N, hd) stay in registers for the whole loop
    k = tl.load(
        K + off_b * stride_kb + off_hkv * stride_kh
        + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
        mask=offs_n[:, None] < T, other=0.0,
    ).to(COMPUTE_DTYPE)
    v = tl.load(
        V + off_b * stride_vb + off_hkv * stride_vh
        + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :] * stride_vd,
        mask=offs_n[:, None] < T, other=0.0,
    ).to(COMPUTE_DTYPE)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # The queries that see these keys satisfy i >= j >= n0 (causal) and i >= start[b] (real rows): start at
    # the BLOCK_M-aligned block containing max(n0, start[b]). If every key here is padding
    # (n0 + BLOCK_N <= start[b]) nothing flows into them: empty loop, dK = dV = 0.
    lo = (tl.maximum(n0, start_b) // BLOCK_M) * BLOCK_M
    hi = tl.where(n0 + BLOCK_N > start_b, T, lo)
    for g in range(0, GROUP):
        off_h = off_hkv * GROUP + g  # query head g of this KV group
        Q_head = Q + off_b * stride_qb + off_h * stride_qh
        DO_head = DO + off_b * stride_dob + off_h * stride_doh
        row0 = (off_b * H + off_h) * T  # offset of this (b, h) in the (B, H, T) LSE and Delta
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = tl.load(
                Q_head + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :] * stride_qd,
                mask=offs_m[:, None] < T, other=0.0,
            ).to(COMPUTE_DTYPE)
            do = tl.load(
                DO_head + offs_m[:, None].to(tl.int64) * stride_dot + offs_d[None, :] * stride_dod,
                mask=offs_m[:, None] < T, other=0.0,
            ).to(COMPUTE_DTYPE)
            lse = tl.load(LSE + row0 + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(DELTA + row0 + offs_m, mask=offs_m < T, other=0.0)
            # recompute P_ij = exp2(S_ij * log2 e - LSE2_i) from the saved base-2 log-sum-exp: the same
            # tiles of Q K^T as the forward, so P is the forward's softmax without ever being stored
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
            p = tl.math.exp2(qk - lse[:, None])
            # visible iff start[b] <= j <= i < T (i >= start[b] follows); rows beyond T read q = 0, LSE = 0
            # and would give p = 1, so the i < T term matters
            visible = (
                (offs_m[:, None] >= offs_n[None, :]) & (offs_n[None, :] >= start_b) & (offs_m[:, None] < T)
            )
            p = tl.where(visible, p, 0.0)
            # dV += P^T dO   (BLOCK_N, hd)
            dv = tl.dot(tl.trans(p.to(COMPUTE_DTYPE)), do, acc=dv, input_precision=PRECISION)
            # dP = dO V^T (the gradient reaching P through O = P V), then the softmax Jacobian:
            # dS = P * (dP - Delta)   (BLOCK_M, BLOCK_N); masked entries stay 0 because p = 0 there
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            # dK += dS^T Q   (BLOCK_N, hd); the sm_scale of S = sm_scale Q K^T is applied once at the end
            dk = tl.dot(tl.trans(ds.to(COMPUTE_DTYPE)), q, acc=dk, input_precision=PRECISION)
    dk = dk * sm_scale  # S = sm_scale Q K^T  =>  dK = sm_scale dS^T Q

    # keys past T are not stored; padding keys (j < start[b]) store the exact zeros they accumulated
    mask_n = offs_n[:, None] < T
    tl.store(
        DK + off_b * stride_dkb + off_hkv * stride_dkh
        + offs_n[:, None].to(tl.int64) * stride_dkt + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty), mask=mask_n,
    )
    tl.store(
        DV + off_b * stride_dvb + off_hkv * stride_dvh
        + offs_n[:, None].to(tl.int64) * stride_dvt + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty), mask=mask_n,
    )


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, START,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, GROUP, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_START: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """grid = (cdiv(T, BLOCK_M), B * H). dQ_i = sm_scale sum_j dS_ij k_j for BLOCK_M query rows."""
    # A separate kernel from dK/dV (FA-2): dQ sums over keys, dK/dV over queries, so each kernel owns the
    # rows it accumulates and none needs atomics. The price is recomputing Q K^T and dO V^T twice.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // GROUP
    K_head = K + off_b * stride_kb + off_hkv * stride_kh
    V_head = V + off_b * stride_vb + off_hkv * stride_vh

    start_b = 0
    if HAS_START:
        start_b = tl.load(START + off_b).to(tl.int32)

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row = offs_m[:, None].to(tl.int64)
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + row * stride_qt + offs_d[None, :] * stride_qd,
        mask=offs_m[:, None] < T, other=0.0,
    ).to(COMPUTE_DTYPE)
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + row * stride_dot + offs_d[None, :] * stride_dod,
        mask=offs_m[:, None] < T, other=0.0,
    ).to(COMPUTE_DTYPE)
    # this query block's saved row statistics: base-2 LSE from the forward, Delta from the preprocess
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # keys from the block containing start[b] up to the last key this query block sees; for a block of
    # padding rows (m0 + BLOCK_M <= start[b]) lo >= hi and the loop is empty: dQ = 0
    lo = (start_b // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M, T)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(
            K_head + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
            mask=offs_n[:, None] < T, other=0.0,
        ).to(COMPUTE_DTYPE)
        v = tl.load(
            V_head + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :] * stride_vd,
            mask=offs_n[:, None] < T, other=0.0,
        ).to(COMPUTE_DTYPE)
        # P recomputed as in _attn_bwd_dkdv (same tiles of Q K^T, same saved LSE)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk - lse[:, None])
        # visible iff start[b] <= j <= i; rows i >= T are computed but never stored
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= start_b)
        p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # dP = dO V^T
        ds = p * (dp - delta[:, None])  # dS = P * (dP - Delta)
        dq = tl.dot(ds.to(COMPUTE_DTYPE), k, acc=dq, input_precision=PRECISION)  # dQ += dS K
    dq = dq * sm_scale  # S = sm_scale Q K^T  =>  dQ = sm_scale dS K

    # padding rows (i < start[b]) store the exact zeros they accumulated (every P_ij was masked to 0)
    tl.store(
        DQ + off_b * stride_dqb + off_h * stride_dqh + row * stride_dqt + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < T,
    )


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------
_LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2 e)


def _configs(hd: int, dtype: torch.dtype, on_gpu: bool) -> dict:
    """Block sizes and launch settings.

    GPU: chosen by compiling for sm_90 without a GPU (python -m kernels.aot_check) among the Triton
    tutorial's Hopper configs, keeping those without register spills; not timed on a GPU. fp32
    (exact 'ieee' products, no tensor cores) is a correctness path with small tiles; it still spills at hd=128.
    Interpreter: the smallest tiles tl.dot accepts (16), with BLOCK_M != BLOCK_N in each kernel so the tests
    exercise unequal tiles and several blocks at small T.
    """
    if on_gpu and dtype != torch.float32:
        return dict(
            fwd=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
            dkdv=dict(BLOCK_M=32, BLOCK_N=128 if hd <= 64 else 64, num_warps=8, num_stages=3),
            dq=dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3) if hd <= 64
            else dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
            pre=dict(BLOCK_M=32, num_warps=4),
        )
    if on_gpu:
        return dict(
            fwd=dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2),
            dkdv=dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2),
            dq=dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2),
            pre=dict(BLOCK_M=32, num_warps=4),
        )
    return dict(
        fwd=dict(BLOCK_M=32, BLOCK_N=16),
        dkdv=dict(BLOCK_M=16, BLOCK_N=32),
        dq=dict(BLOCK_M=32, BLOCK_N=16),
        pre=dict(BLOCK_M=32),
    )


def _compute_types(dtype: torch.dtype, on_gpu: bool):
    """(dtype fed to tl.dot, its input_precision).

    GPU: the input dtype (fp16/bf16 tensor cores; fp32 with exact 'ieee' products, not TF32).
    Interpreter: always fp32, because bf16 arithmetic is wrong there; fp16/bf16 inputs are upcast on load.
    """
    if not on_gpu or dtype == torch.float32:
        return tl.float32, "ieee"
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], "tf32"


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor | None) -> None:
    B, H, T, hd = q.shape
    assert k.dim() == 4 and k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} must match"
    assert k.shape[0] == B and k.shape[2] == T and k.shape[3] == hd, (
        f"k/v (B, H_kv, T, hd) = {tuple(k.shape)} does not fit q (B, H, T, hd) = {tuple(q.shape)}"
    )
    assert H % k.shape[1] == 0, f"H={H} must be a multiple of H_kv={k.shape[1]}"
    assert hd in (16, 32, 64, 128), f"head dim {hd} not supported by the Triton kernel (16, 32, 64, 128)"
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), f"dtype {q.dtype} not supported"
    assert k.dtype == q.dtype and v.dtype == q.dtype, "q, k, v must share a dtype"
    assert start is None or start.shape == (B,), f"start must be (B,) = ({B},), got {tuple(start.shape)}"


def _attn_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor | None, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel; returns o (B, H, T, hd) and the base-2 row log-sum-exp (B, H, T) fp32."""
    KERNEL_CALLS["attention_fwd"] += 1
    B, H, T, hd = q.shape
    on_gpu = q.is_cuda
    cfg = _configs(hd, q.dtype, on_gpu)["fwd"]
    assert cfg["BLOCK_M"] % cfg["BLOCK_N"] == 0  # stage 1 ends at m0, which must be a key-block boundary
    compute_dtype, precision = _compute_types(q.dtype, on_gpu)
    # o is laid out (B, T, H, hd) and returned as its (B, H, T, hd) view: the model's next step,
    # o.transpose(1, 2).reshape(B, T, H * hd), is then free of a copy.
    o = torch.empty(B, T, H, hd, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, H, T, hd)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
    _attn_fwd[grid](
        q, k, v, o, lse, start if start is not None else lse,  # START is not read when HAS_START is False
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        H, T, H // k.shape[1], sm_scale * _LOG2E,
        HEAD_DIM=hd, HAS_START=start is not None, COMPUTE_DTYPE=compute_dtype, PRECISION=precision, **cfg,
    )
    return o, lse


def _attn_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    start: torch.Tensor | None,
    sm_scale: float,
    need_dq: bool = True,
    need_dkdv: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward kernels; returns dq, dk, dv in the dtypes, shapes and memory layouts of q, k, v
    (None for a gradient not needed). dq laid out like q means that, for q = x.transpose(1, 2), the
    gradient reaching x is contiguous without a copy."""
    KERNEL_CALLS["attention_bwd"] += 1
    B, H, T, hd = q.shape
    H_kv = k.shape[1]
    on_gpu = q.is_cuda
    cfgs = _configs(hd, q.dtype, on_gpu)
    compute_dtype, precision = _compute_types(q.dtype, on_gpu)
    has_start = start is not None
    start_arg = start if has_start else lse  # not read when HAS_START is False

    # 1. Delta = rowsum(O * dO)   (B, H, T) fp32
    delta = torch.empty_like(lse)
    cfg = cfgs["pre"]
    _attn_bwd_preprocess[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, T, HEAD_DIM=hd, **cfg,
    )
    # 2. dK, dV, one program per key block and KV head (empty_like keeps the strides of a dense view)
    dq = dk = dv = None
    if need_dkdv:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        cfg = cfgs["dkdv"]
        _attn_bwd_dkdv[(triton.cdiv(T, cfg["BLOCK_N"]), B * H_kv)](
            q, k, v, do, dk, dv, lse, delta, start_arg,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            H, H_kv, T, H // H_kv, sm_scale, sm_scale * _LOG2E,
            HEAD_DIM=hd, HAS_START=has_start, COMPUTE_DTYPE=compute_dtype, PRECISION=precision, **cfg,
        )
    # 3. dQ, one program per query block and query head
    if need_dq:
        dq = torch.empty_like(q)
        cfg = cfgs["dq"]
        _attn_bwd_dq[(triton.cdiv(T, cfg["BLOCK_M"]), B * H)](
            q, k, v, do, dq, lse, delta, start_arg,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, T, H // H_kv, sm_scale, sm_scale * _LOG2E,
            HEAD_DIM=hd, HAS_START=has_start, COMPUTE_DTYPE=compute_dtype, PRECISION=precision, **cfg,
        )
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, start, sm_scale):
        o, lse = _attn_forward(q, k, v, start, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, start)
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, start = ctx.saved_tensors
        need_dq, need_dk, need_dv = ctx.needs_input_grad[:3]
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, start, ctx.sm_scale, need_dq, need_dk or need_dv)
        return dq, dk, dv, None, None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: torch.Tensor | None = None,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention over T positions with GQA and left padding; differentiable in q, k, v.

    q: (B, H, T, hd); k, v: (B, H_kv, T, hd), H % H_kv == 0; any strides (e.g. q from (B, T, H, hd) by
    .transpose(1, 2)). start: None or (B,) integer tensor, the first real position of each row. sm_scale:
    default 1/sqrt(hd). Returns o (B, H, T, hd) in q's dtype (a transposed view of a (B, T, H, hd) buffer on
    the Triton path). Triton when use_triton(q), else attention_ref.
    """
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    if not use_triton(q):
        return attention_ref(q, k, v, start, sm_scale)
    _check(q, k, v, start)
    if start is not None:
        start = start.to(device=q.device, dtype=torch.int64).contiguous()
    return _Attention.apply(q, k, v, start, sm_scale)
