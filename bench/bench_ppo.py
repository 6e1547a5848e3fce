"""Time one PPO iteration per phase, for both value-network modes, at the settings of the TRL comparison.

    python bench/bench_ppo.py                          # random weights of the default shape, fp32, CPU, 2 threads
    python bench/bench_ppo.py --real                   # the real default model (its tokenizer's chat prompts)
    python bench/bench_ppo.py --device cuda            # on a GPU (bf16 autocast, frozen models in bf16)
    python bench/bench_ppo.py --out bench/ppo.md       # also write the tables as markdown

Settings (the issue's TRL 1.12 PPOTrainer side-by-side): 16 prompts of ~40 tokens, responses of exactly 64
tokens (stop tokens disabled, as TRL's min_new_tokens = response_length does), 1 PPO epoch, 1 minibatch,
fp32, 2 threads. Random weights by default, so the script also runs on a lent GPU where the real weights
cannot travel; the work per iteration does not depend on the weights since every response has 64 tokens.
Each mode runs --warmup untimed iterations, then --iters timed ones (the table shows their mean). The
iteration is rlcd.ppo.iteration itself: the same code as `train.py ppo`.
"""
from __future__ import annotations

import copy
import datetime
import gc
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import load_model  # noqa: E402
from models.llama import ModelArgs, Transformer  # noqa: E402
from rlcd import ppo  # noqa: E402
from rlcd.cli import parse_args  # noqa: E402
from rlcd.pm import RewardModel  # noqa: E402

# TRL 1.12 PPOTrainer on this machine (2 threads, fp32, SmolLM2-135M, same settings), from the issue.
TRL_CPU = {"generation": 7.1, "reference": 1.9, "value + reward": 3.1, "training forward": 6.0,
           "backward": 10.6, "iteration": 30.7, "iteration, 4 epochs": 76.9}


@dataclass
class Args:
    device: str = "cpu"                    # cpu or cuda
    threads: int = 2                       # torch CPU threads (0 = leave as is)
    real: bool = False                     # the real default model instead of random weights
    model: str = "smollm2-135m-instruct"   # checkpoint for --real
    value_models: list[str] = field(default_factory=lambda: ["separate", "shared"])  # modes to time
    prompts: int = 16                      # rollouts per iteration
    prompt_len: int = 40                   # mean prompt length in tokens (random mode: 36..44)
    new_tokens: int = 64                   # response length (stop tokens disabled)
    ppo_epochs: int = 1                    # PPO epochs
    minibatches: int = 1                   # minibatches per epoch
    micro_batch: int = 16                  # rollouts per forward/backward
    warmup: int = 1                        # untimed iterations per mode
    iters: int = 2                         # timed iterations per mode
    attn_impl: str = "sdpa"                # naive, sdpa or triton
    out: str | None = None                 # also write the markdown here


def make_models(a: Args, device: torch.device) -> tuple[Transformer, list[list[int]]]:
    """The policy (fp32) and the prompts: real weights and chat prompts, or random weights and ids."""
    if a.real:
        from rlcd.prompts import load_prompts
        policy, tok = load_model(a.model, device=device, dtype=torch.float32, attn_impl=a.attn_impl)
        records = load_prompts("harmless", split="train")
        prompts, _, _ = ppo.encode_prompts(records, tok, 192)
        prompts = sorted(prompts, key=lambda p: abs(len(p) - a.prompt_len))[:a.prompts]   # ~prompt_len tokens
        return policy, prompts
    torch.manual_seed(0)
    with torch.device(device):
        policy = Transformer(ModelArgs.preset("smollm2-135m", attn_impl=a.attn_impl))
    with torch.no_grad():
        policy.tok_embeddings.weight.mul_(0.02)          # tied logits in a sane range, as a trained model's
    g = torch.Generator().manual_seed(0)
    lens = [a.prompt_len - 4 + i % 9 for i in range(a.prompts)]                            # 36..44 tokens
    return policy, [torch.randint(100, 40000, (n,), generator=g).tolist() for n in lens]


def bench_mode(a: Args, mode: str, device: torch.device) -> tuple[dict[str, float], int]:
    policy, prompts = make_models(a, device)
    frozen = torch.bfloat16 if device.type == "cuda" else torch.float32
    ref = copy.deepcopy(policy).to(frozen)
    pm = RewardModel(copy.deepcopy(policy).to(frozen))    # a scorer of the same shape (its head is random)
    value_net = RewardModel(copy.deepcopy(policy)) if mode == "separate" else None
    args = ppo.Args(out="unused", pm="unused", batch_size=a.prompts, max_new_tokens=a.new_tokens,
                    ppo_epochs=a.ppo_epochs, minibatches=a.minibatches, micro_batch=a.micro_batch,
                    iterations=1000, normalize_reward=False, no_stop_score=None, value_model=mode,
                    device=str(device), attn_impl=a.attn_impl)
    run = ppo.build(args, prompts, policy, ref, pm, value_net, stop_ids=[], pad_id=0, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    totals = ppo.timed_iterations(run, a.warmup, a.iters)     # raises on a non-finite diagnostic
    peak = ppo.peak_memory(device)
    del run, policy, ref, pm, value_net
    gc.collect()
    return totals, peak


def main() -> None:
    a = parse_args(Args, prog="bench_ppo.py")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    head = (f"## PPO iteration, {datetime.date.today()}, {where}, torch {torch.__version__}\n\n"
            f"{'real SmolLM2-135M-Instruct' if a.real else 'random weights of the SmolLM2-135M shape'}; "
            f"{a.prompts} prompts of ~{a.prompt_len} tokens, {a.new_tokens}-token responses, {a.ppo_epochs} "
            f"epoch(s) x {a.minibatches} minibatch(es), policy fp32"
            + (" (bf16 autocast; reference and scorer in bf16)" if device.type == "cuda" else "")
            + f"; mean of {a.iters} iterations after {a.warmup} warm-up\n")
    parts = [head]
    totals = {}
    for mode in a.value_models:
        t, peak = bench_mode(a, mode, device)
        totals[mode] = sum(t.get(p, 0.0) for p in ppo.PHASES)
        parts.append(ppo.phase_table(t, peak, f"### {mode} value network\n"))
        print(parts[-1] + "\n", flush=True)
    if device.type == "cpu" and a.ppo_epochs == 1 and a.minibatches == 1:
        trl = TRL_CPU["iteration"]
        parts.append("TRL 1.12 PPOTrainer, same settings (from the issue): " +
                     ", ".join(f"{k} {v:.1f} s" for k, v in TRL_CPU.items()) + "\n\nspeed-up over TRL: " +
                     ", ".join(f"{m} {trl / s:.2f}x" for m, s in totals.items()))
        print(parts[-1])
    if a.out:
        Path(a.out).write_text("\n\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
