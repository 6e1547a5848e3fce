"""A LLaMA-family decoder, written out in one file: LLaMA and Qwen2 (LLaMA plus a bias on the q, k and v
projections, `qkv_bias`; `model_type` says which Hugging Face family a checkpoint is written as).

Dimension letters used throughout:
  B batch, T tokens in this call, L cache length (columns of the KV cache), D model width,
  H query heads, H_kv key/value heads, hd head dim, F FFN width, V vocabulary.

Batches are left-padded: row b's real tokens start at column `start[b]` and every row ends at the same
column, so all rows decode in lock-step. A token's RoPE position is its column minus `start[b]`, and
padded keys are masked out of attention. Padding on the right (after a response ended) needs nothing:
causal attention never looks forward, and losses mask those positions.

Attention (`attend`): `naive` (fp32 reference), `sdpa` (torch's, the default) or `triton` (kernels/attention.py,
prefill and training); a bf16 decoding step on a CPU takes the fp32 reference (`attend_fp32`), several times
faster there than torch's CPU SDPA in bf16.

Parameter names are this file's own (`tok_embeddings`, `layers.0.attention.wq`, ...); the one place
that maps them to Hugging Face's names is `models/checkpoint.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models import packed as pk

ATTN_IMPLS = ("naive", "sdpa", "triton")
MODEL_TYPES = ("llama", "qwen2")


@dataclass
class ModelArgs:
    dim: int = 576                     # D, residual stream width
    n_layers: int = 30
    n_heads: int = 9                   # H
    n_kv_heads: int = 3                # H_kv; must divide H (grouped-query attention)
    vocab_size: int = 49152            # V
    hidden_dim: int = 1536             # F, SwiGLU inner width
    head_dim: int = 0                  # hd; 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None   # Llama-3 style {"rope_type": "llama3", "factor", ...} or None
    max_seq_len: int = 8192
    tie_embeddings: bool = True        # output head shares the token embedding matrix
    qkv_bias: bool = False             # q, k and v projections carry a bias (Qwen2)
    model_type: str = "llama"          # one of MODEL_TYPES: the Hugging Face family of config.json
    attn_impl: str = "sdpa"            # one of ATTN_IMPLS

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        # The family fixes the bias: Hugging Face's Qwen2 layers always have q/k/v biases, and its
        # LLaMA layers have none (LLaMA's attention_bias=true would also bias o_proj, which we lack).
        if self.qkv_bias != (self.model_type == "qwen2"):
            raise ValueError(f"qkv_bias={self.qkv_bias} does not fit model_type={self.model_type!r} "
                             f"(qwen2 has q/k/v biases, llama has none)")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelArgs":
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # SmolLM2-135M(-Instruct): the default model (fetched and converted by models/smollm2.py).
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                         hidden_dim=1536, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),
    # Qwen2.5(-Coder)-0.5B/1.5B(-Instruct), with the untied head of the PyPI GGUFs (models/qwen2.py).
    "qwen2.5-0.5b": dict(dim=896, n_layers=24, n_heads=14, n_kv_heads=2, vocab_size=151936,
                         hidden_dim=4864, norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768,
                         tie_embeddings=False, qkv_bias=True, model_type="qwen2"),
    "qwen2.5-1.5b": dict(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, vocab_size=151936,
                         hidden_dim=8960, norm_eps=1e-6, rope_theta=1e6, max_seq_len=32768,
                         tie_embeddings=False, qkv_bias=True, model_type="qwen2"),
    # For tests: a few thousand parameters, GQA ratio 2.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, hidden_dim=128,
                 rope_theta=10000.0, max_seq_len=256, tie_embeddings=True),
    # The tiny one as Qwen2: q/k/v biases, untied head, Qwen's RoPE base and RMSNorm eps.
    "tiny-qwen2": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, hidden_dim=128,
                       norm_eps=1e-6, rope_theta=1e6, max_seq_len=256, tie_embeddings=False,
                       qkv_bias=True, model_type="qwen2"),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the activation dtype (bf16's 8-bit mantissa loses the mean square),
        # cast back, then scale: the same order as the Hugging Face reference, so logits match to 1e-4.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse frequencies theta^(-2i/hd), i < hd/2, with the optional Llama-3 long-context scaling."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))  # (hd/2,)
    rs = args.rope_scaling
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        # Llama 3.1: wavelengths longer than old_ctx/low_freq_factor are slowed down by `factor`,
        # those shorter than old_ctx/high_freq_factor are kept, and the band between is interpolated.
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_ctx = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_ctx / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling {rs!r} (supported: none, 'llama3')")
    return inv_freq.float()


def rotate_half(x: Tensor) -> Tensor:
    # Hugging Face convention: the head dim is [x1 | x2] halves, rotated as (-x2, x1).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (B, n, T, hd); cos, sin: (B, 1, T, hd) in the weights' dtype. Under autocast x is bf16 while an
    # fp32 model's cos/sin are fp32: the rotation is computed in fp32 and returned in x's dtype, so q and
    # k keep v's dtype (the fused attention kernel takes one dtype; SDPA would cast them back anyway).
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def attention_mask(start: Tensor | None, q_cols: Tensor, L: int) -> Tensor:
    """Boolean (B or 1, 1, T, L) mask: query at column i sees key j iff start <= j <= i.

    A padded query (i < start) would see no key at all and SDPA would return NaN, so it is allowed to
    see itself; its output is zeroed afterwards and never used.
    """
    k_cols = torch.arange(L, device=q_cols.device)
    causal = k_cols[None, :] <= q_cols[:, None]                              # (T, L)
    if start is None:
        return causal[None, None]
    real_key = k_cols[None, None, :] >= start[:, None, None]                 # (B, 1, L)
    self_key = k_cols[None, None, :] == q_cols[None, :, None]                # (1, T, L)
    return (causal[None] & (real_key | self_key))[:, None]                   # (B, 1, T, L)


class Linear(nn.Linear):
    """An nn.Linear (bias-free unless asked) that decoding on CPU can route through an MKL-packed copy
    of its weight (models/packed.py); `packed` is set by `Transformer.setup_cache` and is never part of
    the state. Only the weight is packed; the bias is added by the same call on every path."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.packed: pk.Packed | None = None

    def forward(self, x: Tensor) -> Tensor:
        return pk.linear(x, self.weight, self.packed, self.bias)


class KVCache(nn.Module):
    """Static, pre-allocated keys and values for one layer: (B, H_kv, L, hd) each."""

    def __init__(self, batch: int, n_kv_heads: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        T = k.shape[2]
        if isinstance(pos, Tensor):
            # Static shapes (for torch.compile / CUDA graphs): write columns pos + [0, T) in place and
            # return the whole cache; the attention mask hides the columns not written yet.
            cols = pos + torch.arange(T, device=pos.device)
            self.k.index_copy_(2, cols, k)
            self.v.index_copy_(2, cols, v)
            return self.k, self.v
        # Write columns [pos, pos+T) and return the filled prefix [0, pos+T): (B, H_kv, pos+T, hd).
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, H_kv, hd, D = args.n_heads, args.n_kv_heads, args.head_dim, args.dim
        # q, k and v projections stacked into one matrix, rows [q | k | v]: one GEMM instead of three,
        # which matters when decoding one token at a time is bound by per-call overhead. Qwen2's biases
        # stack the same way, [b_q | b_k | b_v], and are added before RoPE as in Hugging Face's Qwen2.
        self.wqkv = Linear(D, (H + 2 * H_kv) * hd, bias=args.qkv_bias)
        self.wo = Linear(H * hd, D)
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: int | Tensor, ctx: AttnContext) -> Tensor:
        B, T, _ = x.shape
        H, H_kv, hd = self.args.n_heads, self.args.n_kv_heads, self.args.head_dim
        qkv = self.wqkv(x).view(B, T, H + 2 * H_kv, hd).transpose(1, 2)   # (B, H + 2 H_kv, T, hd)
        qk = apply_rope(qkv[:, :H + H_kv], cos, sin)                      # rotate q and k together
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + H_kv:]                 # (B, H | H_kv | H_kv, T, hd)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)                 # (B, H_kv, L=pos+T, hd)
        y = attend(q, k, v, ctx)                                # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, H * hd)             # (B, T, H*hd)
        return self.wo(y)


def attend(q: Tensor, k: Tensor, v: Tensor, ctx: "AttnContext") -> Tensor:
    """Causal attention of T queries at columns [pos, pos+T) over L = pos+T keys. Returns (B, H, T, hd).

    Padded query rows come out as zeros on every path, so the three implementations agree exactly in
    what they return, not only on the real positions.
    """
    B, H, T, hd = q.shape
    H_kv = k.shape[1]
    if ctx.use_kernel:
        # Prefill and training: the fused kernel takes the left-padding offsets directly and never
        # builds a mask or repeats K/V. Decoding (pos > 0) goes to SDPA below.
        from kernels.attention import attention
        if k.dtype != q.dtype:                                   # an fp32 cache read under autocast
            k, v = k.to(q.dtype), v.to(q.dtype)
        return attention(q, k, v, ctx.start)
    if ctx.impl == "naive":
        mask = ctx.mask if ctx.mask is not None else torch.ones(
            1, 1, T, T, dtype=torch.bool, device=q.device).tril()
        y = attend_fp32(q, k, v, mask)
    elif T == 1 and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        # A decoding step in bf16 on a CPU: torch's CPU SDPA is several times slower than the fp32 products
        # here for one query row (docs/PERFORMANCE.md, bench/bench_attention.py).
        y = attend_fp32(q, k, v, ctx.mask)
    elif ctx.mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=H != H_kv)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=H != H_kv)
    if ctx.q_real is not None:
        y = y * ctx.q_real                                       # zero the padded query rows
    return y


def attend_fp32(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Attention computed in fp32 whatever the inputs' dtype, returned in q's: q (B, H, T, hd) over k, v
    (B, H_kv, L, hd), mask (B or 1, 1, T, L) bool or None. The `naive` reference, and a bf16 decoding step on a
    CPU. The G = H / H_kv query heads that share a key head are one (G * T, hd) matrix against it, so grouped-
    query attention never repeats keys, and a bf16 cache is read once."""
    B, H, T, hd = q.shape
    H_kv, L = k.shape[1], k.shape[2]
    G = H // H_kv
    qg = q.float().reshape(B, H_kv, G * T, hd)                               # rows (g, t) of each key head
    att = (qg @ k.float().transpose(-2, -1)) / math.sqrt(hd)                 # (B, H_kv, G * T, L)
    if mask is not None:
        att = att.view(B, H_kv, G, T, L).masked_fill(~mask.unsqueeze(1), float("-inf")).view(B, H_kv, G * T, L)
    y = att.softmax(dim=-1) @ v.float()                                      # (B, H_kv, G * T, hd)
    return y.to(q.dtype).reshape(B, H, T, hd)


@dataclass
class AttnContext:
    """What every layer's attention needs about this call, computed once per forward."""
    impl: str
    start: Tensor | None          # (B,) first real column of each row, or None
    mask: Tensor | None           # (B or 1, 1, T, L) bool, None for plain causal (T == L, no padding)
    q_real: Tensor | None         # (B, 1, T, 1) 1 on real query rows, 0 on padding; None if all real
    use_kernel: bool              # the fused Triton kernel handles this call

    @classmethod
    def build(cls, impl: str, T: int, pos: int | Tensor, start: Tensor | None, device,
              cache_len: int | None = None) -> "AttnContext":
        if isinstance(pos, Tensor):
            # Static-shape decoding: T queries at columns pos + [0, T) over the whole cache.
            q_cols = pos + torch.arange(T, device=device)
            return cls(impl, start, attention_mask(start, q_cols, cache_len), None, False)
        if impl == "triton" and pos == 0:
            return cls(impl, start, None, None, True)
        if start is None:
            # Without padding only decoding needs a mask: T queries after `pos` cached columns.
            mask = None if pos == 0 else attention_mask(None, torch.arange(pos, pos + T, device=device), pos + T)
            return cls(impl, None, mask, None, False)
        q_cols = torch.arange(pos, pos + T, device=device)
        mask = attention_mask(start, q_cols, pos + T)
        # Queries at columns >= every start are real; only a prefill (pos == 0) can hold padded ones.
        q_real = (q_cols[None, :] >= start[:, None])[:, None, :, None] if pos == 0 else None
        return cls(impl, start, mask, q_real, False)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w13 = Linear(args.dim, 2 * args.hidden_dim)      # [gate | up] stacked
        self.w2 = Linear(args.hidden_dim, args.dim)           # down

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)                           # (B, T, F) each
        return self.w2(F.silu(gate) * up)                                 # SwiGLU


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, pos: int, ctx: AttnContext) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, pos, ctx)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else Linear(args.dim, args.vocab_size)
        self.head_packed: pk.Packed | None = None     # the output head's pack (tied: the embedding's)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.gradient_checkpointing = False
        self.cache_len: int | None = None
        self._kept_cache: list[KVCache] | None = None

    @property
    def output_weight(self) -> Tensor:
        """The (V, D) output head; the token embedding itself when tied."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def logits(self, h: Tensor) -> Tensor:
        """Final hidden states (..., D) -> logits (..., V) in the model's dtype."""
        return pk.linear(h, self.output_weight, self.head_packed)

    def pack_weights(self, rows: int | None) -> None:
        """Pack every matrix for products with `rows` rows (a decoding step's batch), where that pays:
        CPU, fp32, MKL present (see models/packed.py); rows=None drops every pack. `setup_cache` packs
        and `clear_cache` drops, so packs live for one generation call: not every in-place writer bumps
        a weight's version counter (the fused AdamW does not), so a pack kept across training steps
        could not be trusted. For the default model a pack costs ~0.2 s and 760 MB of resident memory
        (540 MB of weights)."""
        for m in self.layers.modules():           # the head (tied or not) is packed once, below
            if isinstance(m, Linear):
                m.packed = None if rows is None else pk.repack(m.packed, m.weight, rows)
        self.head_packed = None if rows is None else pk.repack(self.head_packed, self.output_weight, rows)

    def set_attn_impl(self, impl: str) -> None:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self.args.attn_impl = impl

    def setup_cache(self, batch: int, length: int) -> None:
        """Allocate a static KV cache of `length` columns for `batch` rows (replacing any old one).

        A cache put aside by `clear_cache(keep=True)` with the same shape is reused: its stale columns
        are always masked, and a compiled decode step keeps pointing at the same buffers.
        """
        if length > self.args.max_seq_len:
            raise ValueError(f"a cache of {length} tokens exceeds the model's context of "
                             f"{self.args.max_seq_len}")
        a = self.args
        # Keys and values in the dtype attention computes in: under autocast (an fp32 policy generating
        # its PPO rollouts in bf16) that is the autocast dtype, which SDPA would cast them to anyway and
        # which the fused kernel requires of q, k and v alike (seen on an H200, 2026-11-28).
        dev = self.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.dtype
        kept = self._kept_cache
        if kept is not None and kept[0].k.shape[0] == batch and kept[0].k.shape[2] == length \
                and kept[0].k.dtype == dtype and kept[0].k.device == self.device:
            caches = kept
        else:
            self._kept_cache = None
            caches = [KVCache(batch, a.n_kv_heads, length, a.head_dim, dtype, self.device)
                      for _ in self.layers]
        for layer, cache in zip(self.layers, caches):
            layer.attention.cache = cache
        self.cache_len = length
        self.pack_weights(batch)

    def clear_cache(self, keep: bool = False) -> None:
        """Detach the KV cache (and drop the packed weights), so that later forwards are plain full
        forwards; keep=True puts the cache aside for the next `setup_cache` of the same shape."""
        self._kept_cache = [layer.attention.cache for layer in self.layers] if keep else None
        for layer in self.layers:
            layer.attention.cache = None
        self.cache_len = None
        self.pack_weights(None)

    def rope(self, T: int, pos: int | Tensor, start: Tensor | None) -> tuple[Tensor, Tensor]:
        # Each token's position is its column minus the row's left padding: (B or 1, 1, T, hd).
        cols = pos + torch.arange(T, device=self.device)
        p = cols[None, :] if start is None else (cols[None, :] - start[:, None]).clamp_min(0)
        freqs = p[..., None].float() * self.inv_freq                      # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                  # (B, 1, T, hd)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def forward(self, tokens: Tensor, pos: int | Tensor = 0, start: Tensor | None = None,
                return_hidden: bool = False) -> Tensor:
        """tokens (B, T) at cache columns [pos, pos+T); start (B,) first real column of each row.

        `pos` is normally a Python int. A one-element tensor selects the static-shape decoding path
        (the cache is written in place and attended over its full length under a mask), which
        torch.compile can capture once for every step.

        Returns logits (B, T, V), or with return_hidden the final normed hidden states (B, T, D), which
        the value/reward heads and the fused log-prob kernel (kernels.token_logprobs) consume.
        Without a cache (`setup_cache` not called) pos must be 0 and this is a plain full forward.
        """
        B, T = tokens.shape
        if not isinstance(pos, Tensor) and pos + T > self.args.max_seq_len:
            raise ValueError(f"{pos + T} tokens exceed the model's context of {self.args.max_seq_len}")
        cos, sin = self.rope(T, pos, start)
        ctx = AttnContext.build(self.args.attn_impl, T, pos, start, tokens.device, self.cache_len)
        x = self.tok_embeddings(tokens)                                   # (B, T, D)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, pos, ctx, use_reentrant=False)
            else:
                x = layer(x, cos, sin, pos, ctx)
        h = self.norm(x)                                                  # (B, T, D)
        if return_hidden:
            return h
        return self.logits(h)                                             # (B, T, V)
