"""Batched generation on the static KV cache: the engine behind generate.py, pair simulation and PPO
rollouts.

A batch of prompts of different lengths is left-padded to T_p columns, so every row's response starts
at the same column T_p and the whole batch decodes in lock-step: one prefill over (B, T_p), then one
(B, 1) step per new token. Logits are only ever computed for the last position of each step, never
as a (B, T, V) tensor. Sampling uses the exponential-race trick (argmax of p / Exp(1) noise), which
draws from p without a host round trip; the loop checks for "all rows stopped" only every
`sync_every` steps, the one host synchronisation that stopping needs.

Shapes: B rows, T_p prompt columns (left-padded), T_n new tokens, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.llama import Transformer


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0          # 0 means greedy
    top_k: int = 0                    # 0 disables
    top_p: float = 1.0                # 1.0 disables


@dataclass
class Generation:
    sequences: Tensor        # (B, T_p + T_n) left-padded prompt then response, pad after a stop
    start: Tensor            # (B,) first real column of each row
    prompt_len: int          # T_p: responses start at this column
    tokens: Tensor           # (B, T_n) response ids; the stop token is kept, pad_id after it
    lengths: Tensor          # (B,) response length, stop token included
    finished: Tensor         # (B,) True if the row ended with a stop token
    logprobs: Tensor | None  # (B, T_n) fp32 log p(token) under softmax(logits / temperature), 0 on pad;
                             # None from generate(..., logprobs=False)

    @property
    def response_mask(self) -> Tensor:
        """(B, T_n) True on the response tokens (stop token included), False on padding."""
        T_n = self.tokens.shape[1]
        return torch.arange(T_n, device=self.tokens.device)[None, :] < self.lengths[:, None]


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Token lists -> (B, T_p) left-padded ids and (B,) first real column."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    T_p = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T_p), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T_p - len(p):] = torch.tensor(p, dtype=torch.long)
    start = torch.tensor([T_p - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), start.to(device)


# Candidates tried before a full sort of the vocabulary in the nucleus (top-p) filter.
NUCLEUS_CANDIDATES = 256


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability
    reaches top_p (the nucleus). logits: (B, V) fp32, already divided by the temperature."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]             # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = nucleus(logits, top_p)
    return logits


def nucleus(logits: Tensor, top_p: float) -> Tensor:
    """The top-p filter: a token is dropped when the tokens ranked before it already reach top_p (the
    first always stays). Ranking the whole vocabulary is a sort of (B, V), 200 ms a step at (32, 151936)
    on 2 CPU cores; there the nucleus almost always lies within the top NUCLEUS_CANDIDATES tokens, so
    those are ranked first (topk, ~8 ms) and the full sort runs only when some row's candidates fall
    short of top_p. That check is a host sync, so on an accelerator, where the sort is cheap and a sync
    per step is not, the vocabulary is always sorted. Both give the nucleus; they may differ at its edge,
    where tied logits (common when the logits come from bf16) are ordered differently by topk and sort,
    and in the rounding of the probabilities."""
    lse = logits.logsumexp(dim=-1, keepdim=True)                            # (B, 1)
    vals = None
    if logits.device.type == "cpu" and NUCLEUS_CANDIDATES < logits.shape[-1]:
        vals, idx = torch.topk(logits, NUCLEUS_CANDIDATES, dim=-1)          # (B, k), descending
        probs = (vals - lse).exp()
        cum = probs.cumsum(dim=-1)
        if not bool((cum[:, -1] >= top_p).all()):                           # a nucleus reaches past them
            vals = None
    if vals is None:
        vals, idx = torch.sort(logits, dim=-1, descending=True)             # (B, V)
        probs = (vals - lse).exp()
        cum = probs.cumsum(dim=-1)
    before = cum - probs
    kept = vals.masked_fill(before >= top_p, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, idx, kept)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
           logprobs: bool = True) -> tuple[Tensor, Tensor | None]:
    """One token per row from (B, V) fp32 logits. Returns ids (B,) and, with `logprobs`, their log-probs
    (B,) under softmax(logits / temperature): the full tempered distribution, which is what PPO
    recomputes (exactly the sampling distribution when top_k = 0 and top_p = 1); else None, which saves
    a (B, V) log-softmax per step. The ids do not depend on `logprobs` (it draws no random numbers)."""
    if params.temperature <= 0:
        ids = logits.argmax(dim=-1)
        return ids, torch.zeros(ids.shape, device=logits.device) if logprobs else None
    scaled = logits / params.temperature
    probs = filter_logits(scaled, params.top_k, params.top_p).softmax(dim=-1)
    # Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p, with no host sync.
    # E = -log U with U ~ Uniform[0, 1): the same Exp(1) noise as Tensor.exponential_, ~6x cheaper on
    # CPU at (16, 49152); U = 0 gives E = inf, i.e. p / E = 0, a token that cannot win the race.
    noise = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
    ids = (probs / noise).argmax(dim=-1)                                     # (B,)
    if not logprobs:
        return ids, None
    return ids, scaled.log_softmax(dim=-1).gather(-1, ids[:, None]).squeeze(-1)   # (B, V) -> (B,)


def compiled_decode_step(model: Transformer):
    """torch.compile of one decoding step, (B, 1) ids -> (B, V) fp32 logits, built once per model.

    It runs the model's static-shape path (tensor `pos`, whole-cache attention under a mask), so one
    graph serves every step; on CUDA "reduce-overhead" also replays it as a CUDA graph.
    """
    step = getattr(model, "_compiled_decode_step", None)
    if step is None:
        def decode(tok: Tensor, pos: Tensor, start: Tensor) -> Tensor:
            h = model(tok, pos=pos, start=start, return_hidden=True)[:, -1]          # (B, D)
            return model.logits(h).float()                                               # (B, V)
        mode = "reduce-overhead" if model.device.type == "cuda" else None
        step = torch.compile(decode, dynamic=False, mode=mode)
        model._compiled_decode_step = step
    return step


def compile_by_default(device: torch.device) -> bool:
    """Whether `generate` uses the compiled decode step when not told: on CUDA, where eager decoding is
    launch-bound and the step replayed as a CUDA graph is 14.5x faster at batch 1 and 8.7x at batch 64
    (H200, bf16, docs/PERFORMANCE.md); not on a CPU, where it was not faster on the AMD machine and each new
    batch size or cache length costs a compilation of tens of seconds (docs/PERFORMANCE.md)."""
    return device.type == "cuda"


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], params: SamplingParams, stop_ids: list[int],
             pad_id: int, generator: torch.Generator | None = None, sync_every: int | None = None,
             compile: bool | None = None, logprobs: bool = True) -> Generation:
    """Sample continuations of a batch of token-id prompts until a stop token or max_new_tokens.

    logprobs=False leaves Generation.logprobs None and skips a (B, V) log-softmax per step (`sample`);
    the tokens are the same.

    compile=True decodes with `compiled_decode_step` (first call per batch size and cache length pays
    the compilation; the cache length is rounded up to a multiple of 64 to limit recompiles); None
    leaves it to `compile_by_default`.
    """
    device = model.device
    if compile is None:
        compile = compile_by_default(device)
    ids, start = left_pad(prompts, pad_id, device)
    B, T_p = ids.shape
    T_n = params.max_new_tokens
    if T_p + T_n > model.args.max_seq_len:
        raise ValueError(f"a prompt of {T_p} tokens plus max_new_tokens={T_n} exceeds the model's "
                         f"context of {model.args.max_seq_len} tokens")
    cache_len = T_p + T_n
    if compile:
        cache_len = min(-(-cache_len // 64) * 64, model.args.max_seq_len)
        step = compiled_decode_step(model)
    sync_every = sync_every or (1 if device.type == "cpu" else 8)
    stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
    tokens = torch.full((B, T_n), pad_id, dtype=torch.long, device=device)
    lp_all = torch.zeros((B, T_n), dtype=torch.float32, device=device) if logprobs else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lengths = torch.full((B,), T_n, dtype=torch.long, device=device)
    model.setup_cache(B, cache_len)          # also packs the weights for B-row products (CPU fp32)
    try:
        h = model(ids, pos=0, start=start, return_hidden=True)[:, -1]       # (B, D) prefill
        logits = model.logits(h).float()                                     # (B, V)
        for t in range(T_n):
            nxt, lp = sample(logits, params, generator, logprobs)
            nxt = torch.where(done, pad_id, nxt)
            tokens[:, t] = nxt
            if lp_all is not None:
                lp_all[:, t] = torch.where(done, 0.0, lp)
            stopped = ~done & torch.isin(nxt, stops)
            lengths = torch.where(stopped, t + 1, lengths)
            done = done | stopped
            if t == T_n - 1 or ((t + 1) % sync_every == 0 and bool(done.all())):
                tokens = tokens[:, :t + 1]
                lp_all = lp_all[:, :t + 1] if lp_all is not None else None
                break
            if compile:
                pos = torch.full((1,), T_p + t, dtype=torch.long, device=device)
                logits = step(nxt[:, None], pos, start).clone()              # (B, V); clone: graph output
            else:
                h = model(nxt[:, None], pos=T_p + t, start=start, return_hidden=True)[:, -1]  # (B, D)
                logits = model.logits(h).float()                             # (B, V)
    finally:
        model.clear_cache(keep=compile)     # a compiled step keeps its cache buffers for the next call
    return Generation(sequences=torch.cat([ids, tokens], dim=1), start=start, prompt_len=T_p,
                      tokens=tokens, lengths=lengths, finished=done, logprobs=lp_all)


def generate_texts(model: Transformer, tokenizer, prompts: list[str], params: SamplingParams,
                   batch_size: int = 8, seed: int | None = None, progress: bool = True,
                   compile: bool | None = None) -> list[dict]:
    """Generate for many text prompts in batches (sorted by length to waste little padding).

    Returns one dict per prompt, in the input order: {"text", "token_ids", "finished"}; the text has
    the stop token removed.
    """
    from tqdm import tqdm

    encoded = [tokenizer.encode(p) for p in prompts]
    for i, e in enumerate(encoded):
        if len(e) + params.max_new_tokens > model.args.max_seq_len:
            raise ValueError(f"prompt {i} has {len(e)} tokens; with max_new_tokens="
                             f"{params.max_new_tokens} it exceeds the context of {model.args.max_seq_len}")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=model.device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[dict | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", unit="seq", disable=not progress, leave=False)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        out = generate(model, [encoded[i] for i in idx], params, tokenizer.stop_ids, tokenizer.pad_id, gen,
                       compile=compile, logprobs=False)
        toks, lens, fin = out.tokens.tolist(), out.lengths.tolist(), out.finished.tolist()
        for j, i in enumerate(idx):
            ids = toks[j][:lens[j] - (1 if fin[j] else 0)]
            results[i] = {"text": tokenizer.decode(ids), "token_ids": ids, "finished": fin[j]}
        bar.update(len(idx))
    bar.close()
    return results  # type: ignore[return-value]
