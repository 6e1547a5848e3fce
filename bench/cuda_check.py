"""Model-level correctness on a GPU: what the kernel tests (tests/test_kernels_*.py) cannot see on a CPU.

    PYTHONPATH=. python3 bench/cuda_check.py          # on a lent GPU; exits 1 on a mismatch

Random weights of the SmolLM2-135M shape (the real weights cannot travel to the device machine), fresh
random inputs per check, TF32 off so that fp32 means fp32. Each check prints ||got - want|| / ||want||
(over the real, unpadded positions) against a bound that follows from the arithmetic:
1. The whole model's logits, fp32, left-padded batch: attention "triton" and "sdpa" vs "naive" (fp32
   scores, materialised softmax). Bound 1e-4: fp32 with different summation orders over D = 576 and
   T <= 300 keys, through 30 layers.
2. The same forward + backward: gradients of the loss sum(logp of the next token) w.r.t. every
   parameter, triton vs naive, bound 1e-3 (backward sums over B*T rows).
3. bf16 (weights and activations): logits vs the fp32 forward of the same weights, bound 5e-2 (bf16
   keeps 8 bits: u = 2^-8 = 3.9e-3 per rounding, ~sqrt(30 layers x a few roundings each) ~ 10 u; the CPU
   dry run gives 1.3e-2).
4. Fused log-probs (kernels.token_logprobs, Triton on CUDA) vs log_softmax of the model's logits, fp32.
5. Generation: greedy tokens of the eager decode vs the compiled decode step (torch.compile
   "reduce-overhead": a CUDA graph per step), fp32, identical ids required except where the top-2
   logits are closer than 1e-4 (a tie that rounding may break either way).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import token_logprobs  # noqa: E402
from models.generation import SamplingParams, generate  # noqa: E402
from models.llama import ModelArgs, Transformer  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
# On a CPU the script runs as a dry run of its own logic (Triton calls fall back to the torch references).
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RESULTS: list[tuple[str, float, float]] = []


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite output"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def check(name: str, err: float, bound: float) -> None:
    RESULTS.append((name, err, bound))
    print(f"{'ok ' if err <= bound else 'BAD'} {name}: {err:.2e} (bound {bound:.0e})", flush=True)


def model(seed: int, attn: str, dtype=torch.float32) -> Transformer:
    torch.manual_seed(seed)
    with torch.device(DEV):
        m = Transformer(ModelArgs.preset("smollm2-135m", attn_impl=attn))
    with torch.no_grad():
        m.tok_embeddings.weight.mul_(0.02)
    return m.to(dtype)


def batch(seed: int, B: int = 4, T: int = 300):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(100, 40000, (B, T), generator=g).to(DEV)
    start = torch.tensor([0, 7, 150, T - 3][:B]).to(DEV)                       # left padding per row
    real = (torch.arange(T, device=DEV)[None, :] >= start[:, None])          # (B, T)
    return tokens, start, real


def main() -> int:
    print(torch.cuda.get_device_name() if DEV.type == "cuda" else "CPU dry run", torch.__version__, flush=True)
    tokens, start, real = batch(1)
    ref = model(0, "naive")
    with torch.no_grad():
        want = ref(tokens, start=start)[real]
    for attn in ("sdpa", "triton"):
        ref.set_attn_impl(attn)
        with torch.no_grad():
            check(f"1. logits fp32, attention {attn} vs naive", rel(ref(tokens, start=start)[real], want), 1e-4)

    # 2. gradients through the whole model, triton vs naive
    def grads(attn: str) -> list[torch.Tensor]:
        ref.set_attn_impl(attn)
        ref.zero_grad(set_to_none=True)
        h = ref(tokens, start=start, return_hidden=True)[:, :-1]                 # (B, T-1, D)
        m = real[:, :-1] & real[:, 1:]
        logp = token_logprobs(h, ref.output_weight, tokens[:, 1:], 1.0, m)
        logp.sum().backward()
        return [p.grad.clone() for p in ref.parameters()]
    g_naive = grads("naive")
    g_tri = grads("triton")
    check("2. parameter gradients fp32, triton vs naive",
          rel(torch.cat([g.flatten() for g in g_tri]), torch.cat([g.flatten() for g in g_naive])), 1e-3)

    # 3. bf16 forward vs fp32 forward of the same weights
    tokens, start, real = batch(2)
    ref.set_attn_impl("sdpa")
    with torch.no_grad():
        want = ref(tokens, start=start)[real]
        low = model(0, "triton", torch.bfloat16)
        check("3. logits bf16 (triton attention) vs fp32", rel(low(tokens, start=start)[real].float(), want), 5e-2)
        del low

    # 4. fused log-probs vs log_softmax of the logits, fp32
    with torch.no_grad():
        h = ref(tokens, start=start, return_hidden=True)[:, :-1]
        m = real[:, :-1] & real[:, 1:]
        got = token_logprobs(h, ref.output_weight, tokens[:, 1:], 0.7, m)[m]
        lp = (ref.logits(h).float() / 0.7).log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)[m]
        check("4. token_logprobs (Triton) vs log_softmax, fp32, T=0.7", rel(got, lp), 1e-5)

    # 5. eager vs compiled (CUDA-graph) greedy decoding
    prompts = [tokens[b, start[b]:].tolist()[:40] for b in range(4)]
    params = SamplingParams(max_new_tokens=48, temperature=0)
    eager = generate(ref, prompts, params, stop_ids=[], pad_id=0, compile=False)
    comp = generate(ref, prompts, params, stop_ids=[], pad_id=0, compile=True)
    comp = generate(ref, prompts, params, stop_ids=[], pad_id=0, compile=True)     # the replayed graph
    same = eager.tokens == comp.tokens
    first = [int((~row).nonzero()[0]) if not row.all() else None for row in same]
    ties = 0
    with torch.no_grad():
        for b, t in enumerate(first):
            if t is None:
                continue
            h = ref(eager.sequences[b:b + 1, :eager.prompt_len + t], start=eager.start[b:b + 1], return_hidden=True)
            top2 = ref.logits(h[:, -1]).float().topk(2).values[0]
            ties += int((top2[0] - top2[1]).abs().item() < 1e-4)
    diverged = sum(t is not None for t in first)
    check(f"5. compiled vs eager greedy decoding: rows diverging at a non-tie ({diverged} diverge, {ties} at ties)",
          float(diverged - ties), 0.0)

    bad = [r for r in RESULTS if not r[1] <= r[2]]
    print(f"{len(RESULTS) - len(bad)}/{len(RESULTS)} checks passed", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
