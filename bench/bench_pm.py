"""Preference-model training step: ours against transformers' reward model, interleaved in one process.

    python bench/bench_pm.py                         # ours alone: random weights of the default shape, fp32
    .trl-env/bin/python bench/bench_pm.py --hf       # also transformers (make trl-env), same weights and batch
    python bench/bench_pm.py --real --hf             # the real default model
    python bench/bench_pm.py --device cuda --hf      # on a GPU (bf16 autocast for ours, bf16 autocast for HF)
    torchrun --nproc_per_node 2 bench/bench_pm.py    # data parallel: 2 ranks share the batch (--fsdp too)

Timed: forward + Bradley-Terry loss + backward of one batch (no optimiser step: that is the same fused
AdamW whoever computes the gradients), for the top-4 blocks trained (the PM recipe of docs/PM.md) and for
a full fine-tune. Contenders, same weights, same ids, same frozen layers:
  ours          rlcd.reward.RewardModel on models.llama (scalar head at the last token; `train.py pm`'s step)
  hf seqcls     transformers LlamaForSequenceClassification (score head at the last non-pad token: the
                usual reward model)
  hf causal-lm  transformers LlamaForCausalLM with its LM loss (it also pays for the 49152-wide output head)
Each round runs every contender once (a slow spell of a shared machine hits them alike); --repeats rounds
after one warm-up; the table reports tokens/s of the best and the median round. Without --hf there is no
peer and no ratio: no figure measured elsewhere is divided into ours.

Under torchrun: --batch stays the global batch, each rank
takes its share of the pairs, and the model is made data-parallel exactly as `train.py pm` does
(rlcd.distributed.parallelize: whole replicas with gradients all-reduced, or FSDP2 with --fsdp); the
--threads are shared among the ranks. Beside it, "ours, no exchange" runs each rank's share of the same
step on an unwrapped copy, so the difference between the two columns is what the gradient exchange (and
the ranks waiting for each other) costs. Times are rank 0's; the ranks meet in every collective.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import BenchArgs, describe  # noqa: E402
from models import load_model, save_model  # noqa: E402
from models.llama import ModelArgs, Transformer  # noqa: E402
from rlcd import distributed  # noqa: E402
from rlcd.cli import parse_args  # noqa: E402
from rlcd.pm import bt_loss  # noqa: E402
from rlcd.reward import RewardModel  # noqa: E402


@dataclass
class Args(BenchArgs):
    hf: bool = False                       # also transformers (needs it importable: make trl-env)
    batch: int = 8                         # sequences per step (chosen/rejected halves)
    tokens: int = 128                      # tokens per sequence
    repeats: int = 3                       # timed rounds
    out: str | None = None                 # also write the markdown here
    fsdp: bool = False                     # under torchrun: shard with FSDP2 (else whole replicas, as DDP)


def freeze(layers, embed, n_train: int) -> None:
    """Train the top n_train blocks (and the embedding only in a full fine-tune)."""
    for p in embed.parameters():
        p.requires_grad_(n_train >= len(layers))
    for i, layer in enumerate(layers):
        layer.requires_grad_(i >= len(layers) - n_train)


def main() -> None:
    a = parse_args(Args, prog="bench_pm.py")
    world = distributed.init(a.device)          # 1 without torchrun: no process group
    if a.threads:
        torch.set_num_threads(max(1, a.threads // world))       # the cores are shared among the ranks
    if world > 1 and a.hf:
        raise SystemExit("bench_pm.py: --hf runs in one process (transformers' model is not sharded here)")
    B, T = a.batch, a.tokens
    if B % (2 * world):
        raise SystemExit(f"bench_pm.py: --batch {B} must split into {world} equal shares of chosen/rejected pairs")
    dev = torch.device(distributed.device_for_rank(a.device))
    if a.real:
        trunk, _ = load_model(a.model, device=dev, dtype=torch.float32)
    else:
        torch.manual_seed(0)                    # the same weights on every rank
        with torch.device(dev):
            trunk = Transformer(ModelArgs.preset("smollm2-135m"))
    # rows 0..B/2-1 are the chosen sides of the pairs, rows B/2.. their rejected sides; rank r takes pairs
    # r, r + world, ...: its chosen rows first, then the same pairs' rejected rows
    ids = torch.randint(3, 49152, (B, T), generator=torch.Generator().manual_seed(0)).to(dev)
    pairs = torch.arange(distributed.rank(), B // 2, world, device=dev)
    ids = ids[torch.cat([pairs, pairs + B // 2])]
    b = ids.shape[0]
    last = torch.full((b,), T - 1, device=dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    def build(n_train: int, exchange: bool) -> RewardModel:
        """`train.py pm`'s model with its top n_train blocks trained: data-parallel under torchrun."""
        model = RewardModel(copy.deepcopy(trunk)).train()
        freeze(model.trunk.layers, model.trunk.tok_embeddings, n_train)
        if exchange:
            distributed.parallelize(model, model.trunk.layers, fsdp=a.fsdp)
        return model

    def bt_step(model: RewardModel):
        def step():
            with amp:
                r = model(ids, last)
            bt_loss(r[:b // 2], r[b // 2:], 1.0).backward()
        return step

    # ours is built anew for each trained-block count (FSDP2 fixes which parameters train when it wraps)
    ours_names = ["ours"] + (["ours, no exchange"] if world > 1 else [])
    steps: dict[str, Callable[[], None]] = dict.fromkeys(ours_names, lambda: None)
    models: dict[str, tuple] = {}
    versions = f"torch {torch.__version__}"
    if a.hf:
        try:
            import transformers
        except ImportError as e:
            raise SystemExit(f"bench_pm.py --hf: {e}; make trl-env, then .trl-env/bin/python bench/bench_pm.py --hf")
        versions += f", transformers {transformers.__version__}"
        kw = dict(dtype=torch.float32, attn_implementation="sdpa")
        with tempfile.TemporaryDirectory(prefix="bench-pm-") as tmp:        # the same weights, in HF format
            path = save_model(trunk, None, Path(tmp) / "trunk")
            cls = transformers.LlamaForSequenceClassification.from_pretrained(path, num_labels=1, **kw).to(dev).train()
            lm = transformers.LlamaForCausalLM.from_pretrained(path, **kw).to(dev).train()
        cls.config.pad_token_id = 0                    # no id is 0 here: the score is read at the last token

        def step_cls():
            with amp:
                r = cls(input_ids=ids).logits.squeeze(-1).float()
            bt_loss(r[:B // 2], r[B // 2:], 1.0).backward()

        def step_lm():
            with amp:
                logits = lm(input_ids=ids).logits[:, :-1].float()
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()

        steps |= {"hf seqcls": step_cls, "hf causal-lm": step_lm}
        models |= {"hf seqcls": (cls, cls.model.layers, cls.model.embed_tokens),
                   "hf causal-lm": (lm, lm.model.layers, lm.model.embed_tokens)}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    where = describe(dev) + (f", {world} processes (torchrun, {'FSDP' if a.fsdp else 'replicas'}; rank 0's "
                             f"times)" if world > 1 else "")
    lines = [f"## Preference-model step, {datetime.date.today()}, {where}, {versions}", "",
             f"{'real SmolLM2-135M-Instruct' if a.real else 'random weights of the SmolLM2-135M shape'}; "
             f"{B} x {T} tokens, forward + BT loss + backward, "
             + ("bf16 autocast" if dev.type == "cuda" else "fp32")
             + f"; tokens/s, best (median) of {a.repeats} interleaved rounds after a warm-up", "",
             "| trained blocks | " + " | ".join(steps) + (" | ours / hf seqcls |" if a.hf else " |"),
             "|---|" + "---:|" * (len(steps) + a.hf)]
    for n_train in (4, len(trunk.layers)):
        for name in ours_names:
            model = build(n_train, exchange=name == "ours")
            steps[name], models[name] = bt_step(model), (model, model.trunk.layers, model.trunk.tok_embeddings)
        for name, (_, layers, embed) in models.items():
            if name not in ours_names:                     # ours were built frozen as they train
                freeze(layers, embed, n_train)
        times: dict[str, list[float]] = {name: [] for name in steps}
        for rnd in range(a.repeats + 1):                   # round 0 is the warm-up
            for name, fn in steps.items():
                for m, _, _ in models.values():
                    m.zero_grad(set_to_none=True)
                sync()
                distributed.barrier()                      # under torchrun the ranks start each step together
                t0 = time.perf_counter()
                fn()
                sync()
                if rnd:
                    times[name].append(time.perf_counter() - t0)
        cells = [f"{B * T / min(ts):.0f} ({B * T / statistics.median(ts):.0f})" for ts in times.values()]
        ratio = [f"{min(times['hf seqcls']) / min(times['ours']):.2f}x"] if a.hf else []
        label = f"top {n_train} of {len(trunk.layers)}" if n_train < len(trunk.layers) else f"all {n_train}"
        lines.append(f"| {label} | " + " | ".join(cells + ratio) + " |")
        distributed.print0(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines) + "\n"
    if distributed.is_main():
        print(text)
        if a.out:
            Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
