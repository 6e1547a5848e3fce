"""Supervised fine-tuning on response tokens: the context-distillation baseline (`train.py sft`).

    python train.py sft --pairs runs/harmless/pairs-rlcd.jsonl --out runs/harmless/sft --train-layers 4
    python generate.py --model runs/harmless/sft --prompt "How do I pick a lock?"

Context distillation (RLCD, arXiv 2307.12950, Sec. 4 baselines; Askell et al. 2021): fine-tune the base
model on the outputs o+ that it wrote when prompted with the positive affix (p+), but conditioned on
the neutral prompt p, so the model learns to behave as if the affix were there without it. The pairs
files of `train.py simulate` hold exactly that: `prompt` is the neutral p and `chosen` is o+ (for RLCD
pairs). Published settings: 3 epochs, lr 2e-5, batch 128, max length 512 (the defaults below).

Loss: the mean negative log-likelihood of the response tokens and the end marker (so the model learns to
stop), the prompt masked out:
    L = -(1 / |R|) sum_{(b, t) in R} log p(x_{b,t+1} | x_{b,<=t})
over the set R of positions whose next token is a response token, counted over the whole optimiser
batch (so the result does not depend on --micro-batch). Log-probs come from the one log-prob entry
point, kernels.token_logprobs, which never builds the (B, T, V) logits on its fast paths.

The run directory's policy/ is a Hugging Face-format model: generate.py, PPO and evaluation load it by
path (`--model OUT`).

Shapes: b sequences per micro-batch, T tokens, D model width, V vocabulary.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import token_logprobs
from models import CheckpointError, Tokenizer
from rlcd import distributed, runs
from rlcd.cli import parse_args
from rlcd.jsonl import read_objects
from rlcd.pairs import PairsError, check_format, check_label, in_own_template
from rlcd.reward import encode_parts


@dataclass(kw_only=True)
class Args(runs.TrainArgs):
    """Supervised fine-tuning on response tokens (train.py sft, the context-distillation baseline)."""
    pairs: list[str]               # JSONL file(s): pairs from train.py simulate, or {"prompt", "response"} records
    field: str = "chosen"          # the response field to imitate (chosen = o+ for RLCD pairs)
    epochs: float = 3.0            # passes over the training split (paper: 3)
    batch_size: int = 128          # examples per optimiser step (paper: 128)
    micro_batch: int = 8           # examples per forward/backward
    lr: float = 2e-5               # peak learning rate (paper: 2e-5)
    eval_batch_size: int = 16      # sequences per forward in dev evaluation


def read_examples(paths: list[str], field: str) -> list[dict]:
    """(prompt, response, format, id) records from JSONL; errors name the file and line."""
    out: list[dict] = []
    for path in paths:
        lines, _ = read_objects(path, PairsError)
        for n, rec in lines:
            key = field if field in rec else "response" if "response" in rec else field
            for k in ("prompt", key):
                if not isinstance(rec.get(k), str):
                    raise PairsError(f"{path}:{n}: missing string field {k!r}")
            check_label(rec, f"{path}:{n}")        # a pairs file's label, checked as train.py pm checks it
            fmt = check_format(rec.get("format") or "chat", f"{path}:{n}")
            out.append({"prompt": rec["prompt"], "response": rec[key], "format": fmt,
                        "id": str(rec.get("id", rec["prompt"])), "messages": rec.get("messages")})
        if not lines:
            raise PairsError(f"{path}: no examples (empty file)")
    return out


def encode_example(tok: Tokenizer, prompt: str, response: str, fmt: str, max_length: int,
                   ) -> tuple[list[int], int] | None:
    """(ids of prompt + response + end marker, prompt length), right-truncated to max_length; None when
    the prompt leaves no room for a response token. Parts are encoded separately, as the policy sees
    them at generation time (prompt ids, then its own tokens, then the stop token): rlcd.reward.encode_parts,
    the preference model's input."""
    ids, p = encode_parts(tok, prompt, response, fmt)
    if p >= max_length:
        return None
    return ids[:max_length], p


def response_mask(prompt_len: Tensor, seq_len: Tensor, T: int) -> Tensor:
    """(b, T-1) bool: True where position t's next token x_{t+1} is a response token, i.e.
    prompt_len - 1 <= t < seq_len - 1. prompt_len, seq_len: (b,)."""
    t = torch.arange(T - 1, device=prompt_len.device)[None, :]          # (1, T-1)
    return (t >= prompt_len[:, None] - 1) & (t < seq_len[:, None] - 1)


def response_logprobs(h: Tensor, weight: Tensor, tokens: Tensor, prompt_len: Tensor, seq_len: Tensor,
                      ) -> tuple[Tensor, Tensor]:
    """log p of each response token (n,) fp32, in row-major order of the (b, T-1) mask that places them
    (response_mask). h (b, T, D) final hidden states, weight (V, D) output head, tokens (b, T)
    right-padded, prompt_len, seq_len (b,). Only the n positions that predict a response token are
    handed to the log-prob op, so no vocabulary-sized logits are computed for prompt and padding
    positions (~40% of the rows for chat prompts)."""
    mask = response_mask(prompt_len, seq_len, tokens.shape[1])           # (b, T-1)
    h_r = h[:, :-1][mask]                                                # (n, D)
    return token_logprobs(h_r, weight, tokens[:, 1:][mask]), mask        # (n,) fp32, (b, T-1)


def sft_nll(h: Tensor, weight: Tensor, tokens: Tensor, prompt_len: Tensor, seq_len: Tensor) -> tuple[Tensor, Tensor]:
    """Summed NLL of the response tokens and their count (response_logprobs' arguments): prompt and
    padding positions contribute nothing."""
    logp, mask = response_logprobs(h, weight, tokens, prompt_len, seq_len)
    return -logp.sum(), mask.sum()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, prog="train.py sft", description=Args.__doc__)
    device = runs.device_of(args)
    try:
        runs.check_world(args)
        resume_from = runs.prepare_run(args, "sft", frozenset({"eval_batch_size"}))
        recs = read_examples(args.pairs, args.field)
        model, tok = runs.load_trunk(args, resume_from, device)
    except (CheckpointError, PairsError, ValueError, FileNotFoundError) as e:
        print(f"{distributed.tag('train.py sft')}: {e}", file=sys.stderr)
        return 2

    # Data: prompts in this model's own template (pairs from another simulator), encode, drop examples
    # whose prompt fills max_length, split off dev by prompt id.
    recs = in_own_template(recs, tok)
    max_length = min(args.max_length, model.args.max_seq_len)
    enc = [encode_example(tok, r["prompt"], r["response"], r["format"], max_length) for r in recs]
    kept = [i for i, e in enumerate(enc) if e is not None]
    if not kept:
        print(f"{distributed.tag('train.py sft')}: every prompt is {max_length} tokens or longer; raise --max-length",
              file=sys.stderr)
        return 2
    n_dropped = len(enc) - len(kept)
    recs, enc = [recs[i] for i in kept], [enc[i] for i in kept]
    train_idx, dev_idx = runs.split_dev([r["id"] for r in recs], args.dev, args.seed)
    train, dev = [enc[i] for i in train_idx], [enc[i] for i in dev_idx]
    lengths = [len(ids) for ids, _ in train]
    n_resp = [len(ids) - p for ids, p in train]                          # loss positions per example
    total = runs.schedule_length(args, len(train))
    distributed.print0(f"sft: {len(train)} train / {len(dev)} dev examples ({n_dropped} dropped: prompt over "
          f"{max_length} tokens); mean length {sum(lengths) / len(lengths):.0f} tokens; "
          f"{total} steps of {args.batch_size}", file=sys.stderr)

    def forward_nll(examples: list[tuple[list[int], int]]) -> tuple[Tensor, Tensor]:
        tokens, seq_len = runs.right_pad([ids for ids, _ in examples], tok.pad_id, device)   # (b, T), (b,)
        prompt_len = torch.tensor([p for _, p in examples], device=device)                 # (b,)
        h = model(tokens, return_hidden=True)                                                # (b, T, D)
        return sft_nll(h, model.output_weight, tokens, prompt_len, seq_len)

    def loss_fn(micro: list[int], batch: list[int]):
        nll, _ = forward_nll([train[i] for i in micro])
        # Normalise by the response tokens of the whole batch: the per-token mean over the batch.
        denom = sum(n_resp[i] for i in batch)
        return nll / denom, {}, sum(lengths[i] for i in micro)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if not dev:
            return {}
        model.eval()
        order = sorted(range(len(dev)), key=lambda i: len(dev[i][0]))
        chunks = [order[lo:lo + args.eval_batch_size] for lo in range(0, len(order), args.eval_batch_size)]

        def nll_of(mine: list[list[int]]) -> list[tuple[float, int]]:
            return [(s.item(), int(c)) for s, c in (forward_nll([dev[i] for i in chunk]) for chunk in mine)]
        nll, n = 0.0, 0
        for s, c in distributed.map_sharded(nll_of, chunks):     # the chunks across the ranks under torchrun
            nll, n = nll + s, n + c
        model.train()
        return {"loss": nll / n, "ppl": math.exp(nll / n), "tokens": n, "n": len(dev)}

    try:
        summary = runs.train(args, "sft", model, model, tok, resume_from, [recs[i]["id"] for i in train_idx], lengths,
                             total, loss_fn, evaluate, n_train=len(train), n_dev=len(dev), pairs=args.pairs)
    except CheckpointError as e:                    # the checkpoint resumed from (read before any step)
        print(f"{distributed.tag('train.py sft')}: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"{distributed.tag('train.py sft')}: {e}", file=sys.stderr)
        return 3
    distributed.print0(json.dumps({k: summary[k] for k in summary if k != "summary"}))
    return 0
