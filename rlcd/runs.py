"""What the training stages (pm, sft, ppo) share: their settings (RunArgs), the run directory, the
optimiser and schedule, the deterministic data order and one loop. The checkpoints the loop writes and
--resume restores exactly are rlcd/checkpoints.py's.

One scaffold. Each stage parses its Args (a RunArgs), calls prepare_run, builds its model and the
optimiser (make_trainer), gets (start, save) from checkpoints.checkpointing, and hands run_loop its step: a
function of the step index that returns the step's metrics record. pm and sft plug in accumulation_step
(one optimiser step over a batch of examples, gradient accumulation over micro-batches; `train` does
all of the above for them), ppo plugs in one PPO iteration (rlcd.ppo.train_iteration). run_loop logs
the records, checkpoints every --save-every steps and at --stop-after, evaluates, and returns a summary.

Run directory (OUT = --out):
    OUT/args.json             the resolved Args of the first invocation (rlcd.cli.save_config); not
                              config.json, which would make OUT look like a model directory
    OUT/metrics.jsonl         one JSON object per step (ppo: per iteration), per dev evaluation, per
                              checkpoint write (save_s), and (pm, sft) a summary
    OUT/<ckpt>/               the latest checkpoint, replaced atomically as a whole (rlcd/checkpoints.py:
                              a Hugging Face-format model, the stage's other modules, run.json and the
                              resume state); <ckpt> is CKPT_DIRS[stage], "policy" or "reward"

Resume equivalence. The batch of optimiser step s is a pure function of (seed, s, number of training
examples) -- see batch_indices -- so it needs no saved cursor; the model, optimiser, scheduler and RNG
states are restored bit for bit. Training 2N steps straight and N, then --resume, then N give the same
weights on the same machine.

Under torchrun (rlcd/distributed.py, docs/SCALING.md) the same scaffold runs on every rank: --batch-size
stays the global batch and rank r takes its share of each step's examples (batch[r::N]); the model is
made data-parallel (distributed.parallelize: DDP's semantics, or FSDP2 with --fsdp) before the
optimiser is built; losses are normalised by the global batch and multiplied by N, since FSDP averages
the ranks' gradients; logged metrics are sums over the ranks. Rank 0 alone creates the run directory,
writes metrics and checkpoint files and shows progress; a checkpoint saved under torchrun resumes at
any world size (rlcd/checkpoints.py).

Shapes: B examples per optimiser step, b per micro-batch (gradient accumulation over B / b).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from models import CheckpointError, Tokenizer, Transformer, load_model
from rlcd import distributed
from rlcd.checkpoints import CKPT_DIRS, RUN_JSON, checkpointing, read_run_meta, recover
from rlcd.cli import save_config
from rlcd.precision import Precision
from rlcd.precision import resolve as resolve_precision

METRICS = "metrics.jsonl"


@dataclass(kw_only=True)
class RunArgs:
    """Settings every training stage shares (pm, sft and ppo): the run directory, the optimiser and its
    schedule, checkpoints, the device. ppo's Args subclasses this; pm's and sft's through TrainArgs."""
    out: str                        # run directory (created; --resume continues the one there)
    resume: bool = False            # continue from OUT's last checkpoint (same settings required)
    stop_after: int = 0             # stop (with a checkpoint) after this step; 0 = run the whole schedule
    batch_size: int = 16            # examples per optimiser step (ppo: prompts = rollouts per iteration)
    micro_batch: int = 4            # examples per forward/backward (gradient accumulation)
    lr: float = 1e-5                # peak learning rate
    min_lr_ratio: float = 0.0       # cosine decays to lr * this at the last step
    warmup: float = 0.03            # warm-up: a fraction of the optimiser steps if < 1, else a step count
    weight_decay: float = 0.0       # AdamW decoupled weight decay on matrices (not norms, not biases)
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    grad_clip: float = 1.0          # clip the global gradient norm (0 = off)
    train_layers: int = 0           # 0 = full fine-tune; N = only the top N blocks of each trunk, its final norm and head
    grad_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    save_every: int = 100           # checkpoint every N steps (and always at the stop; 0 = at the stop only)
    seed: int = 0                   # data order, dev split, sampling and shuffling
    device: str = "cpu"             # cpu or cuda (under torchrun: rank r computes on cuda:LOCAL_RANK)
    fsdp: bool = False              # under torchrun: shard weights, gradients, AdamW state over the ranks (FSDP2)
    precision: str = "auto"         # auto, fp32 or bf16 (rlcd.precision): auto is bf16 on CUDA and on CPUs with native bf16
    attn_impl: str = "sdpa"         # naive, sdpa or triton
    threads: int = 0                # torch CPU threads (0 = leave as is)


@dataclass(kw_only=True)
class TrainArgs(RunArgs):
    """What pm and sft add: a model trained on batches of examples for a number of epochs, with a dev split."""
    model: str = "smollm2-135m-instruct"  # initial weights: model name, checkpoint or run directory
    epochs: float = 1.0             # passes over the training split (ignored when --max-steps > 0)
    max_steps: int = 0              # optimiser steps of the schedule; 0 = from --epochs
    max_length: int = 512           # tokens per sequence (prompt + response + end marker)
    dev: float = 0.1                # held-out split by prompt id: a fraction if < 1, else a count of prompts
    eval_every: int = 50            # dev evaluation every N steps (and always at the end; 0 = end only)
    progress: bool = True           # progress bar


# Settings that may differ when resuming: they do not change what is computed.
RESUMABLE_CHANGES = {"resume", "stop_after", "eval_every", "save_every", "progress", "threads", "device", "fsdp"}


# --- run directory ----------------------------------------------------------------------------------------
def prepare_run(args: RunArgs, stage: str, may_change: frozenset[str] = frozenset()) -> Path | None:
    """Create OUT and save the config; return the checkpoint to resume from (None for a fresh run).

    Refuses to overwrite a run that has a checkpoint unless --resume, to resume another stage's run, and
    to resume with settings that would change the result (other than RESUMABLE_CHANGES and the stage's
    own `may_change`). On resume, metrics logged after the checkpoint's step (by a run that crashed
    before its next checkpoint) are dropped from metrics.jsonl, since those steps will be redone."""
    out = Path(args.out)
    ckpt = out / CKPT_DIRS[stage]
    if distributed.is_main():
        recover(ckpt)
    distributed.barrier()                           # every rank checks the directory rank 0 recovered
    other = [d for s, d in CKPT_DIRS.items() if d != CKPT_DIRS[stage] and (out / d / RUN_JSON).is_file()]
    if other:
        raise CheckpointError(f"{out}: holds a {read_run_meta(out / other[0])['stage']!r} run "
                              f"({other[0]}/), not a {stage!r} run; choose another --out")
    has_ckpt = (ckpt / RUN_JSON).is_file()
    if not args.resume:
        if has_ckpt:
            raise CheckpointError(f"{out}: already holds a checkpoint ({ckpt.name}/); pass --resume to "
                                  f"continue it or choose another --out")
        distributed.barrier()                       # every rank has seen the directory as it was
        if distributed.is_main():
            out.mkdir(parents=True, exist_ok=True)
            save_config(args, out / "args.json")
            (out / METRICS).unlink(missing_ok=True)      # left by an earlier run that never checkpointed
        return None
    if not has_ckpt:
        raise CheckpointError(f"{out}: --resume, but there is no checkpoint {ckpt.name}/{RUN_JSON} to resume")
    meta = read_run_meta(ckpt)
    if meta.get("stage") != stage:
        raise CheckpointError(f"{ckpt}: written by stage {meta.get('stage')!r}, cannot resume it as {stage!r}")
    saved, now = meta["config"], json.loads(json.dumps(dataclasses.asdict(args), default=str))
    free = RESUMABLE_CHANGES | may_change | {"out"}         # the directory is the run, under any name
    saved_rel, now_rel = _beside_run(saved), _beside_run(now)
    # A setting the checkpoint does not record (added to the stage since) changes nothing at its default.
    default = {f.name: json.loads(json.dumps(f.default, default=str)) for f in dataclasses.fields(args)
               if f.default is not dataclasses.MISSING}
    changed = sorted(k for k in set(saved) | set(now) if k not in free and saved_rel.get(k) != now_rel.get(k)
                     and not (k not in saved and k in default and now.get(k) == default[k]))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise CheckpointError(f"{out}: --resume with different settings ({diffs}); they would change the result")
    log = out / METRICS
    distributed.barrier()
    if log.is_file() and distributed.is_main():
        keep = [line for line in log.read_text().splitlines() if json.loads(line).get("step", 0) <= meta["step"]]
        log.write_text("".join(line + "\n" for line in keep))
    return ckpt


def _beside_run(config: dict) -> dict:
    """A run's settings for comparison on resume: each path under the run directory's parent as
    ("beside the run", its path relative to that parent). So runs/x/pm, ./runs/x/pm and /abs/runs/x/pm
    with their pairs files beside them compare equal, and so does a pipeline directory that moved with
    everything in it, while another input file does not."""
    root = os.path.dirname(os.path.abspath(config.get("out") or "."))

    def rel(v):
        if isinstance(v, list):
            return [rel(x) for x in v]
        if not isinstance(v, str) or not v:
            return v
        r = os.path.relpath(os.path.abspath(os.path.expanduser(v)), root)
        return v if r == os.pardir or r.startswith(os.pardir + os.sep) else ("beside the run", r)
    return {k: rel(v) for k, v in config.items()}


def log_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one metrics record (one line) to the run's JSONL log (rank 0's job under torchrun)."""
    if not distributed.is_main():
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# --- data --------------------------------------------------------------------------------------------------
def split_dev(keys: list[str], dev: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, dev) example indices. Examples are grouped by key (the prompt id) so that no prompt is on
    both sides, and a key's side depends only on (seed, key): two pairs files over the same prompts
    (RLCD and RLAIF) get the same dev prompts. `dev` < 1 is a fraction of the keys, else a count."""
    if dev < 0:
        raise ValueError(f"dev must be >= 0, got {dev}")
    uniq = sorted(set(keys), key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    n_dev = round(dev * len(uniq)) if dev < 1 else int(dev)
    if n_dev >= len(uniq):
        raise ValueError(f"dev split of {n_dev} leaves nothing to train on ({len(uniq)} distinct prompts)")
    dev_keys = set(uniq[:n_dev])
    train = [i for i, k in enumerate(keys) if k not in dev_keys]
    held = [i for i, k in enumerate(keys) if k in dev_keys]
    return train, held


@functools.lru_cache(maxsize=4)
def _epoch_perm(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Examples of optimiser step `step` (0-based): positions [step*B, (step+1)*B) of an endless stream
    of epochs, each a fresh seeded permutation of range(n). A pure function of its arguments, so a
    resumed run sees exactly the batches the uninterrupted run would have seen."""
    out = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(g, n)
        out.append(_epoch_perm(n, seed, epoch)[i])
    return out


def right_pad(seqs: list[list[int]], pad_id: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Token lists -> (b, T) right-padded ids and (b,) lengths. Right padding needs no mask: attention
    is causal, so real positions never see the pad that follows them."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids.to(device), torch.tensor([len(s) for s in seqs], device=device)


# --- model and optimiser -----------------------------------------------------------------------------------
def freeze_lower_layers(trunk: Transformer, train_layers: int) -> None:
    """Keep only the top `train_layers` blocks and the final norm trainable (0 = everything trains).

    For a CPU budget: frozen blocks build no autograd graph (their input does not require grad), so
    backward stops at the lowest trained block. With tied embeddings the output head is the embedding,
    frozen too; a reward or value head on top is the caller's and stays trainable."""
    if train_layers <= 0:
        return
    n = len(trunk.layers)
    if train_layers > n:
        raise ValueError(f"--train-layers {train_layers} exceeds the model's {n} blocks")
    for p in trunk.parameters():
        p.requires_grad_(False)
    for block in trunk.layers[n - train_layers:]:
        block.requires_grad_(True)
    trunk.norm.requires_grad_(True)


def make_optimizer(named_params: list[tuple[str, nn.Parameter]], args: RunArgs,
                   device: torch.device, lrs: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (norm gains and biases are
    not decayed, as in GPT-2/nanoGPT). `lrs` gives the parameters whose names start with a prefix their
    own peak learning rate (PPO's value network), in groups of their own; the rest run at --lr. The fused
    implementation exists on CPU too and is ~8x faster there than the default foreach one (50 vs 380 ms a
    step for 14M parameters on this machine)."""
    lrs = lrs or {}
    prefix_of = lambda name: next((k for k in lrs if name.startswith(k)), None)      # noqa: E731
    groups = []
    for prefix in [None, *lrs]:
        mine = [p for n, p in named_params if p.requires_grad and prefix_of(n) == prefix]
        lr = {} if prefix is None else {"lr": lrs[prefix]}
        groups += [{"params": [p for p in mine if p.dim() >= 2], "weight_decay": args.weight_decay, **lr},
                   {"params": [p for p in mine if p.dim() < 2], "weight_decay": 0.0, **lr}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), fused=device.type in ("cuda", "cpu"))


def make_trainer(named_params: list[tuple[str, nn.Parameter]], args: RunArgs, device: torch.device,
                 total_steps: int, lrs: dict[str, float] | None = None,
                 ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The optimiser (make_optimizer) and its schedule: --warmup steps, then cosine to the last step."""
    optimizer = make_optimizer(named_params, args, device, lrs)
    warm = round(args.warmup * total_steps) if args.warmup < 1 else int(args.warmup)   # a fraction, or a count
    return optimizer, cosine_schedule(optimizer, warm, total_steps, args.min_lr_ratio)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then cosine decay to min_lr_ratio at the last step (the
    AlpacaFarm/RLCD recipe: cosine, 3% warm-up). Step s (0-based) uses lr * f(s); f(0) > 0, so the
    first step is not wasted at lr 0."""
    def f(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)   # in [0, 1)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def schedule_length(args: TrainArgs, n_train: int) -> int:
    """The total number of optimiser steps."""
    if args.batch_size % args.micro_batch:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch {args.micro_batch}")
    return args.max_steps or max(1, math.ceil(args.epochs * n_train / args.batch_size))


def precision_of(args: RunArgs, device: torch.device) -> Precision:
    """What --precision resolves to for this run on `device` (rlcd.precision)."""
    return resolve_precision(args.precision, device)


def autocast(args: RunArgs, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when the run computes in bf16: matmuls in bf16; weights, optimiser state, norms,
    softmax, losses and reductions in fp32."""
    return precision_of(args, device).autocast(device)


def check_finite(step: int, what: str = "step", **values: float) -> None:
    """The NaN/inf guard of every stage: FloatingPointError naming `what` (step, or PPO's iteration) and the
    non-finite values, raised before the step is logged or checkpointed, so the last checkpoint stays good."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"{what} {step}: non-finite {', '.join(f'{k}={v}' for k, v in bad.items())}; "
                                 f"stopped before checkpointing it (the last checkpoint is intact; try a lower "
                                 f"--lr, or --grad-clip)")


# --- a stage's run: model, optimiser state, checkpoints ----------------------------------------------------
LossFn = Callable[[list[int], list[int]], tuple[Tensor, dict[str, Tensor], int]]   # see accumulation_step


def device_of(args: RunArgs) -> torch.device:
    """The run's device, after setting the CPU threads (--threads) and, under torchrun, joining the
    process group (distributed.init; nothing at world size 1): cuda:LOCAL_RANK for --device cuda."""
    if args.threads:
        torch.set_num_threads(args.threads)
    distributed.init(args.device)
    return torch.device(distributed.device_for_rank(args.device))


def check_world(args: RunArgs, what: str = "--batch-size") -> None:
    """Under torchrun every rank takes an equal share of each batch, so that all run the same number of
    forwards and backwards (each one a collective under FSDP)."""
    if args.batch_size % distributed.world_size():
        raise ValueError(f"{what} {args.batch_size} must be a multiple of the world size {distributed.world_size()}")


def parallelize(args: RunArgs, model: nn.Module, trunk: Transformer, device: torch.device,
                methods: tuple[str, ...] = ()) -> nn.Module:
    """`model` (with `trunk`'s blocks) made data-parallel for training under torchrun, as --fsdp asks
    (distributed.parallelize; bf16 compute under FSDP on CUDA in bf16 precision); itself at world size 1."""
    return distributed.parallelize(model, trunk.layers, fsdp=args.fsdp,
                                   mixed_precision=device.type == "cuda" and precision_of(args, device).bf16,
                                   methods=methods)


def load_trunk(args: TrainArgs, resume_from: Path | None, device: torch.device) -> tuple[Transformer, Tokenizer]:
    """The trunk a pm or sft run trains, in fp32 and train mode: --model's weights, or the checkpoint's
    when resuming; only the top --train-layers blocks trainable, gradient checkpointing as asked."""
    trunk, tok = load_model(resume_from or args.model, device=device, dtype=torch.float32, attn_impl=args.attn_impl)
    freeze_lower_layers(trunk, args.train_layers)
    trunk.gradient_checkpointing = args.grad_checkpointing
    return trunk.train(), tok


def train(args: TrainArgs, stage: str, model: nn.Module, trunk: Transformer, tok: Tokenizer,
          resume_from: Path | None, train_keys: list[str], lengths: list[int], total_steps: int, loss_fn: LossFn,
          evaluate: Callable[[], dict[str, float]], modules: dict[str, nn.Module] | None = None, **meta) -> dict:
    """pm's and sft's run once the data and `model` (whose trainable parameters train; `trunk` is what
    checkpoints save as the model) are ready: the optimiser and its schedule, resume, train_loop over
    the training examples (`train_keys`: their prompt ids, `lengths`: their token counts). Returns the
    summary record. Under torchrun `model` is made data-parallel here, in place, before the optimiser."""
    device = torch.device(distributed.device_for_rank(args.device))
    check_world(args)
    parallelize(args, model, trunk, device)
    optimizer, scheduler = make_trainer(list(model.named_parameters()), args, device, total_steps)
    start, save, _ = checkpointing(args, stage, trunk, tok, optimizer, scheduler, total_steps, train_keys,
                                   resume_from, modules or {}, **meta)
    params = [p for p in model.parameters() if p.requires_grad]

    def evaluate_in_precision() -> dict[str, float]:        # the dev evaluation computes as training does
        with autocast(args, device):
            return evaluate()
    return train_loop(args, params, optimizer, scheduler, len(lengths), lengths, start, total_steps, device, loss_fn,
                      evaluate_in_precision, save, Path(args.out) / METRICS, stage)


# --- the loop ----------------------------------------------------------------------------------------------
def run_loop(args: RunArgs, step: Callable[[int], dict], start: int, total: int, save: Callable[[int], None],
             log_path: Path, desc: str, progress: bool = True, time_key: str = "step_s",
             evaluate: Callable[[], dict[str, float]] | None = None, eval_every: int = 0,
             after: Callable[[dict], None] | None = None) -> dict:
    """Every stage's loop: steps start .. min(total, --stop-after), checkpointed every --save-every steps
    and at the stop. Returns the summary record (steps, training time and tokens/s without evaluation or
    checkpointing, final dev metrics), which the caller may log.

    step(s) runs step s (0-based) and returns its record, with "tokens" (tokens processed). A step raises
    FloatingPointError on a non-finite value before anything of it is saved, so the last checkpoint stays
    good. The record, with "step" (s + 1), tokens/s and its seconds (`time_key`), goes to metrics.jsonl,
    then to `after` (PPO prints it and logs samples). `evaluate` (if any) runs every `eval_every` steps
    and at the end; its metrics and each checkpoint's writing time (save_s) are logged too."""
    from tqdm import tqdm

    stop = min(total, args.stop_after) if args.stop_after else total
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", disable=not progress or not distributed.is_main(),
               dynamic_ncols=True)
    train_s, tokens_seen = 0.0, 0          # the steps only: no evaluation, no checkpoint writes
    s = start
    while s < stop:
        t0 = time.perf_counter()
        record = step(s)
        dt = time.perf_counter() - t0
        s += 1
        train_s, tokens_seen = train_s + dt, tokens_seen + record["tokens"]
        record = {"step": s, **record, "tokens_per_s": record["tokens"] / dt, time_key: dt}
        log_jsonl(log_path, record)
        bar.set_postfix({k: f"{record[k]:.3g}" for k in ("loss", "accuracy") if k in record}
                        | {"tok/s": f"{record['tokens_per_s']:.0f}"})
        bar.update(1)
        if after is not None:
            after(record)
        if evaluate is not None and eval_every and s % eval_every == 0 and s < stop:
            _eval_and_log(evaluate, s, log_path, bar)
        if (args.save_every and s % args.save_every == 0) or s == stop:
            t1 = time.perf_counter()
            save(s)
            log_jsonl(log_path, {"step": s, "save_s": time.perf_counter() - t1})
    bar.close()
    dev_metrics = _eval_and_log(evaluate, s, log_path, None) if evaluate is not None else {}
    return {"summary": True, "step": s, "steps_run": s - start, "train_s": train_s, "train_tokens": tokens_seen,
            "tokens_per_s": tokens_seen / max(train_s, 1e-9), **{f"dev_{k}": v for k, v in dev_metrics.items()}}


def accumulation_step(args: TrainArgs, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scheduler,
                      n_train: int, lengths: list[int], device: torch.device, loss_fn: LossFn) -> Callable[[int], dict]:
    """pm's and sft's step for run_loop: one optimiser step over the batch of step s (batch_indices),
    accumulated over micro-batches.

    loss_fn(micro, batch) -> (loss, metrics, n_tokens) for the micro-batch `micro` of the step's batch
    `batch` (lists of training-example indices). The loss and metrics must already be normalised to the
    whole batch (e.g. multiplied by len(micro) / len(batch)), so that summing over micro-batches gives
    the batch's value whatever --micro-batch is. Each step's examples are sorted by length before
    being cut into micro-batches, so each micro-batch wastes little padding.

    Under torchrun `batch` is the global batch and rank r's micro-batches cut its share batch[r::N]
    (similar lengths on every rank): the loss is still normalised to the global batch, so the ranks'
    losses add up to it; it is multiplied by N before backward because FSDP averages the gradients over
    the ranks; replicated models all-reduce their gradients once, in the last micro-batch's backward
    (distributed.sync_gradients); the metrics and token counts are summed over the ranks (one all_reduce
    per step)."""
    world = distributed.world_size()

    def step(s: int) -> dict:
        batch = sorted(batch_indices(n_train, args.batch_size, s, args.seed), key=lambda i: lengths[i])
        mine = distributed.shard(batch)                                 # the whole batch at world size 1
        sums: dict[str, Tensor] = {}
        n_tok = 0
        for lo in range(0, len(mine), args.micro_batch):
            micro = mine[lo:lo + args.micro_batch]
            distributed.sync_gradients(lo + args.micro_batch >= len(mine))   # all-reduce in the last backward
            with autocast(args, device):
                loss, metrics, n = loss_fn(micro, batch)
            (loss * world if world > 1 else loss).backward()
            n_tok += n
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
        # clip_grad_norm_ with max_norm=inf only measures: the norm is logged either way. Over sharded
        # gradients it is a DTensor: the global norm once made whole.
        grad_norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf")))
        if world > 1:
            total = distributed.all_reduce_sum(torch.stack([*sums.values(), torch.tensor(float(n_tok), device=device)]))
            sums, n_tok = dict(zip(sums, total[:-1].unbind())), int(total[-1].item())
        record = {k: v.item() for k, v in sums.items()}                 # the step's one host sync
        check_finite(s + 1, loss=record["loss"], grad_norm=grad_norm.item())
        lr = scheduler.get_last_lr()[0]                                 # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, **record, "grad_norm": grad_norm.item(), "tokens": n_tok}
    return step


def train_loop(args: TrainArgs, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scheduler,
               n_train: int, lengths: list[int], start_step: int, total_steps: int, device: torch.device,
               loss_fn: LossFn, evaluate: Callable[[], dict[str, float]], save: Callable[[int], None],
               log_path: Path, desc: str) -> dict:
    """pm's and sft's loop: run_loop over accumulation_step's optimiser steps, with a progress bar (--progress),
    dev evaluation every --eval-every steps and at the stop, and the summary record logged and returned."""
    step = accumulation_step(args, params, optimizer, scheduler, n_train, lengths, device, loss_fn)
    summary = run_loop(args, step, start_step, total_steps, save, log_path, desc, progress=args.progress,
                       evaluate=evaluate, eval_every=args.eval_every)
    log_jsonl(log_path, summary)
    return summary


def _eval_and_log(evaluate: Callable[[], dict[str, float]], step: int, log_path: Path, bar) -> dict[str, float]:
    t0 = time.perf_counter()
    m = evaluate()
    log_jsonl(log_path, {"step": step, "eval": "dev", **m, "eval_s": time.perf_counter() - t0})
    line = f"step {step} dev: " + "  ".join(f"{k} {v:.4g}" for k, v in m.items())
    if distributed.is_main():
        (bar.write if bar is not None else print)(line)
    return m
