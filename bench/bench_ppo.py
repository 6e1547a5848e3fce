"""Time one PPO iteration per phase, for both value-network modes, and TRL's PPOTrainer in the same run.

    python bench/bench_ppo.py                          # random weights of the default shape, fp32, CPU, 2 threads
    python bench/bench_ppo.py --real                   # the real default model (its tokenizer's chat prompts)
    python bench/bench_ppo.py --device cuda            # on a GPU (bf16 autocast, frozen models in bf16)
    .trl-env/bin/python bench/bench_ppo.py --trl       # also TRL 1.12's PPOTrainer, interleaved (make trl-env)
    torchrun --nproc_per_node 2 bench/bench_ppo.py     # data parallel: 2 ranks share the 16 rollouts (--fsdp too)
    python bench/bench_ppo.py --out bench/ppo.md       # also write the tables as markdown

Settings (the same-run comparison with TRL): 16 prompts of ~40 tokens, responses of exactly 64
tokens (stop tokens disabled; TRL gets min_new_tokens = response_length), 1 PPO epoch, 1 minibatch, 1
micro-batch, fp32, 2 threads. Random weights by default, so the script also runs on a lent GPU where the
real weights cannot travel; the work per iteration does not depend on the weights since every response has
64 tokens. Our iteration is rlcd.ppo.train_iteration itself: the same code as `train.py ppo`.

Same-run comparison. Every contender (ours with a separate value network, ours with the shared head, and
with --trl TRL's PPOTrainer on the same weights: bench/trl_peer.py) is built first; then each round runs
one iteration of each in turn, so a slow spell of this shared machine hits all of them. --warmup rounds
are untimed (allocation, packing, compilation); the tables show the mean of the --iters timed rounds. No
figure measured elsewhere is ever divided into ours: without --trl there is no ratio.

Memory: "transient" is the peak during an iteration above the memory in use just before it (CUDA: allocated
bytes; CPU: resident set, VmHWM reset through /proc/self/clear_refs), "static" the bytes of the contender's
own weights and optimiser state. Contenders share the process, so its total resident set says nothing about
any one of them. On a CPU, memory freed by one contender stays in the process and is reused by the next
without raising the resident set, so there the transient figure is a lower bound (0 where a contender fits
in what the process already holds); for a CPU peak, time one contender alone (--value-models separate).
"""
from __future__ import annotations

import copy
import datetime
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import BenchArgs, describe  # noqa: E402
from models import load_model, save_model  # noqa: E402
from models.llama import ModelArgs, Transformer  # noqa: E402
from rlcd import distributed, ppo  # noqa: E402
from rlcd.cli import parse_args  # noqa: E402
from rlcd.reward import RewardModel  # noqa: E402
from rlcd.precision import freeze_for  # noqa: E402
from rlcd.precision import resolve as resolve_precision  # noqa: E402

# Rows of the comparison table: each contender's phases mapped onto common names.
OURS_ROWS = {"generate": "generate", "score": "score + values", "values": "score + values",
             "reference": "reference", "forward": "update: forward", "backward": "update: backward",
             "optimiser": "update: optimiser", "update": "update", "advantages": "other"}
ROW_ORDER = ["generate", "score + values", "reference", "update: forward", "update: backward", "update: optimiser",
             "update", "other"]
TRL_ROWS = {"generate": "generate", "score": "score + values", "reference": "reference",
            "forward": "update: forward", "backward": "update: backward", "optimiser": "update: optimiser",
            "other": "other"}


@dataclass
class Args(BenchArgs):
    value_models: list[str] = field(default_factory=lambda: ["separate", "shared"])  # modes to time
    trl: bool = False                      # also TRL's PPOTrainer (needs trl + transformers: make trl-env)
    precision: str = "auto"                # auto, fp32 or bf16 (rlcd.precision), TRL the same (bf16=True in bf16)
    fsdp: bool = False                     # under torchrun: shard with FSDP2 (else whole replicas, as DDP)
    prompts: int = 16                      # rollouts per iteration
    prompt_len: int = 40                   # mean prompt length in tokens (random mode: 36..44)
    new_tokens: int = 64                   # response length (stop tokens disabled)
    ppo_epochs: int = 1                    # PPO epochs (TRL runs only the default 1 x 1 x 1)
    minibatches: int = 1                   # minibatches per epoch
    micro_batch: int = 16                  # rollouts per forward/backward
    warmup: int = 1                        # untimed rounds
    iters: int = 2                         # timed rounds
    attn_impl: str = "sdpa"                # naive, sdpa or triton
    out: str | None = None                 # also write the markdown here


def make_policy(a: Args, device: torch.device) -> tuple[Transformer, list[list[int]]]:
    """The initial policy (fp32) and the prompts: real weights and chat prompts, or random weights and ids."""
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


def our_run(a: Args, mode: str, policy: Transformer, frozen: tuple[Transformer, RewardModel],
            prompts: list[list[int]], device: torch.device) -> ppo.PPORun:
    """A PPO run of `mode` from a copy of the initial policy; the frozen reference and scorer are shared."""
    ref, pm = frozen
    value_net = RewardModel(copy.deepcopy(policy)) if mode == "separate" else None
    args = ppo.Args(out="unused", pm="unused", batch_size=a.prompts, max_new_tokens=a.new_tokens,
                    ppo_epochs=a.ppo_epochs, minibatches=a.minibatches, micro_batch=a.micro_batch,
                    iterations=1000, normalize_reward=False, no_stop_score=None, value_model=mode,
                    device=str(device), attn_impl=a.attn_impl, precision=a.precision, fsdp=a.fsdp)
    return ppo.build(args, prompts, copy.deepcopy(policy), ref, pm, value_net, stop_ids=[], pad_id=0,
                     device=device)


def our_iteration(run: ppo.PPORun) -> Callable[[], dict[str, float]]:
    """One call = one training iteration (ppo.train_iteration: KL controller, NaN guard included)."""
    timer, it = ppo.PhaseTimer(run.device), [0]

    def step() -> dict[str, float]:
        ppo.train_iteration(run, it[0], timer)
        it[0] += 1
        return timer.read()
    return step


def static_bytes(modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the modules' weights and the optimiser's state held by this process (a sharded tensor's
    local shard under torchrun)."""
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    if optimizer is not None:
        tensors |= {id(t): t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)}
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors.values()]
    return sum(t.numel() * t.element_size() for t in local)


class Memory:
    """The peak above the memory in use at `start()`: CUDA allocator bytes, or the CPU resident set."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")      # VmHWM := VmRSS (Linux)
            except OSError:
                pass
            self.base = self._status("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM") - self.base


def table(results: dict[str, dict[str, float]], rows_of: dict[str, dict[str, str]]) -> str:
    """Seconds per common row (columns = contenders), the iteration and its ratio to TRL when it ran."""
    seen = {rows_of[name].get(p, p) for name, times in results.items() for p in times}
    rows = [r for r in ROW_ORDER if r in seen] + sorted(seen - set(ROW_ORDER))
    per = {name: {} for name in results}
    for name, times in results.items():
        for p, s in times.items():
            r = rows_of[name].get(p, p)
            per[name][r] = per[name].get(r, 0.0) + s
    names = list(results)
    out = ["| phase, s | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for r in rows:
        out.append(f"| {r} | " + " | ".join(f"{per[n][r]:.2f}" if r in per[n] else "–" for n in names) + " |")
    total = {n: sum(results[n].values()) for n in names}
    out.append("| **iteration** | " + " | ".join(f"**{total[n]:.2f}**" for n in names) + " |")
    if "TRL" in total:
        out.append("| speed-up over TRL | " + " | ".join(f"{total['TRL'] / total[n]:.2f}x" for n in names) + " |")
    return "\n".join(out)


def main() -> None:
    a = parse_args(Args, prog="bench_ppo.py")
    world = distributed.init(a.device)          # 1 without torchrun: no process group
    if a.threads:
        torch.set_num_threads(max(1, a.threads // world))       # the cores are shared among the ranks
    if world > 1 and a.trl:
        raise SystemExit("bench_ppo.py: --trl runs in one process (TRL's trainer is not sharded here)")
    device = torch.device(distributed.device_for_rank(a.device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    where = describe(device) + (f", {world} processes (torchrun, {'FSDP' if a.fsdp else 'replicas'}; rank 0's "
                                f"times and memory)" if world > 1 else "")
    policy, prompts = make_policy(a, device)

    contenders: dict[str, Callable[[], dict[str, float]]] = {}
    rows_of: dict[str, dict[str, str]] = {}
    static: dict[str, Callable[[], int]] = {}        # read after the rounds: optimiser state is created lazily
    prec = resolve_precision(a.precision, device)
    bf16 = prec.bf16
    frozen = (freeze_for(copy.deepcopy(policy), prec), freeze_for(RewardModel(copy.deepcopy(policy)), prec))
    for mode in a.value_models:
        run = our_run(a, mode, policy, frozen, prompts, device)
        name = f"ours, {mode}"
        contenders[name], rows_of[name] = our_iteration(run), OURS_ROWS
        static[name] = lambda run=run: static_bytes([run.policy, run.ref, run.pm, run.value_net or run.value_head],
                                                    run.optimizer)
    versions = f"torch {torch.__version__}"
    if a.trl:
        if (a.ppo_epochs, a.minibatches) != (1, 1) or a.micro_batch < a.prompts:
            raise SystemExit("bench_ppo.py: --trl compares the default 1 epoch x 1 minibatch x 1 micro-batch only")
        try:
            import transformers
            import trl

            from trl_peer import TRLPeer
        except ImportError as e:
            raise SystemExit(f"bench_ppo.py --trl: {e}; run it with the side environment: make trl-env, then "
                             ".trl-env/bin/python bench/bench_ppo.py --trl") from None
        versions += f", transformers {transformers.__version__}, trl {trl.__version__}"
        with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:     # the same weights, in HF format
            peer = TRLPeer(save_model(policy, None, Path(tmp) / "policy"), prompts, a.prompts, a.new_tokens,
                           device, bf16=bf16)
        contenders["TRL"], rows_of["TRL"] = peer.iteration, TRL_ROWS
        tr = peer.trainer
        static["TRL"] = lambda: static_bytes([tr.model, tr.ref_model, tr.reward_model], tr.optimizer.optimizer)
    del policy

    mem = Memory(device)
    sums = {n: {} for n in contenders}
    transient = {n: 0 for n in contenders}
    for r in range(a.warmup + a.iters):
        for name, step in contenders.items():
            distributed.barrier()                 # under torchrun the ranks start each iteration together
            mem.start()
            t0 = time.perf_counter()
            times = step()                        # rank 0's phase times (the ranks meet in every collective)
            if distributed.is_main():
                print(f"round {r + 1}/{a.warmup + a.iters} {name}: {time.perf_counter() - t0:.1f} s"
                      + (" (warm-up)" if r < a.warmup else ""), file=sys.stderr, flush=True)
            if r >= a.warmup:
                transient[name] = max(transient[name], mem.peak())
                for p, s in times.items():
                    sums[name][p] = sums[name].get(p, 0.0) + s / a.iters

    head = (f"## PPO iteration, {datetime.date.today()}, {where}, {versions}\n\n"
            f"{'real SmolLM2-135M-Instruct' if a.real else 'random weights of the SmolLM2-135M shape'}; "
            f"{a.prompts} prompts of ~{a.prompt_len} tokens, {a.new_tokens}-token responses, {a.ppo_epochs} "
            f"epoch(s) x {a.minibatches} minibatch(es), precision {prec.describe()}"
            + (" (policy fp32 under bf16 autocast; reference and scorer blocks in bf16)" if bf16 else "")
            + f", attention {a.attn_impl}; mean of {a.iters} interleaved rounds after {a.warmup} warm-up\n")
    gib = 2 ** 30
    memory = ("| memory, GiB | " + " | ".join(contenders) + " |\n|---|" + "---:|" * len(contenders) + "\n"
              "| static (weights + optimiser state) | " + " | ".join(f"{static[n]() / gib:.2f}" for n in contenders)
              + " |\n| transient (peak above the start of an iteration) | "
              + " | ".join(f"{transient[n] / gib:.2f}" for n in contenders) + " |")
    text = "\n\n".join([head, table(sums, rows_of), memory]) + "\n"
    if distributed.is_main():
        print(text)
        if a.out:
            Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
