"""Training the Bradley-Terry preference model (`train.py pm`), and measuring a trained one on labelled
pairs (`eval.py pm-agreement`). The model itself, its input and its scoring are in rlcd/reward.py.

    python train.py pm --pairs runs/harmless/pairs-rlcd.jsonl --out runs/harmless/pm-rlcd --train-layers 4
    python eval.py pm-agreement --pm runs/harmless/pm-rlcd --pairs human --format chat

Loss (Bradley-Terry as binary cross-entropy with logits, as in AlpacaFarm's reward trainer, which the
official RLCD code runs): with d = r_chosen - r_rejected and label y = P(chosen is better),
    L = -[y log sigma(d - m) + (1 - y) log sigma(-(d - m))] + c * mean((r_chosen + r_rejected)^2)
y = 1 for RLCD pairs (preferred by construction), the scorer's soft probability for RLAIF pairs; the
margin m (Llama 2's margin loss) and the centering coefficient c (keeps rewards near 0) are off by default.
With --length-head w (ODIN, Chen et al. 2024, arXiv 2402.07319), a second head r_L beside the reward head
r_Q: the loss above is taken on r_Q + r_L, plus w * (|corr(r_Q, n)| - corr(r_L, n) + |cos(W_Q, W_L)|) over
each micro-batch's sequences (at least 4 pairs; the term depends on --micro-batch). The length cue goes to
r_L, and the reward is r_Q alone (what every scorer and PPO read; the length head is saved only for resuming). n is each response's token count, negated where
the training pairs prefer the shorter response more often than the longer: ODIN's data rewarded length,
and on pairs that reward brevity a length head made to rise with length would work against the labels
and leave the reward head to carry the cue.
Each pair is encoded as rlcd.reward.encode_input (prompt + response + end marker), the reward read at
the last token. After the schedule, the reward's mean and std on base-policy samples are stored in
run.json for PPO's normalised reward.

pm-agreement. A trained preference model on labelled pairs, each prompt re-rendered in the PM's own
template: the metrics of its dev evaluation (evaluate_pairs: BT loss, accuracy, mean P(chosen), mean
margin), the accuracy split by whether the chosen response is the shorter or the longer one
(rlcd.judge.length_split, as eval.py judge-agreement reports it for a judge) and by whether both responses
answer or one declines (rlcd.judge.form_split).

API
    bt_loss(r_chosen, r_rejected, label, margin=0.0, center_coef=0.0) -> scalar loss
    disentangle_loss(r, r_len, n_tokens, w, w_len) -> scalar     ODIN's terms (--length-head)
    pair_correct(d, label) -> (B,); pair_metrics(r_chosen, r_rejected, label) -> {"accuracy", "p_chosen", "margin"}
    encode_pairs(recs, tok, max_length) -> (chosen ids, rejected ids, number cut)
    evaluate_pairs(pm, chosen, rejected, labels, pad_id, batch_size) -> (metrics, per-pair correctness)
    main(argv)            train.py pm
    pm_agreement_main(argv)   eval.py pm-agreement

Shapes: B pairs, N sequences (2B in training: the chosen rows, then the rejected rows), T tokens.
"""
from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from models import CheckpointError, Tokenizer, load_model
from models.checkpoint import resolve
from rlcd import distributed, runs
from rlcd.checkpoints import CKPT_DIRS, RUN_JSON, read_run_meta
from rlcd.cli import parse_args
from rlcd.judge import cluster_ci, form_split, length_split, request_key
from rlcd.jsonl import write_json_atomic
from rlcd.pairs import PairsError, in_own_template, length_balanced, length_matched, read_pairs, resolve_pairs
from rlcd.precision import resolve as resolve_precision
from rlcd.reward import (HEAD_FILE, LENGTH_HEAD_FILE, RewardModel, encode_input, end_marker, load_reward_model,
                         score_ids, score_texts)
from rlcd.tasks import FORMATS


@dataclass(kw_only=True)
class Args(runs.TrainArgs):
    """Train a Bradley-Terry preference model on pairs files (train.py pm)."""
    pairs: list[str]                   # pairs JSONL file(s) from train.py simulate (prompt, chosen, rejected, label)
    balance_length: int = 0            # train on a length-balanced subsample: bucket width in characters (rlcd.pairs.length_balanced); 0 = every pair
    match_length: bool = False         # cut the longer response of each train pair to the shorter's length in tokens (rlcd.pairs.length_matched)
    margin: float = 0.0                # subtract this margin from r_chosen - r_rejected in the loss
    center_coef: float = 0.0           # add center_coef * mean((r_chosen + r_rejected)^2) to the loss
    length_head: float = 0.0           # ODIN: a second head takes the length cue, the reward's kept uncorrelated with length over each micro-batch, at this weight (disentangle_loss; 0 = off)
    eval_batch_size: int = 16          # sequences per forward in dev evaluation and scoring
    norm_samples: int = 64             # base-policy responses for the reward mean/std stored for PPO (0 = skip)
    norm_policy: str | None = None     # policy sampled for the statistics (default: --model)
    norm_max_new_tokens: int = 128     # response length cap for those samples
    norm_temperature: float = 1.0      # sampling temperature for those samples (RLCD's PPO samples at 1)


# Settings that only affect the statistics computed after training (and dev scoring): free to change on --resume.
NORM_SETTINGS = frozenset({"norm_samples", "norm_policy", "norm_max_new_tokens", "norm_temperature",
                           "eval_batch_size"})


# --- the loss and its metrics ----------------------------------------------------------------------------
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


def _corr(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation of two (N,) tensors; 0 where either is constant."""
    xc, yc = x - x.mean(), y - y.mean()
    return (xc * yc).sum() / (xc.norm() * yc.norm()).clamp_min(1e-8)


def disentangle_loss(r: Tensor, r_len: Tensor, n_tokens: Tensor, w: Tensor, w_len: Tensor) -> Tensor:
    """ODIN's disentangling terms (Chen et al. 2024) over N sequences: |corr(r, n)| - corr(r_len, n) +
    |cos(w, w_len)|, with r (N,) the reward head's outputs, r_len (N,) the length head's, n_tokens (N,) the
    responses' lengths in the direction the labels favour (token counts, negated where shorter wins) and w,
    w_len the two heads' weights (1, D): the reward is pushed off length, the length head onto it, and the
    two heads apart. Bounded in [-1, 2]."""
    n = n_tokens.to(r.dtype)
    cos = F.cosine_similarity(w.flatten(), w_len.flatten(), dim=0)
    return _corr(r, n).abs() - _corr(r_len, n) + cos.abs()


def pair_correct(d: Tensor, label: Tensor) -> Tensor:
    """(B,) float: 1 where the reward difference d = r_c - r_r orders the pair as the label does, else 0;
    a 0.5 label is a tie and counts half."""
    y = label.to(d.device).float()
    return torch.where(y > 0.5, (d > 0).float(), torch.where(y < 0.5, (d < 0).float(), 0.5))


def pair_metrics(r_chosen: Tensor, r_rejected: Tensor, label: Tensor) -> dict[str, Tensor]:
    """Means over B pairs: accuracy (pair_correct), p_chosen = sigma(r_c - r_r) (the paper's "mean
    probability" of the preferred answer), margin = r_c - r_r."""
    d = (r_chosen - r_rejected).float()                                       # (B,)
    return {"accuracy": pair_correct(d, label).mean(), "p_chosen": torch.sigmoid(d).mean(), "margin": d.mean()}


# --- data and evaluation ---------------------------------------------------------------------------------
def encode_pairs(recs: list[dict], tok: Tokenizer, max_length: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Both sides of each pair as the PM's input (encode_input), cut at the start to max_length tokens;
    and how many pairs were cut."""
    chosen = [encode_input(tok, r["prompt"], r["chosen"], r["format"]) for r in recs]
    rejected = [encode_input(tok, r["prompt"], r["rejected"], r["format"]) for r in recs]
    n_cut = sum(len(c) > max_length or len(r) > max_length for c, r in zip(chosen, rejected))
    return [c[-max_length:] for c in chosen], [r[-max_length:] for r in rejected], n_cut


def evaluate_pairs(pm: RewardModel, chosen: list[list[int]], rejected: list[list[int]], labels: Tensor,
                   pad_id: int, batch_size: int) -> tuple[dict[str, float], list[float]]:
    """Metrics on encoded pairs (dev evaluation, eval.py pm-agreement): BT loss (plain, no margin or
    centering), accuracy, mean P(chosen), mean margin, n; and each pair's pair_correct. Under torchrun
    the pairs are scored across the ranks (distributed.map_sharded) and every rank gets all the results."""
    def score(idx: list[int]) -> list[tuple[float, float]]:
        r = score_ids(pm, [chosen[i] for i in idx] + [rejected[i] for i in idx], pad_id, batch_size)   # (2b,)
        return list(zip(r[:len(idx)].tolist(), r[len(idx):].tolist()))
    r = torch.tensor(distributed.map_sharded(score, range(len(chosen))), dtype=torch.float32).view(-1, 2)   # (B, 2)
    r_c, r_r = r[:, 0], r[:, 1]                                              # (B,) each
    m = {"loss": bt_loss(r_c.double(), r_r.double(), labels.double()), **pair_metrics(r_c, r_r, labels)}
    return {k: float(v) for k, v in m.items()} | {"n": len(chosen)}, pair_correct(r_c - r_r, labels).tolist()


def reward_norm_stats(pm: RewardModel, tok: Tokenizer, recs: list[dict], args: Args,
                      device: torch.device) -> dict:
    """Mean and std of the reward on responses sampled from the base policy, for PPO's normalised reward
    (reward normalised to mean 0 / std 1 on policy samples, as in lm-human-preferences).

    Under torchrun the prompts are cut into chunks of --eval-batch-size, each sampled with its own seed
    (seed + chunk index) and dealt to the ranks, so the samples do not depend on the number of ranks
    (N > 1; one process samples them all from one seeded stream, as before)."""
    from models.generation import SamplingParams, generate_texts

    prompts = sorted({(r["prompt"], r["format"]) for r in recs})
    random.Random(args.seed).shuffle(prompts)
    prompts = prompts[:args.norm_samples]
    name = args.norm_policy or args.model
    policy, ptok = load_model(name, device=device, dtype=runs.precision_of(args, device).inference_dtype)
    params = SamplingParams(max_new_tokens=args.norm_max_new_tokens, temperature=args.norm_temperature)
    max_length = min(args.max_length, pm.trunk.args.max_seq_len)
    t0 = time.perf_counter()
    if not distributed.active():
        gens = generate_texts(policy, ptok, [p for p, _ in prompts], params, batch_size=args.eval_batch_size,
                              seed=args.seed, progress=args.progress)
        del policy
        r = score_texts(pm, tok, [p for p, _ in prompts], [g["text"] for g in gens], [f for _, f in prompts],
                        args.eval_batch_size, max_length)
        finished = [g["finished"] for g in gens]
    else:
        bs = args.eval_batch_size
        chunks = list(enumerate(prompts[lo:lo + bs] for lo in range(0, len(prompts), bs)))

        def sample_and_score(mine: list) -> list[list[tuple[float, bool]]]:
            out = []
            for k, chunk in mine:                 # one forward of the (possibly sharded) PM per chunk
                gens = generate_texts(policy, ptok, [p for p, _ in chunk], params, batch_size=bs,
                                      seed=args.seed + k, progress=False)
                r = score_texts(pm, tok, [p for p, _ in chunk], [g["text"] for g in gens], [f for _, f in chunk],
                                bs, max_length)
                out.append(list(zip(r.tolist(), [g["finished"] for g in gens])))
            return out
        results = [x for part in distributed.map_sharded(sample_and_score, chunks) for x in part]
        del policy
        r = torch.tensor([x for x, _ in results])
        finished = [f for _, f in results]
    return {"mean": r.mean().item(), "std": r.std().item() if len(r) > 1 else 1.0, "n": len(r),
            "finished": sum(finished) / len(finished), "policy": name,
            "max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, prog="train.py pm", description=Args.__doc__)
    device = runs.device_of(args)
    try:
        runs.check_world(args)
        resume_from = runs.prepare_run(args, "pm", NORM_SETTINGS)
        micro = min(args.micro_batch, args.batch_size // distributed.world_size())    # pairs per forward on a rank
        if args.length_head and micro < 4:
            raise ValueError(f"--length-head: its correlations are taken over each micro-batch's pairs, {micro} "
                             f"here; --micro-batch (per rank) 4 or more")
        recs = read_pairs(args.pairs)
        # Data: a dev split by prompt id, the same for RLCD and RLAIF files over the same prompts.
        train_idx, dev_idx = runs.split_dev([r["id"] for r in recs], args.dev, args.seed)
        if args.norm_policy is not None and args.norm_samples > 0:
            resolve(args.norm_policy)           # sampled after training: a bad name fails now, not then
        # Model: trunk + head; when resuming, checkpoints.checkpointing restores the head with the optimiser state.
        trunk, tok = runs.load_trunk(args, resume_from, device)
    except (CheckpointError, PairsError, ValueError, FileNotFoundError) as e:
        print(f"{distributed.tag('train.py pm')}: {e}", file=sys.stderr)
        return 2
    train, dev = [recs[i] for i in train_idx], [recs[i] for i in dev_idx]
    if args.balance_length:
        n_all = len(train)
        train = [train[i] for i in length_balanced(train, args.balance_length, args.seed)]
        distributed.print0(f"pm: --balance-length {args.balance_length}: {len(train)} of {n_all} train pairs kept "
                           f"(the preferred response as often the longer as the shorter)", file=sys.stderr)
    if args.match_length:
        train = length_matched(train, tok)
        distributed.print0("pm: --match-length: the longer response of each train pair cut to the shorter's "
                           "length in tokens", file=sys.stderr)
    torch.manual_seed(args.seed)
    pm = RewardModel(trunk, length_head=bool(args.length_head))
    train, dev = in_own_template(train, tok), in_own_template(dev, tok)     # pairs from another simulator

    max_length = min(args.max_length, trunk.args.max_seq_len)
    tr_c, tr_r, cut = encode_pairs(train, tok, max_length)
    dv_c, dv_r, cut_dev = encode_pairs(dev, tok, max_length)
    tr_y = torch.tensor([r["label"] for r in train], device=device)        # (n_train,)
    dv_y = torch.tensor([r["label"] for r in dev])
    lengths = [max(len(c), len(r)) for c, r in zip(tr_c, tr_r)]
    if args.length_head:                    # each side's response tokens, the length the second head takes,
        n_resp = torch.tensor([[len(tok.encode(r[k], add_bos=False)) for k in ("chosen", "rejected")] for r in train],
                              device=device, dtype=torch.float32)              # (n_train, 2)
        d = (n_resp[:, 0] - n_resp[:, 1]) * (tr_y - 0.5)                       # > 0: the preferred side is longer
        n_resp = n_resp if (d > 0).sum() >= (d < 0).sum() else -n_resp         # signed the way the labels lean
        distributed.print0(f"pm: --length-head {args.length_head}: the preferred response is the longer in "
                           f"{int((d > 0).sum())} of {len(train)} train pairs, the shorter in {int((d < 0).sum())}",
                           file=sys.stderr)
    total = runs.schedule_length(args, len(train))
    distributed.print0(f"pm: {len(train)} train / {len(dev)} dev pairs from {len(args.pairs)} file(s); {cut + cut_dev} "
          f"pairs over {max_length} tokens were cut at the start; mean length "
          f"{sum(lengths) / len(lengths):.0f} tokens; {total} steps of {args.batch_size} pairs", file=sys.stderr)

    def loss_fn(micro: list[int], batch: list[int]):
        b = len(micro)
        tokens, lens = runs.right_pad([tr_c[i] for i in micro] + [tr_r[i] for i in micro], tok.pad_id, device)
        y = tr_y[micro]
        if args.length_head:
            r_q, r_l = pm(tokens, lens - 1, both=True)                        # (2b,) each
            r = r_q + r_l
            n = torch.cat([n_resp[micro, 0], n_resp[micro, 1]])               # (2b,)
            odin = disentangle_loss(r_q, r_l, n, pm.head.weight, pm.length_head.weight)
            extra = {"length_corr": _corr(r_q.detach(), n), "length_head_corr": _corr(r_l.detach(), n)}
        else:
            r, odin, extra = pm(tokens, lens - 1), 0.0, {}                    # (2b,): chosen rows, then rejected
        r_c, r_r = r[:b], r[b:]
        loss = bt_loss(r_c, r_r, y, args.margin, args.center_coef) + args.length_head * odin
        w = b / len(batch)                                                   # this micro-batch's share
        metrics = {k: v * w for k, v in (pair_metrics(r_c.detach(), r_r.detach(), y) | extra).items()}
        return loss * w, metrics, int(lens.sum())

    def evaluate() -> dict[str, float]:
        pm.eval()
        m = evaluate_pairs(pm, dv_c, dv_r, dv_y, tok.pad_id, args.eval_batch_size)[0] if dev else {}
        pm.train()
        return m

    try:
        summary = runs.train(args, "pm", pm, trunk, tok, resume_from, [r["id"] for r in train], lengths, total,
                             loss_fn, evaluate, {HEAD_FILE: pm.head} | ({LENGTH_HEAD_FILE: pm.length_head}
                                                 if args.length_head else {}), n_train=len(train), n_dev=len(dev),
                             pairs=args.pairs, end_markers={f: end_marker(tok, f) for f in FORMATS},
                             formats=sorted({r["format"] for r in recs}))
    except CheckpointError as e:                    # the checkpoint resumed from (read before any step)
        print(f"{distributed.tag('train.py pm')}: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"{distributed.tag('train.py pm')}: {e}", file=sys.stderr)
        return 3

    # Reward statistics on base-policy samples, once the schedule is complete (PPO normalises with them).
    if summary["step"] == total and args.norm_samples > 0:
        pm.eval()
        with runs.autocast(args, device):          # the precision PPO scores in (rlcd.precision.freeze_for)
            stats = reward_norm_stats(pm, tok, train + dev, args, device)
        ckpt = Path(args.out) / CKPT_DIRS["pm"]
        if distributed.is_main():
            run = read_run_meta(ckpt)
            write_json_atomic(ckpt / RUN_JSON, {**run, "reward_norm": stats})
        runs.log_jsonl(ckpt.parent / runs.METRICS, {"step": summary["step"], "reward_norm": stats})
        distributed.print0(f"pm: reward on {stats['n']} base-policy samples: mean {stats['mean']:.4f} "
                           f"std {stats['std']:.4f}",
              file=sys.stderr)
    distributed.barrier()                           # run.json is complete on every rank's return
    distributed.print0(json.dumps({k: summary[k] for k in summary if k != "summary"}))
    return 0


# --- eval.py pm-agreement -----------------------------------------------------------------------------
@dataclass
class PMAgreementArgs:
    """Accuracy and mean chosen-probability of a preference model on a pairs file (eval.py pm-agreement)."""
    pm: str                            # preference-model run directory (OUT of train.py pm) or its reward/
    pairs: list[str]                   # JSONL file(s) with prompt, chosen, rejected (chosen = the preferred one); "human": the PyRIT pairs
    format: str | None = None          # chat or plain for every record, its prompt re-rendered from its messages with the PM's tokenizer (default: each record's own)
    batch_size: int = 16               # sequences per forward
    max_length: int = 512              # tokens per sequence (the start of the prompt is cut beyond)
    device: str = "cpu"                # cpu or cuda
    precision: str = "auto"            # auto, fp32 or bf16 (rlcd.precision): the PM's weights
    out: str | None = None             # also write the metrics as JSON here


def pm_agreement_main(argv: list[str] | None = None) -> int:
    args = parse_args(PMAgreementArgs, argv, prog="eval.py pm-agreement", description=PMAgreementArgs.__doc__)
    try:
        dtype = resolve_precision(args.precision, args.device).inference_dtype
        paths = resolve_pairs(args.pairs)
        recs = read_pairs(paths, format_override=args.format)
        pm, tok, meta = load_reward_model(args.pm, args.device, dtype)
    except (CheckpointError, ValueError) as e:                                   # PairsError is a ValueError
        print(f"eval.py pm-agreement: {e}", file=sys.stderr)
        return 2
    # Prompts in the PM's own template (and a forced format: the human pairs are stored in plain form; a
    # PM trained on chat pairs should see them as chat).
    recs = in_own_template(recs, tok, args.format)
    max_length = min(args.max_length, pm.trunk.args.max_seq_len)
    chosen, rejected, n_cut = encode_pairs(recs, tok, max_length)
    labels = torch.tensor([r["label"] for r in recs])
    m, right = evaluate_pairs(pm, chosen, rejected, labels, tok.pad_id, args.batch_size)
    # Per-pair correctness split by whether the chosen response is the shorter or the longer one (a PM that
    # only prefers brevity, refusals being short, shows up there) and by whether one response declines.
    m |= length_split(recs, right) | form_split(recs, right)
    m["accuracy_ci"] = cluster_ci(right, [request_key(r) for r in recs])      # resampling whole requests
    f = lambda v: "-" if v is None else f"{v:.4f}"   # noqa: E731
    print(f"{args.pm}: {m['n']} pairs  accuracy {m['accuracy']:.4f} [{m['accuracy_ci'][0]:.3f}, "
          f"{m['accuracy_ci'][1]:.3f}]  mean P(chosen) {m['p_chosen']:.4f}  "
          f"mean margin {m['margin']:.4f}  loss {m['loss']:.4f}" + (f"  ({n_cut} cut to {max_length} tokens)"
                                                                     if n_cut else "")
          + f"\n  chosen shorter: {m['n_chosen_shorter']} pairs, accuracy {f(m['accuracy_chosen_shorter'])}; "
          f"chosen longer: {m['n_chosen_longer']} pairs, accuracy {f(m['accuracy_chosen_longer'])}"
          f"\n  both answer: {m['n_both_answer']} pairs, accuracy {f(m['accuracy_both_answer'])}; "
          f"one declines: {m['n_one_declines']} pairs, accuracy {f(m['accuracy_one_declines'])}")
    if args.out:
        write_json_atomic(args.out, {**m, "pm": args.pm, "pairs": paths, "step": meta.get("step"),
                                     "format": args.format})
    return 0
