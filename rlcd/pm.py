"""The Bradley-Terry preference model: training (`train.py pm`), scoring, and agreement (`eval.py pm-agreement`).

    python train.py pm --pairs runs/harmless/pairs-rlcd.jsonl --out runs/harmless/pm-rlcd --train-layers 4
    python eval.py pm-agreement --pm runs/harmless/pm-rlcd --pairs human.jsonl

A LLaMA trunk with a scalar head reads the final hidden state at the last real token of
`prompt + response + end marker` (RLCD, arXiv 2307.12950, Sec. 4 / official code: the reward is read
at the last token of `prompt + ' ' + output + '\\n\\nHuman:'`). The end marker is "\\n\\nHuman:" for the
paper's plain dialogue format and the tokenizer's turn-end token (<|im_end|> for the default model)
for chat prompts: exactly the stop token the policy emits, so PPO's token-level scoring of
prompt + response + stop token sees the same input as training did.

Loss (Bradley-Terry as binary cross-entropy with logits, as in AlpacaFarm's reward trainer, which the
official RLCD code runs): with d = r_chosen - r_rejected and label y = P(chosen is better),
    L = -[y log sigma(d - m) + (1 - y) log sigma(-(d - m))] + c * mean((r_chosen + r_rejected)^2)
y = 1 for RLCD pairs (preferred by construction), the scorer's soft probability for RLAIF pairs; the
margin m (Llama 2's margin loss) and the centering coefficient c (keeps rewards near 0) are off by default.

API
    RewardModel(trunk)                       .forward(tokens, last, start=None) -> (N,) rewards
                                             .values(tokens, start=None) -> (N, T), for PPO's value net
    bt_loss(r_chosen, r_rejected, label, margin=0.0, center_coef=0.0) -> scalar loss
    pair_metrics(r_chosen, r_rejected, label) -> {"accuracy", "p_chosen", "margin"}
    read_pairs, PairsError                   from rlcd/pairs.py (validated records; the error names the line)
    end_marker(tok, fmt), encode_parts(tok, prompt, response, fmt) -> (ids, prompt length)
    encode_input(tok, prompt, response, fmt, max_length) -> list[int]
    fp32_head(h, head) -> (...)              a scalar head in fp32 under autocast (also PPO's value head)
    score_texts(pm, tok, prompts, responses, fmt="chat", batch_size=16, ...) -> (N,) float32 rewards
    score_tokens(pm, tokens, start, last_index, normalize=False) -> (N,)    token level, for PPO
    load_reward_model(run_dir, device="cpu", dtype=float32) -> (RewardModel, Tokenizer, meta)
    main(argv)            train.py pm
    agreement_main(argv)  eval.py pm-agreement

Shapes: B pairs, N sequences (2B in training: the chosen rows, then the rejected rows), T tokens,
D model width.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models import DTYPES, CheckpointError, Tokenizer, Transformer, load_model
from models.tokenizer import TURN_END_TOKENS
from rlcd import runs
from rlcd.cli import parse_args
from rlcd.pairs import PairsError, in_own_template, read_pairs
from rlcd.tasks import FORMATS
PLAIN_END = "\n\nHuman:"      # the paper's end marker: the start of the next human turn
HEAD_FILE = "head"            # head.safetensors in the checkpoint: {"weight": (1, D), "bias": (1,)}


# --- the model -------------------------------------------------------------------------------------------
def fp32_head(h: Tensor, head: nn.Linear) -> Tensor:
    """A scalar linear head (the reward head here, PPO's shared value head) on hidden states h (..., D),
    in fp32 even under bf16 autocast: one D-vector dot product per row is free, and rewards and values
    are compared by differences, where bf16's 3 significant digits would show. Returns (...) fp32."""
    with torch.autocast(h.device.type, enabled=False):
        return F.linear(h.float(), head.weight, head.bias).squeeze(-1)


class RewardModel(nn.Module):
    """A Transformer trunk and a scalar linear head on its final (normed) hidden states."""

    def __init__(self, trunk: Transformer):
        super().__init__()
        self.trunk = trunk
        D = trunk.args.dim
        self.head = nn.Linear(D, 1, device=trunk.device, dtype=torch.float32)
        # N(0, 1/sqrt(D + 1)) weights and a zero bias, as lm-human-preferences (Ziegler et al. 2019)
        # initialises its reward head, so initial rewards have O(1) spread and no offset.
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(D + 1))
        nn.init.zeros_(self.head.bias)
        # Reward mean / std on base-policy samples (set from run.json by load_reward_model; PPO divides by it).
        self.norm_mean: float | None = None
        self.norm_std: float | None = None

    def forward(self, tokens: Tensor, last: Tensor, start: Tensor | None = None) -> Tensor:
        """tokens (N, T), last (N,) column of each row's last real token, start (N,) first real column
        for left padding (None for right padding). Returns rewards (N,) in fp32."""
        h = self.trunk(tokens, start=start, return_hidden=True)                 # (N, T, D)
        h_last = h[torch.arange(h.shape[0], device=h.device), last]            # (N, D)
        return fp32_head(h_last, self.head)                                            # (N,)

    def values(self, tokens: Tensor, start: Tensor | None = None) -> Tensor:
        """The head at every position: (N, T) fp32. PPO's value network (initialised from the preference
        model, as in the official code) reads V(s_t) here; padded positions hold garbage to be masked."""
        return fp32_head(self.trunk(tokens, start=start, return_hidden=True), self.head)   # (N, T)


def bt_loss(r_chosen: Tensor, r_rejected: Tensor, label: Tensor | float, margin: Tensor | float = 0.0,
            center_coef: float = 0.0) -> Tensor:
    """Bradley-Terry loss, mean over B pairs: BCE-with-logits of (r_c - r_r - margin) against the label
    (1.0 = chosen is better; a soft probability for RLAIF), plus center_coef * mean((r_c + r_r)^2)."""
    d = r_chosen - r_rejected - margin                                        # (B,)
    y = torch.as_tensor(label, dtype=d.dtype, device=d.device).expand_as(d)   # (B,)
    loss = F.binary_cross_entropy_with_logits(d, y)
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def pair_metrics(r_chosen: Tensor, r_rejected: Tensor, label: Tensor) -> dict[str, Tensor]:
    """Means over B pairs: accuracy (the reward orders the pair as the label does; a 0.5 label is a
    tie and counts half), p_chosen = sigma(r_c - r_r) (the paper's "mean probability" of the preferred
    answer), margin = r_c - r_r."""
    d = (r_chosen - r_rejected).float()                                       # (B,)
    y = label.to(d.device).float()
    right = torch.where(y > 0.5, (d > 0).float(), torch.where(y < 0.5, (d < 0).float(), 0.5))
    return {"accuracy": right.mean(), "p_chosen": torch.sigmoid(d).mean(), "margin": d.mean()}


# --- inputs ----------------------------------------------------------------------------------------------
def end_marker(tok: Tokenizer, fmt: str) -> str:
    """What closes a response in the preference model's input: the turn-end token the policy stops on
    (chat), or the next human turn "\\n\\nHuman:" (plain, as in the paper)."""
    if fmt == "plain":
        return PLAIN_END
    for t in TURN_END_TOKENS:
        if tok.has_chat_template and t in tok.chat_template and tok.token_id(t) is not None:
            return t
    if tok.eos_token:
        return tok.eos_token
    raise ValueError("the tokenizer has no turn-end or EOS token to end a chat response with; use format 'plain'")


def encode_parts(tok: Tokenizer, prompt: str, response: str, fmt: str) -> tuple[list[int], int]:
    """(token ids of prompt + response + end marker, number of prompt ids): the input of the preference
    model and of SFT. The three parts are encoded separately, the way the policy sees them (prompt ids,
    then generated ids, then its stop token), so no BPE merge crosses the prompt/response boundary."""
    # The paper joins plain prompts and outputs with a space ("Assistant:" + " " + output).
    sep = " " if fmt == "plain" and prompt and not prompt[-1].isspace() else ""
    p = tok.encode(prompt)
    return p + tok.encode(sep + response, add_bos=False) + tok.encode(end_marker(tok, fmt), add_bos=False), len(p)


def encode_input(tok: Tokenizer, prompt: str, response: str, fmt: str, max_length: int | None = None,
                 ) -> list[int]:
    """The preference model's input, `encode_parts` ids. Over max_length, the start of the prompt is cut:
    the reward is read at the end and both sides of a pair share the prompt."""
    ids, _ = encode_parts(tok, prompt, response, fmt)
    return ids[-max_length:] if max_length and len(ids) > max_length else ids


# --- scoring ---------------------------------------------------------------------------------------------
@torch.no_grad()
def score_ids(pm: RewardModel, seqs: list[list[int]], pad_id: int, batch_size: int = 16) -> Tensor:
    """Rewards (N,) fp32 on CPU for token-id sequences, read at each one's last token. Sequences are
    batched by length (little padding) and right-padded; the result is in the input order."""
    device = pm.head.weight.device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = torch.empty(len(seqs), dtype=torch.float32)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        tokens, lengths = runs.right_pad([seqs[i] for i in idx], pad_id, device)   # (n, T), (n,)
        out[idx] = pm(tokens, lengths - 1).float().cpu()
    return out


def score_texts(pm: RewardModel, tok: Tokenizer, prompts: list[str], responses: list[str],
                fmt: str | list[str] = "chat", batch_size: int = 16, max_length: int | None = None,
                normalize: bool = False) -> Tensor:
    """Rewards (N,) fp32 on CPU for (prompt, response) texts; `fmt` for all rows or one per row.
    normalize: (r - mean) / std with the base-policy statistics stored with the checkpoint."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    fmts = [fmt] * len(prompts) if isinstance(fmt, str) else fmt
    max_length = max_length or pm.trunk.args.max_seq_len
    seqs = [encode_input(tok, p, r, f, max_length) for p, r, f in zip(prompts, responses, fmts)]
    r = score_ids(pm, seqs, tok.pad_id, batch_size)
    return _normalize(pm, r) if normalize else r


@torch.no_grad()
def score_tokens(pm: RewardModel, tokens: Tensor, start: Tensor | None, last_index: Tensor,
                 normalize: bool = False) -> Tensor:
    """Rewards (N,) fp32 for PPO's rollouts: tokens (N, T) left-padded prompt + response + stop token,
    start (N,) first real column, last_index (N,) column of the stop token (the last real token)."""
    r = pm(tokens, last_index, start=start)
    return _normalize(pm, r) if normalize else r


def _normalize(pm: RewardModel, r: Tensor) -> Tensor:
    if pm.norm_mean is None or pm.norm_std is None:
        raise ValueError("this preference model has no normalisation statistics (trained with --norm-samples 0?)")
    return (r - pm.norm_mean) / max(pm.norm_std, 1e-8)


def load_reward_model(run_dir: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> tuple[RewardModel, Tokenizer, dict]:
    """Load a preference model written by `train.py pm`: the run directory (OUT) or its reward/
    checkpoint. Returns (model in eval mode, tokenizer, run.json). Another stage's run is an error."""
    from safetensors.torch import load_file

    ckpt, meta = runs.find_checkpoint(run_dir, "pm")
    head_file = ckpt / f"{HEAD_FILE}.safetensors"
    if not head_file.is_file():
        raise CheckpointError(f"{ckpt}: no {head_file.name} (an incomplete preference-model checkpoint)")
    trunk, tok = load_model(ckpt, device=device, dtype=dtype)
    pm = RewardModel(trunk)
    head = load_file(str(head_file))
    pm.head.load_state_dict({k: v.float() for k, v in head.items()})
    stats = meta.get("reward_norm") or {}
    pm.norm_mean, pm.norm_std = stats.get("mean"), stats.get("std")
    return pm.eval(), tok, meta


# --- training: train.py pm -------------------------------------------------------------------------------
@dataclass(kw_only=True)
class Args(runs.TrainArgs):
    """Train a Bradley-Terry preference model on pairs files (train.py pm)."""
    pairs: list[str]                   # pairs JSONL file(s) from train.py simulate (prompt, chosen, rejected, label)
    margin: float = 0.0                # subtract this margin from r_chosen - r_rejected in the loss
    center_coef: float = 0.0           # add center_coef * mean((r_chosen + r_rejected)^2) to the loss
    eval_batch_size: int = 16          # sequences per forward in dev evaluation and scoring
    norm_samples: int = 64             # base-policy responses for the reward mean/std stored for PPO (0 = skip)
    norm_policy: str | None = None     # policy sampled for the statistics (default: --model)
    norm_max_new_tokens: int = 128     # response length cap for those samples
    norm_temperature: float = 1.0      # sampling temperature for those samples (RLCD's PPO samples at 1)


# Settings that only affect the statistics computed after training (and dev scoring): free to change on --resume.
NORM_SETTINGS = frozenset({"norm_samples", "norm_policy", "norm_max_new_tokens", "norm_temperature",
                           "eval_batch_size"})


def _encode_pairs(recs: list[dict], tok: Tokenizer, max_length: int) -> tuple[list[list[int]], list[list[int]], int]:
    chosen = [encode_input(tok, r["prompt"], r["chosen"], r["format"]) for r in recs]
    rejected = [encode_input(tok, r["prompt"], r["rejected"], r["format"]) for r in recs]
    n_cut = sum(len(c) > max_length or len(r) > max_length for c, r in zip(chosen, rejected))
    return [c[-max_length:] for c in chosen], [r[-max_length:] for r in rejected], n_cut


def evaluate_pairs(pm: RewardModel, chosen: list[list[int]], rejected: list[list[int]], labels: Tensor,
                   pad_id: int, batch_size: int) -> dict[str, float]:
    """Dev metrics: BT loss (plain, no margin or centering), accuracy, mean P(chosen), mean margin."""
    r = score_ids(pm, chosen + rejected, pad_id, batch_size)                 # (2B,)
    r_c, r_r = r[:len(chosen)], r[len(chosen):]
    m = {"loss": bt_loss(r_c.double(), r_r.double(), labels.double()), **pair_metrics(r_c, r_r, labels)}
    return {k: float(v) for k, v in m.items()} | {"n": len(chosen)}


def reward_norm_stats(pm: RewardModel, tok: Tokenizer, recs: list[dict], args: Args,
                      device: torch.device) -> dict:
    """Mean and std of the reward on responses sampled from the base policy, for PPO's normalised reward
    (reward normalised to mean 0 / std 1 on policy samples, as in lm-human-preferences)."""
    from models.generation import SamplingParams, generate_texts

    prompts = sorted({(r["prompt"], r["format"]) for r in recs})
    random.Random(args.seed).shuffle(prompts)
    prompts = prompts[:args.norm_samples]
    name = args.norm_policy or args.model
    policy, ptok = load_model(name, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    params = SamplingParams(max_new_tokens=args.norm_max_new_tokens, temperature=args.norm_temperature)
    t0 = time.perf_counter()
    gens = generate_texts(policy, ptok, [p for p, _ in prompts], params, batch_size=args.eval_batch_size,
                          seed=args.seed, progress=args.progress)
    del policy
    r = score_texts(pm, tok, [p for p, _ in prompts], [g["text"] for g in gens], [f for _, f in prompts],
                    args.eval_batch_size, min(args.max_length, pm.trunk.args.max_seq_len))
    return {"mean": r.mean().item(), "std": r.std().item() if len(r) > 1 else 1.0, "n": len(r),
            "finished": sum(g["finished"] for g in gens) / len(gens), "policy": name,
            "max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, prog="train.py pm", description=Args.__doc__)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    try:
        resume_from = runs.prepare_run(args, "pm", NORM_SETTINGS)
        recs = read_pairs(args.pairs)
    except (CheckpointError, PairsError) as e:
        print(f"train.py pm: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)

    # Data: a dev split by prompt id, the same for RLCD and RLAIF files over the same prompts.
    train_idx, dev_idx = runs.split_dev([r["id"] for r in recs], args.dev, args.seed)
    train, dev = [recs[i] for i in train_idx], [recs[i] for i in dev_idx]

    # Model: trunk + head, from the checkpoint when resuming.
    if resume_from is None:
        trunk, tok = load_model(args.model, device=device, dtype=torch.float32, attn_impl=args.attn_impl)
        torch.manual_seed(args.seed)
        pm = RewardModel(trunk)
    else:
        pm, tok, _ = load_reward_model(resume_from, device=device)
        pm.trunk.set_attn_impl(args.attn_impl)
    train, dev = in_own_template(train, tok), in_own_template(dev, tok)     # pairs from another simulator
    runs.freeze_lower_layers(pm.trunk, args.train_layers)
    pm.trunk.gradient_checkpointing = args.grad_checkpointing
    pm.train()

    max_length = min(args.max_length, pm.trunk.args.max_seq_len)
    tr_c, tr_r, cut = _encode_pairs(train, tok, max_length)
    dv_c, dv_r, cut_dev = _encode_pairs(dev, tok, max_length)
    tr_y = torch.tensor([r["label"] for r in train], device=device)        # (n_train,)
    dv_y = torch.tensor([r["label"] for r in dev])
    lengths = [max(len(c), len(r)) for c, r in zip(tr_c, tr_r)]
    total = runs.schedule_length(args, len(train))
    print(f"pm: {len(train)} train / {len(dev)} dev pairs from {len(args.pairs)} file(s); {cut + cut_dev} "
          f"pairs over {max_length} tokens were cut at the start; mean length "
          f"{sum(lengths) / len(lengths):.0f} tokens; {total} steps of {args.batch_size} pairs", file=sys.stderr)

    params = [p for p in pm.parameters() if p.requires_grad]
    optimizer, scheduler = runs.make_trainer(list(pm.named_parameters()), args, device, total)
    fingerprint = runs.data_fingerprint([r["id"] for r in train], args)
    start = 0 if resume_from is None else runs.load_trainer_state(resume_from, optimizer, scheduler, fingerprint)
    meta = runs.run_meta("pm", args, total, n_train=len(train), n_dev=len(dev), pairs=args.pairs,
                         end_markers={f: end_marker(tok, f) for f in FORMATS},
                         n_trainable=sum(p.numel() for p in params))
    ckpt = out / runs.CKPT_DIRS["pm"]

    def loss_fn(micro: list[int], batch: list[int]):
        b = len(micro)
        tokens, lens = runs.right_pad([tr_c[i] for i in micro] + [tr_r[i] for i in micro], tok.pad_id, device)
        r = pm(tokens, lens - 1)                                             # (2b,): chosen rows, then rejected
        r_c, r_r, y = r[:b], r[b:], tr_y[micro]
        loss = bt_loss(r_c, r_r, y, args.margin, args.center_coef)
        w = b / len(batch)                                                   # this micro-batch's share
        metrics = {k: v * w for k, v in pair_metrics(r_c.detach(), r_r.detach(), y).items()}
        return loss * w, metrics, int(lens.sum())

    def evaluate() -> dict[str, float]:
        pm.eval()
        m = evaluate_pairs(pm, dv_c, dv_r, dv_y, tok.pad_id, args.eval_batch_size) if dev else {}
        pm.train()
        return m

    def save(step: int) -> None:
        runs.save_checkpoint(ckpt, pm.trunk, tok, meta, optimizer, scheduler, step, fingerprint,
                             {HEAD_FILE: pm.head.state_dict()})

    summary = runs.train_loop(args, params, optimizer, scheduler, len(train), lengths, start, total, device,
                              loss_fn, evaluate, save, out / runs.METRICS, "pm")

    # Reward statistics on base-policy samples, once the schedule is complete (PPO normalises with them).
    if summary["step"] == total and args.norm_samples > 0:
        pm.eval()
        stats = reward_norm_stats(pm, tok, train + dev, args, device)
        run = runs.read_run_meta(ckpt)
        runs.write_json_atomic(ckpt / runs.RUN_JSON, {**run, "reward_norm": stats})
        runs.log_jsonl(out / runs.METRICS, {"step": summary["step"], "reward_norm": stats})
        print(f"pm: reward on {stats['n']} base-policy samples: mean {stats['mean']:.4f} std {stats['std']:.4f}",
              file=sys.stderr)
    print(json.dumps({k: summary[k] for k in summary if k != "summary"}))
    return 0


# --- evaluation: eval.py pm-agreement --------------------------------------------------------------------
@dataclass
class AgreementArgs:
    """Accuracy and mean chosen-probability of a preference model on a pairs file (eval.py pm-agreement)."""
    pm: str                            # preference-model run directory (OUT of train.py pm) or its reward/
    pairs: list[str]                   # JSONL file(s) with prompt, chosen, rejected (chosen = the preferred one); "human": the PyRIT pairs
    format: str | None = None          # chat or plain for every record, its prompt re-rendered from its messages with the PM's tokenizer (default: each record's own)
    batch_size: int = 16               # sequences per forward
    max_length: int = 512              # tokens per sequence (the start of the prompt is cut beyond)
    device: str = "cpu"                # cpu or cuda
    dtype: str = "float32"             # float32 or bfloat16
    out: str | None = None             # also write the metrics as JSON here


def agreement_main(argv: list[str] | None = None) -> int:
    from rlcd.evaluate import length_split, resolve_pairs

    args = parse_args(AgreementArgs, argv, prog="eval.py pm-agreement", description=AgreementArgs.__doc__)
    if args.dtype not in DTYPES:
        raise SystemExit(f"eval.py pm-agreement: --dtype must be one of {sorted(DTYPES)}")
    try:
        paths = resolve_pairs(args.pairs)
        recs = read_pairs(paths, format_override=args.format)
        pm, tok, meta = load_reward_model(args.pm, args.device, DTYPES[args.dtype])
    except (CheckpointError, PairsError) as e:
        print(f"eval.py pm-agreement: {e}", file=sys.stderr)
        return 2
    # Prompts in the PM's own template (and a forced format: the human pairs are stored in plain form; a
    # PM trained on chat pairs should see them as chat).
    recs = in_own_template(recs, tok, args.format)
    max_length = min(args.max_length, pm.trunk.args.max_seq_len)
    chosen, rejected, n_cut = _encode_pairs(recs, tok, max_length)
    labels = torch.tensor([r["label"] for r in recs])
    r = score_ids(pm, chosen + rejected, tok.pad_id, args.batch_size)       # (2B,) as evaluate_pairs
    r_c, r_r = r[:len(chosen)], r[len(chosen):]
    m = {k: float(v) for k, v in {"loss": bt_loss(r_c.double(), r_r.double(), labels.double()),
                                  **pair_metrics(r_c, r_r, labels)}.items()} | {"n": len(chosen)}
    # Per-pair correctness as pair_metrics counts it, split by whether the chosen response is the shorter
    # or the longer one: a PM that only prefers brevity (refusals are short) shows up there.
    d = r_c - r_r
    right = torch.where(labels > 0.5, (d > 0).float(), torch.where(labels < 0.5, (d < 0).float(), 0.5))
    m |= length_split(recs, right.tolist())
    f = lambda v: "-" if v is None else f"{v:.4f}"   # noqa: E731
    print(f"{args.pm}: {m['n']} pairs  accuracy {m['accuracy']:.4f}  mean P(chosen) {m['p_chosen']:.4f}  "
          f"mean margin {m['margin']:.4f}  loss {m['loss']:.4f}" + (f"  ({n_cut} cut to {max_length} tokens)"
                                                                     if n_cut else "")
          + f"\n  chosen shorter: {m['n_chosen_shorter']} pairs, accuracy {f(m['accuracy_chosen_shorter'])}; "
          f"chosen longer: {m['n_chosen_longer']} pairs, accuracy {f(m['accuracy_chosen_longer'])}")
    if args.out:
        runs.write_json_atomic(Path(args.out), {**m, "pm": args.pm, "pairs": paths, "step": meta.get("step"),
                                                "format": args.format})
    return 0
