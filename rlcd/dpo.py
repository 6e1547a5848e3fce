"""Direct preference optimisation on pairs files (`train.py dpo`): the policy learns from the RLCD pairs
themselves, with no preference model and no PPO.

    python train.py dpo --pairs runs/harmless/pairs-rlcd.jsonl --out runs/harmless/dpo --train-layers 4
    python eval.py respond --policy base=smollm2-135m-instruct dpo=runs/harmless/dpo --task harmless \\
        --split test --n-prompts 64 --out-dir runs/harmless/responses

DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7). The KL-regularised reward maximisation that PPO
approximates has the closed-form optimum pi*(y|x) = ref(y|x) exp(r(x, y) / beta) / Z(x), so a policy
defines an implicit reward
    r(x, y) = beta * (log pi(y|x) - log ref(y|x))          (up to beta log Z(x), which cancels in a pair)
and fitting that reward to the pairs with the Bradley-Terry loss trains the policy directly:
    L = -log sigma(r(x, y_w) - r(x, y_l))
      = -log sigma(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))
log pi(y|x) is the sum of the log-probs of the response tokens and the end marker, the prompt masked
out, each sequence encoded as SFT encodes it (rlcd.sft.encode_example: prompt, response and stop token
as the policy generates them) and computed through the one log-prob entry point
(rlcd.sft.response_logprobs -> kernels.token_logprobs). The loss is the preference model's
(rlcd.pm.bt_loss) on the implicit rewards, with the pair's label as its target: 1 for RLCD pairs, the
judge's probability for RLAIF pairs. --label-smoothing eps moves the target to eps + (1 - 2 eps) label,
for label 1 conservative DPO (cDPO), which assumes each label is wrong with probability eps:
    L = -(1 - eps) log sigma(d) - eps log sigma(-d),     d = r(x, y_w) - r(x, y_l)

The reference is the initial policy (--model), frozen in the precision scheme of PPO's reference
(rlcd.precision.freeze_for), so at step 0 it is the policy bit for bit: every implicit reward is exactly
0 and L = log 2. Each step the reference runs on the same micro-batches as the policy (not once ahead of
training, in other batches, which would round differently).

Logged per step (means over the step's pairs) and at each dev evaluation: loss; reward_chosen and
reward_rejected (the implicit rewards; TRL's rewards/chosen and rewards/rejected); accuracy (the implicit
rewards order the pair as its label does; a 0.5 label counts half); margin = reward_chosen -
reward_rejected and p_chosen = sigma(margin), as the preference model logs them; logp_chosen and
logp_rejected (the policy's sequence log-probs: both falling while the margin grows is DPO's known drift
away from the data); grad_norm, lr and tokens per step. The run directory is SFT's and PPO's:
OUT/policy/ is a Hugging Face-format model that generate.py, eval.py respond and PPO load by path.

API
    Args                                                 the settings of train.py dpo (runs.TrainArgs)
    sequence_logprobs(h, weight, tokens, prompt_len, seq_len) -> (N,)      log pi(y|x) per sequence
    dpo_loss(logp, ref_logp, label, beta, label_smoothing=0.0) -> (loss, metrics)
    encode_pairs(recs, tok, max_length, max_prompt_tokens) -> (pairs, kept indices, number at the limit)
    main(argv)                                           train.py dpo

Shapes: B pairs, b per micro-batch; N = 2b sequences (the b chosen rows, then the b rejected rows); T
tokens, D model width, V vocabulary.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from models import CheckpointError, Tokenizer, Transformer, load_model
from rlcd import distributed, runs
from rlcd.cli import parse_args
from rlcd.pairs import PairsError, in_own_template, read_pairs
from rlcd.pm import bt_loss, pair_metrics
from rlcd.precision import freeze_for
from rlcd.sft import encode_example, response_logprobs


@dataclass(kw_only=True)
class Args(runs.TrainArgs):
    """Direct preference optimisation of a policy on pairs files (train.py dpo)."""
    pairs: list[str]               # pairs JSONL file(s) from train.py simulate (prompt, chosen, rejected, label)
    beta: float = 0.1              # implicit reward beta log(pi / ref): higher keeps the policy nearer --model (paper: 0.1)
    label_smoothing: float = 0.0   # conservative DPO: the probability that a pair's label is wrong (0 = plain DPO)
    max_prompt_tokens: int = 192   # pairs whose prompt is longer are dropped (as simulate's and ppo's)
    batch_size: int = 64           # pairs per optimiser step (paper: 64)
    micro_batch: int = 4           # pairs per forward/backward (2 sequences each, through policy and reference)
    lr: float = 1e-6               # peak learning rate (paper: 1e-6)
    eval_batch_size: int = 8       # pairs per forward in dev evaluation


# --- the loss ------------------------------------------------------------------------------------------------
def sequence_logprobs(h: Tensor, weight: Tensor, tokens: Tensor, prompt_len: Tensor, seq_len: Tensor) -> Tensor:
    """(N,) fp32: log pi(y|x) of each sequence, the sum of its response tokens' log-probs. h (N, T, D) final
    hidden states, weight (V, D) output head, tokens (N, T) right-padded, prompt_len, seq_len (N,)."""
    logp, mask = response_logprobs(h, weight, tokens, prompt_len, seq_len)      # (n,), (N, T-1)
    # Back to their positions, then summed along each row: the same order of additions on every device
    # (an index_add would add in the order of CUDA's atomics, and resume would not be bit for bit).
    placed = torch.zeros(mask.shape, dtype=logp.dtype, device=logp.device).masked_scatter(mask, logp)   # (N, T-1)
    return placed.sum(-1)


def dpo_loss(logp: Tensor, ref_logp: Tensor, label: Tensor | float, beta: float, label_smoothing: float = 0.0,
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO loss, a mean over B pairs, and its metrics (detached means). logp, ref_logp (2B,): sequence
    log-probs under the policy and the reference, the B chosen rows then the B rejected ones; label (B,)
    or a number: P(chosen is better)."""
    B = logp.shape[0] // 2
    r = beta * (logp - ref_logp)                                              # (2B,) implicit rewards
    r_c, r_r = r[:B], r[B:]                                                   # (B,) each
    y = torch.as_tensor(label, dtype=r.dtype, device=r.device).expand(B)      # (B,)
    # cDPO: the target is the label, wrong with probability label_smoothing.
    loss = bt_loss(r_c, r_r, label_smoothing + (1 - 2 * label_smoothing) * y)
    r_c, r_r, lp = r_c.detach(), r_r.detach(), logp.detach()
    return loss, {"reward_chosen": r_c.mean(), "reward_rejected": r_r.mean(), **pair_metrics(r_c, r_r, y),
                  "logp_chosen": lp[:B].mean(), "logp_rejected": lp[B:].mean()}


# --- data ----------------------------------------------------------------------------------------------------
def encode_pairs(recs: list[dict], tok: Tokenizer, max_length: int, max_prompt_tokens: int,
                 ) -> tuple[list[tuple[list[int], list[int], int]], list[int], int]:
    """Each pair as (chosen ids, rejected ids, prompt length), each side prompt + response + end marker
    (rlcd.sft.encode_example) cut at max_length. Returns the encoded pairs, the indices in `recs` of those
    kept (a pair is dropped when its prompt is over max_prompt_tokens or leaves no room for a response
    token), and how many kept pairs reach max_length on a side (their responses may be cut)."""
    pairs, kept = [], []
    for i, r in enumerate(recs):
        c = encode_example(tok, r["prompt"], r["chosen"], r["format"], max_length)
        j = encode_example(tok, r["prompt"], r["rejected"], r["format"], max_length)
        if c is not None and j is not None and c[1] <= max_prompt_tokens:
            pairs.append((c[0], j[0], c[1]))                 # both sides encode the same prompt ids
            kept.append(i)
    return pairs, kept, sum(max(len(c), len(j)) >= max_length for c, j, _ in pairs)


def load_pairs(args: Args, tok: Tokenizer, max_length: int) -> tuple[list[tuple], list[dict], list[int], list[int]]:
    """The pairs files read and validated as train.py pm reads them, each prompt in the policy's own
    template (pairs from another simulator), encoded (encode_pairs) and split by prompt id: (encoded pairs,
    their records, train indices, dev indices). PairsError or ValueError (one line) when nothing is left."""
    recs = in_own_template(read_pairs(args.pairs), tok)
    pairs, kept, n_long = encode_pairs(recs, tok, max_length, args.max_prompt_tokens)
    if not pairs:
        raise PairsError(f"no pair has a prompt of at most --max-prompt-tokens {args.max_prompt_tokens} tokens "
                         f"that leaves room for a response in --max-length {max_length}")
    n_dropped, recs = len(recs) - len(kept), [recs[i] for i in kept]
    train_idx, dev_idx = runs.split_dev([r["id"] for r in recs], args.dev, args.seed)
    distributed.print0(f"dpo: {len(train_idx)} train / {len(dev_idx)} dev pairs from {len(args.pairs)} file(s); "
                       f"{n_dropped} dropped (prompt too long), {n_long} reach --max-length {max_length}",
                       file=sys.stderr)
    return pairs, recs, train_idx, dev_idx


# --- the stage -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, prog="train.py dpo", description=Args.__doc__)
    prog = distributed.tag("train.py dpo")          # names the rank under torchrun
    device = runs.device_of(args)
    try:
        runs.check_world(args)
        resume_from = runs.prepare_run(args, "dpo", frozenset({"eval_batch_size"}))
        policy, tok = runs.load_trunk(args, resume_from, device)
        # The reference computes as the policy does (rlcd.precision.freeze_for): at step 0 it is the policy
        # bit for bit. It is --model even when resuming (the policy then comes from the checkpoint).
        precision = runs.precision_of(args, device)
        ref = freeze_for(load_model(args.model, device=device, dtype=torch.float32, attn_impl=args.attn_impl)[0],
                         precision)
        max_length = min(args.max_length, policy.args.max_seq_len)
        pairs, recs, train_idx, dev_idx = load_pairs(args, tok, max_length)
        total = runs.schedule_length(args, len(train_idx))
    except (CheckpointError, PairsError, ValueError, FileNotFoundError) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if distributed.active() and args.fsdp:
        runs.parallelize(args, ref, ref, device)    # sharded as the policy is; else each rank holds it whole
    train, dev = [pairs[i] for i in train_idx], [pairs[i] for i in dev_idx]
    tr_y = torch.tensor([recs[i]["label"] for i in train_idx], device=device)    # (n_train,)
    dv_y = torch.tensor([recs[i]["label"] for i in dev_idx], dtype=torch.float64)
    lengths = [max(len(c), len(j)) for c, j, _ in train]
    distributed.print0(f"dpo: {total} steps of {args.batch_size} pairs, beta {args.beta}, label smoothing "
                       f"{args.label_smoothing}, precision {precision.describe()}", file=sys.stderr)

    def forward(model: Transformer, rows: list[tuple[list[int], list[int], int]]) -> tuple[Tensor, int]:
        """(2b,) sequence log-probs of b pairs under `model`, the chosen rows then the rejected ones, and
        the number of tokens."""
        tokens, seq_len = runs.right_pad([c for c, _, _ in rows] + [j for _, j, _ in rows], tok.pad_id, device)
        prompt_len = torch.tensor([p for _, _, p in rows] * 2, device=device)          # (2b,)
        h = model(tokens, return_hidden=True)                                         # (2b, T, D)
        return sequence_logprobs(h, model.output_weight, tokens, prompt_len, seq_len), int(seq_len.sum())

    def loss_fn(micro: list[int], batch: list[int]):
        rows = [train[i] for i in micro]
        logp, n_tokens = forward(policy, rows)                                        # (2b,)
        with torch.no_grad():
            ref_logp, _ = forward(ref, rows)                                          # (2b,)
        loss, metrics = dpo_loss(logp, ref_logp, tr_y[micro], args.beta, args.label_smoothing)
        w = len(micro) / len(batch)                                                   # this micro-batch's share
        return loss * w, {k: v * w for k, v in metrics.items()}, n_tokens

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        if not dev:
            return {}
        policy.eval()
        order = sorted(range(len(dev)), key=lambda i: max(len(dev[i][0]), len(dev[i][1])))
        chunks = [order[lo:lo + args.eval_batch_size] for lo in range(0, len(order), args.eval_batch_size)]

        def logps_of(mine: list[list[int]]) -> list[list[list[float]]]:
            return [[forward(m, [dev[i] for i in chunk])[0].tolist() for m in (policy, ref)] for chunk in mine]
        logp, ref_logp = torch.zeros(2, len(dev), dtype=torch.float64), torch.zeros(2, len(dev), dtype=torch.float64)
        for chunk, (lp, rp) in zip(chunks, distributed.map_sharded(logps_of, chunks)):   # across the ranks
            b = len(chunk)
            logp[:, chunk] = torch.tensor(lp, dtype=torch.float64).view(2, b)           # (chosen, rejected) x b
            ref_logp[:, chunk] = torch.tensor(rp, dtype=torch.float64).view(2, b)
        policy.train()
        loss, m = dpo_loss(logp.flatten(), ref_logp.flatten(), dv_y, args.beta, args.label_smoothing)
        return {"loss": loss.item(), **{k: v.item() for k, v in m.items()}, "n": len(dev)}

    try:
        summary = runs.train(args, "dpo", policy, policy, tok, resume_from, [recs[i]["id"] for i in train_idx],
                             lengths, total, loss_fn, evaluate, n_train=len(train), n_dev=len(dev),
                             pairs=args.pairs, reference=args.model)
    except (CheckpointError, FloatingPointError) as e:     # the checkpoint resumed from; a non-finite step
        print(f"{prog}: {e}", file=sys.stderr)
        return 3 if isinstance(e, FloatingPointError) else 2
    distributed.print0(json.dumps({k: summary[k] for k in summary if k != "summary"}))
    return 0
