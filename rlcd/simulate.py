"""Simulate preference pairs for RLCD and its baselines (arXiv 2307.12950, Sec. 3 and 4), and summarise
a pairs file.

    python train.py simulate --task harmless --method rlcd --n-prompts 256 --out runs/harmless/pairs-rlcd.jsonl
    python train.py simulate --task harmless --method rlaif --n-prompts 256 --out runs/harmless/pairs-rlaif.jsonl
    python train.py stats runs/harmless/pairs-rlcd.jsonl runs/harmless/pairs-rlaif.jsonl

Methods (the official code: facebookresearch/RLCD scripts/simulate_preference_data.py)
    rlcd          o+ sampled from p+, o- from p- (rlcd.tasks.contrastive_pair); chosen = o+,
                  rejected = o-, label 1.0 by construction. No scorer.
    rlaif         two i.i.d. samples from the neutral prompt p, judged; the first sample is stored as
                  "chosen", the second as "rejected", label = P(first better). The label is soft and
                  either side may be better.
    rlcd-rescore  pairs from p+ / p- as in rlcd (chosen = o+, rejected = o-), label = P(o+ better)
                  from the same judge.
    rlcd-logprob  pairs as in rlcd, label = sigmoid(delta) from the simulator's own log-probabilities
                  (DLMA's self-rewarding score, Liu et al. ACL 2024), how much more p+ explains o+ than o-:
                  delta = (log p(o+|p+) - log p(o+|p-)) - (log p(o-|p+) - log p(o-|p-)). A design's
                  reply prefix belongs to the response here: each o is scored in full after p+ or p- with
                  the prefix cut off (rlcd.tasks.ContrastivePair.contexts). No judge.
`--design` is one prompt design (rlcd.designs) or a mixture of several joined by '+': the prompts then take
the designs in turn, and each pair records its own design (settings.design).
`--from-pairs FILE` takes o+ and o- from an rlcd pairs file of the same model, design, task and seed
instead of sampling them: relabelling the same pairs with rlcd-rescore or rlcd-logprob, for a comparison
of labels on identical pairs.
The judge (`--judge`) is the task's default judge (rlcd.judge, the one chosen on human labels; the same
judge eval.py compare uses), any rlcd.judge spec, or "self": the paper's scorer, the simulating model
itself with the task's principle `affix_index` (rlcd.scorer; the paper's plain prompt in one order, or
`--judge-format chat` / `--both-orders`). With "self", rlaif shows the first sample as option A (label =
P(A better) = 1 - P("B")), and rlcd-rescore shows o+ and o- as A/B in a random order (a coin from a hash
of the seed and id), as the official code does.
    Context distillation (the SFT baseline) reads an rlcd file differently: "prompt" -> "chosen".

Post-processing (rlcd.tasks.postprocess): a leading role marker is stripped, the response is cut at the
next turn or end-of-turn token, and an empty result is re-sampled, at most `max_tries` samples per
response (the official max_retries=5), after which the prompt is dropped. `--require-end` also
re-samples responses that ran out of tokens (the paper's keep-filter). Prompts whose p, p+ or p-
exceeds `max_prompt_tokens` are dropped before sampling.

Record (one JSON line per pair; rlcd/pm.py and rlcd/sft.py read these fields):
    id, task, method, format, messages, prompt (neutral prompt text exactly as a policy sees it),
    chosen, rejected (cleaned response texts, no stop tokens), label, affix_index, p_plus, p_minus
    (null for rlaif, which samples from p only), settings, model, seed; plus tries {chosen, rejected}
    (samples drawn), ended {chosen, rejected} (ended with a stop token or next-turn marker rather than
    at max_new_tokens) and scorer {instruction_index, p_b, a, both_orders} (null for rlcd), where
    p_b is the scorer's P("B") and a names the stored response that was shown as option A; with a judge
    spec, scorer is {judge (its spec name), p_first}.

Resuming and torchrun: the prompts are sorted by length, then id, and cut into chunks of `batch_size`;
each chunk is sampled (and judged) alone, from a seed of its ids, and its records are appended and
fsynced together, by rlcd/jsonl.py's writer, the one eval.py respond uses. Re-running the same command
skips the ids already in the file (and in the shard files a run under torchrun left), redoes a pair whose
write a kill cut short, and writes the records an uninterrupted run would (on the same machine and batch
size). A record made with a different task, method, format, model or seed is an error naming the file.
`torchrun --nproc_per_node N train.py simulate ...` deals the chunks to the ranks and merges their shard
files into OUT in chunk order, so OUT does not depend on N.
"""
from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from models import CheckpointError, load_model
from models.checkpoint import resolve
from models.generation import SamplingParams, generate_texts
from models.tokenizer import Tokenizer
from rlcd import distributed
from rlcd.cli import parse_args, save_config
from rlcd.designs import Design, load_designs, mixture_design
from rlcd.jsonl import Lines, append_chunks, done_ids, fixed_chunks, read_objects, seed_of
from rlcd.pairs import PairsError
from rlcd.precision import resolve as resolve_precision
from rlcd.prompts import DataError, load_prompts
from rlcd import judge as judges
from rlcd.scorer import JUDGE_FORMATS, judge_pairs, score_pairs
from rlcd.tasks import FORMATS, TASKS, ContrastivePair, clean, contrastive_pair, format_prompt

METHODS = ("rlcd", "rlaif", "rlcd-rescore", "rlcd-logprob")
JUDGED = ("rlaif", "rlcd-rescore")          # the methods whose labels come from --judge
# Fields every pairs record carries; the trainers downstream rely on them.
REQUIRED = ("id", "task", "method", "format", "messages", "prompt", "chosen", "rejected", "label",
            "affix_index", "p_plus", "p_minus", "settings", "model", "seed")
# A record made with different values of these cannot share a file with this run's records.
RUN_KEYS = ("task", "method", "format", "model", "seed")
# Sampling settings recorded in each record's "settings": a file resumed, or given to --from-pairs, must share them.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens", "max_prompt_tokens", "max_tries", "require_end")


@dataclass
class Args:
    out: str                              # pairs file to write (JSONL); an existing one is resumed
    task: str = "harmless"                # harmless, helpful or outlines: the affixes and scorer principles
    method: str = "rlcd"                  # rlcd, rlaif, rlcd-rescore or rlcd-logprob
    prompts: str | None = None            # a prompts file (JSONL or text) instead of the task's built-in set
    split: str = "train"                  # train, dev or test
    n_prompts: int | None = None          # use the first N prompts that fit max_prompt_tokens (None: all)
    model: str = "smollm2-135m-instruct"  # model name, checkpoint directory or run directory
    format: str = "chat"                  # chat (the checkpoint's template) or plain (Human:/Assistant:)
    design: str = "paper-header"          # how p+ and p- are made: a built-in design (rlcd.designs.DESIGNS) or a JSON file; a+b: a mixture, the prompts taking the designs in turn
    temperature: float = 0.7              # sampling temperature (the paper: 1; see docs/SIMULATE.md)
    top_p: float = 0.9                    # nucleus threshold (1 disables; the paper: 1)
    top_k: int = 0                        # keep the k most likely tokens (0 disables)
    max_new_tokens: int = 128             # tokens per response, a design's reply prefix included (the paper: 300)
    max_prompt_tokens: int = 192          # drop prompts whose p, p+ or p- is longer (as the paper's PPO)
    max_tries: int = 5                    # samples per response before the prompt is dropped
    require_end: bool = False             # re-sample responses cut off at max_new_tokens
    both_orders: bool = False             # score A/B and B/A and average (rlaif, rlcd-rescore)
    judge: str = "default"                # judge of rlaif / rlcd-rescore: default (the task's, rlcd.judge), a judge spec, or self (the paper's: --model scores its own samples)
    judge_format: str = "plain"           # --judge self: plain (the paper's) or chat (the model's template; both orders)
    batch_size: int = 16                  # sequences per generation / scoring batch; prompts per saved chunk
    seed: int = 0                         # affix choice, A/B order and sampling seed
    device: str = "cpu"                   # cpu or cuda
    precision: str = "auto"               # auto, fp32 or bf16 (rlcd.precision): the weights' dtype of simulator and judge
    from_pairs: str | None = None         # o+ and o- from this rlcd pairs file (same model, design, task, seed) instead of sampling: relabel them
    progress: bool = True                 # show a progress bar


# ---------------------------------------------------------------------------------------------
# reading a pairs file

def read_records(path: str | Path) -> tuple[Lines, int]:
    """(line number, record) of each record of a pairs file and the byte offset just past its last complete line.

    A last line without a newline is left out (rlcd.jsonl.read_objects with partial_ok); any other line
    that is not a JSON object with the REQUIRED fields raises PairsError naming the file and line.
    """
    lines, end = read_objects(path, PairsError, partial_ok=True)
    for n, rec in lines:
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise PairsError(f"{path}:{n}: not a pairs record, missing {', '.join(missing)}")
    return lines, end


def _resume(path: Path, args: Args, designs: list) -> set[str]:
    """Ids already in `path` or in its shard files (rlcd.jsonl.done_ids); every record must come from this run:
    its RUN_KEYS, its sampling settings and one of this run's designs as written now, a prefilled one made with
    the prefix counted against --max-new-tokens (records made before that rule carry no "prefix_in_budget")."""
    want = {k: getattr(args, k) for k in RUN_KEYS + SAMPLING_KEYS}
    made = [d.to_dict() for d in designs]

    def check(f: Path, lines: Lines) -> None:
        for n, (_, rec) in enumerate(lines, 1):
            got = {k: rec[k] for k in RUN_KEYS} | {k: rec["settings"].get(k) for k in SAMPLING_KEYS}
            diff = [(f"{k}={got[k]!r}", f"{k}={want[k]!r}") for k in want if got[k] != want[k]]
            design = rec["settings"].get("design") or {}
            if not diff and args.method != "rlaif":              # rlaif samples p alone: no design
                if design not in made:                           # another design, or this one since changed
                    changed = " as it was written then" if design.get("name") in {d["name"] for d in made} else ""
                    diff = [(f"design {design.get('name')!r}{changed}", f"--design {args.design!r}")]
                elif (any((design.get(side) or {}).get("prefix") for side in ("plus", "minus"))
                      and not rec["settings"].get("prefix_in_budget")):
                    diff = [("its reply prefix on top of max_new_tokens", "the prefix counted against it")]
            if diff:
                raise PairsError(f"{f}: record {n} ({rec['id']}) has {', '.join(t for t, _ in diff)}, but this run "
                                 f"has {', '.join(o for _, o in diff)}; write to another --out")
    return done_ids(path, read_records, check, "simulate", "that pair will be redone")


# ---------------------------------------------------------------------------------------------
# sampling

def prefix_tokens(tokenizer: Tokenizer, prefix: str | None) -> int:
    """How many of --max-new-tokens a design's reply prefix takes (0 for none)."""
    return len(tokenizer.encode(prefix, add_bos=False)) if prefix else 0


def within_budget(result: dict, budget: int, tokenizer: Tokenizer) -> dict:
    """A generate_texts result as if sampled with max_new_tokens=budget: its first `budget` tokens, ended
    only if its stop token fit too (the engine counts the stop token against the cap). Sampling is causal,
    so these are the tokens a run with that cap draws."""
    ids = result["token_ids"]
    if len(ids) + int(result["finished"]) <= budget:
        return result
    return {"text": tokenizer.decode(ids[:budget]), "token_ids": ids[:budget], "finished": False}


def sample_responses(model, tokenizer: Tokenizer, prompts: list[str], args: Args, salt: str,
                     budgets: list[int] | None = None) -> tuple[list[str | None], list[int], list[bool], int]:
    """One cleaned response per prompt text, re-sampling failures up to args.max_tries samples. `budgets`:
    each prompt's own cap on new tokens, at most args.max_new_tokens (default: that for every prompt).

    Returns (texts, with None where every try failed), tries, ended, tokens generated. Each try is one
    generate_texts call over the prompts still failing, seeded from (seed, salt, try).
    """
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p)
    n = len(prompts)
    texts: list[str | None] = [None] * n
    tries, ended = [0] * n, [False] * n
    n_tokens = 0
    todo = list(range(n))
    for attempt in range(args.max_tries):
        if not todo:
            break
        results = generate_texts(model, tokenizer, [prompts[i] for i in todo], params,
                                 batch_size=args.batch_size, seed=seed_of(args.seed, salt, attempt),
                                 progress=False)
        failed = []
        for i, r in zip(todo, results):
            tries[i] += 1
            n_tokens += len(r["token_ids"]) + int(r["finished"])
            if budgets is not None and budgets[i] < args.max_new_tokens:
                r = within_budget(r, budgets[i], tokenizer)
            texts[i], ended[i] = clean(r, args.format, tokenizer, args.require_end)
            if texts[i] is None:
                failed.append(i)
        todo = failed
    return texts, tries, ended, n_tokens


def logprob_labels(model, tokenizer: Tokenizer, cps: list[ContrastivePair], plus: list[str], minus: list[str],
                   fmt: str, batch_size: int) -> tuple[list[float], list[list[float]]]:
    """The rlcd-logprob label of each pair (o+ = plus[i], o- = minus[i] under cps[i]): sigmoid(delta) with
    delta = (log p(o+|p+) - log p(o+|p-)) - (log p(o-|p+) - log p(o-|p-)), the simulator's sequence
    log-probabilities (its response tokens, no end marker) after each side's context
    (ContrastivePair.contexts). Returns the labels and, per pair, the four log-probs in that order."""
    import torch

    from rlcd.dpo import sequence_logprobs
    from rlcd.reward import encode_parts
    from rlcd.runs import right_pad

    seqs = []                                     # (ids, prompt length), 4 per pair: o+|p+, o+|p-, o-|p+, o-|p-
    for cp, op, om in zip(cps, plus, minus):
        ctx_plus, ctx_minus = cp.contexts()
        for response in (op, om):
            for ctx in (ctx_plus, ctx_minus):
                ids, n_prompt = encode_parts(tokenizer, ctx, response, fmt)
                seqs.append((ids[:-1], n_prompt))           # the end marker left out: o may have been cut off
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))     # batches of similar lengths
    logp = [0.0] * len(seqs)
    device = next(model.parameters()).device
    with torch.no_grad():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            tokens, seq_len = right_pad([seqs[i][0] for i in idx], tokenizer.pad_id, device)   # (b, T), (b,)
            prompt_len = torch.tensor([seqs[i][1] for i in idx], device=device)                # (b,)
            h = model(tokens, return_hidden=True)                                               # (b, T, D)
            for i, v in zip(idx, sequence_logprobs(h, model.output_weight, tokens, prompt_len, seq_len).tolist()):
                logp[i] = v
    four = [logp[4 * k:4 * k + 4] for k in range(len(cps))]
    deltas = torch.tensor([(a - b) - (c - d) for a, b, c, d in four], dtype=torch.float64)
    return torch.sigmoid(deltas).tolist(), four


# ---------------------------------------------------------------------------------------------
# one chunk of prompts -> records

def with_prefix(prefix: str, text: str) -> str:
    """A design's reply prefix joined to the cleaned continuation (which lost its leading space)."""
    if not prefix:
        return text
    return prefix + ("" if text[:1] in tuple(",.:;!?)'\"") else " ") + text


def make_pairs(model, tokenizer: Tokenizer, items: list[tuple[dict, ContrastivePair]], args: Args,
               design_of: dict[str, Design], judge: tuple | None = None, given: dict[str, dict] | None = None,
               ) -> tuple[list[dict], int]:
    """Records for a chunk of (prompt record, contrastive prompts), each prompt's made under its design
    (`design_of`: id -> Design); prompts whose sampling failed are left out. `given` (--from-pairs: id ->
    rlcd record) supplies o+ and o- instead of sampling; a prompt missing there is left out. Returns
    (records, tokens generated)."""
    ids = [rec["id"] for rec, _ in items]
    salt = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
    n = len(items)
    # 1. sample: p+ and p- (or p twice) of the whole chunk in the same batches, sorted by length
    if given is not None:
        got = [given.get(i) for i in ids]
        texts = [g and g[side] for side in ("chosen", "rejected") for g in got]     # stored with their prefixes
        tries = [g and g["tries"][side] for side in ("chosen", "rejected") for g in got]
        ended = [g and g["ended"][side] for side in ("chosen", "rejected") for g in got]
        n_tokens = 0
    else:
        if args.method == "rlaif":
            prompts, budgets = [cp.neutral for _, cp in items] * 2, None
        else:
            prompts = [cp.plus for _, cp in items] + [cp.minus for _, cp in items]
            # A reply prefix is part of the response (kept in o+ or o-), so it counts against the cap: both
            # sides of a pair are at most max_new_tokens long, and o- prefilled is not longer than o+ by its
            # prefix wherever both run to the cap.
            budgets = [args.max_new_tokens - prefix_tokens(tokenizer, x)
                       for x in [cp.plus_prefix for _, cp in items] + [cp.minus_prefix for _, cp in items]]
        texts, tries, ended, n_tokens = sample_responses(model, tokenizer, prompts, args, salt, budgets)
    keep = [j for j in range(n) if texts[j] is not None and texts[n + j] is not None]
    if args.method != "rlaif" and given is None:   # a design's reply prefixes are part of o+ and o-
        texts = [None if t is None else with_prefix(items[j % n][1].minus_prefix if j >= n else
                                                    items[j][1].plus_prefix, t) for j, t in enumerate(texts)]
    first = [texts[j] for j in keep]           # o+ (rlcd, rescore) or sample 1 (rlaif)
    second = [texts[n + j] for j in keep]      # o- or sample 2

    # 2. label: 1.0 by construction, or the scorer's soft judgement
    task = TASKS[args.task]
    labels = [1.0] * len(keep)
    scorer: list[dict | None] = [None] * len(keep)
    if args.method == "rlcd-logprob" and keep:
        labels, four = logprob_labels(model, tokenizer, [items[j][1] for j in keep], first, second, args.format,
                                      args.batch_size)
        scorer = [{"logprob": dict(zip(("plus|p+", "plus|p-", "minus|p+", "minus|p-"), f))} for f in four]
    elif args.method in JUDGED and keep:
        # The scorer quotes the neutral dialogue in the paper's plain "Human: ... Assistant:" form
        # whatever the generation format, so the judge is the same for both formats.
        conv = [format_prompt(items[j][0]["messages"], "plain") for j in keep]
        instr = [task.instructions[items[j][1].index] for j in keep]
        if args.method == "rlaif":
            # (--judge self) Sample 1 is option A = chosen; the two samples are i.i.d., so no order to randomise.
            plus_first = [True] * len(keep)
        else:
            plus_first = [seed_of("order", args.seed, ids[j]) % 2 == 0 for j in keep]
        a = [f if pf else s for f, s, pf in zip(first, second, plus_first)]
        b = [s if pf else f for f, s, pf in zip(first, second, plus_first)]
        if args.judge == "self":
            if args.judge_format == "chat":
                # Through the model's chat template, both orders always (rlcd.scorer.judge_pairs).
                p_b = (1.0 - judge_pairs(model, tokenizer, conv, instr, a, b, "chat", args.batch_size).p_first).tolist()
            else:
                p_b = score_pairs(model, tokenizer, conv, instr, a, b, both_orders=args.both_orders,
                                  batch_size=args.batch_size).tolist()
            # label = P(chosen better); chosen is `first`, which is option A when plus_first.
            labels = [1.0 - p if pf else p for p, pf in zip(p_b, plus_first)]
            scorer = [{"instruction_index": items[j][1].index, "p_b": p, "a": "chosen" if pf else "rejected",
                       "both_orders": args.both_orders} for j, p, pf in zip(keep, p_b, plus_first)]
        else:
            spec, j_model, j_tok = judge
            labels = judges.judge(spec, j_model, j_tok, conv, args.task, first, second, args.batch_size).p_first.tolist()
            scorer = [{"judge": spec.name, "p_first": p} for p in labels]

    # 3. records
    settings = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                "max_new_tokens": args.max_new_tokens, "max_prompt_tokens": args.max_prompt_tokens,
                "max_tries": args.max_tries, "require_end": args.require_end,
                "both_orders": args.both_orders or args.judge_format == "chat",
                "precision": resolve_precision(args.precision, args.device).name,
                "judge": judge[0].name if judge else None if args.method not in JUDGED else "self",
                "judge_format": args.judge_format, "prefix_in_budget": True}
    out = []
    for k, j in enumerate(keep):
        rec, cp = items[j]
        contrastive = args.method != "rlaif"
        out.append({
            "id": rec["id"], "task": args.task, "method": args.method, "format": args.format,
            "messages": rec["messages"], "prompt": cp.neutral,
            "chosen": first[k], "rejected": second[k], "label": labels[k],
            "affix_index": cp.index,
            "p_plus": cp.plus if contrastive else None, "p_minus": cp.minus if contrastive else None,
            "settings": {**settings, "design": design_of[rec["id"]].to_dict()}, "model": args.model, "seed": args.seed,
            "tries": {"chosen": tries[j], "rejected": tries[n + j]},
            "ended": {"chosen": ended[j], "rejected": ended[n + j]},
            "scorer": scorer[k],
        })
    return out, n_tokens


# ---------------------------------------------------------------------------------------------
# the simulate command

def _check(args: Args) -> None:
    if args.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {args.task!r} "
                         f"(a prompts file goes in --prompts)")
    if args.format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    resolve_precision(args.precision, args.device)
    if args.judge_format not in JUDGE_FORMATS:
        raise ValueError(f"--judge-format must be one of {', '.join(JUDGE_FORMATS)}, got {args.judge_format!r}")
    if args.method in JUDGED and args.judge != "self":
        _judge_spec(args)
    if args.from_pairs is not None and args.method == "rlaif":
        raise ValueError("--from-pairs takes o+ and o- of an rlcd file: it relabels with rlcd-rescore or rlcd-logprob, "
                         "not rlaif (two samples of p)")
    for design in load_designs(args.design):               # a DesignError names the file and field
        if args.format == "plain" and design.carrier == "system":
            raise ValueError(f"--design {design.name}: carrier 'system' needs --format chat (plain prompts carry "
                             f"an affix on the 'Assistant:' marker only)")


def _judge_spec(args: Args) -> judges.JudgeSpec:
    """The judge spec of --judge (not "self"); ValueError naming the flag when it does not parse or fit."""
    try:
        spec = judges.resolve_judge(args.judge, args.task)
    except ValueError as e:
        raise ValueError(f"--judge: {e}") from None
    return spec


def read_given(args: Args, design_of: dict[str, Design]) -> dict[str, dict]:
    """The --from-pairs records by id, each checked to come from this run's model, task, format, seed,
    sampling settings and the design this run gives its prompt (PairsError naming the file, line and
    setting otherwise)."""
    lines, _ = read_records(args.from_pairs)
    want = {"task": args.task, "format": args.format, "model": args.model, "seed": args.seed}
    sampling = {k: getattr(args, k) for k in SAMPLING_KEYS}
    out = {}
    for n, rec in lines:
        where = f"--from-pairs {args.from_pairs}:{n}"
        if rec["method"] == "rlaif":
            raise PairsError(f"{where}: an rlaif pair (two samples of p), not o+ and o-")
        for k, v in want.items():
            if rec[k] != v:
                raise PairsError(f"{where}: {k} {rec[k]!r}, but this run has --{k.replace('_', '-')} {v!r}")
        design = design_of.get(rec["id"])
        want_settings = sampling | ({"design": design.to_dict()} if design is not None else {})
        for k, v in want_settings.items():
            if rec["settings"].get(k) != v:
                got = rec["settings"].get(k)
                raise PairsError(f"{where}: settings.{k} {got.get('name') if k == 'design' and got else got!r}, "
                                 f"but this run has --{k.replace('_', '-')} "
                                 f"{v['name'] if k == 'design' else v!r}")
        out[rec["id"]] = rec
    return out


def simulate(args: Args) -> dict:
    """Run the simulation described by `args`, appending to args.out; returns a summary (the same on
    every rank under torchrun)."""
    _check(args)
    designs = load_designs(args.design)
    distributed.init(args.device)
    device = distributed.device_for_rank(args.device)
    out = Path(args.out)
    done = _resume(out, args, designs)
    records = load_prompts(args.prompts or args.task, split=args.split)
    dtype = resolve_precision(args.precision, device).inference_dtype
    model, tok = load_model(args.model, device=device, dtype=dtype)
    if args.method != "rlaif" and args.from_pairs is None:    # a reply prefix counts against --max-new-tokens
        for d in designs:
            for side, x in (("plus", d.plus.prefix), ("minus", d.minus.prefix)):
                if (k := prefix_tokens(tok, x)) >= args.max_new_tokens:
                    raise ValueError(f"--max-new-tokens {args.max_new_tokens}: design {d.name}'s {side} reply prefix "
                                     f"{x!r} takes {k} of them, leaving none to sample")
    judge = None               # (spec, model, tokenizer) of a judge spec; None: no judge, or --judge self
    if args.method in JUDGED and args.judge != "self":
        spec = _judge_spec(args)
        if not spec.needs_model:
            judge = (spec, None, None)
        elif spec.model == args.model:
            judge = (spec, model, tok)
        else:
            judge = (spec, *load_model(spec.model, device=device, dtype=dtype))

    # p+, p-, p for every prompt under its design (a mixture's in turn); drop the too long ones, then take the
    # first n_prompts.
    items, design_of, n_long = [], {}, 0
    for rec in records:
        design = mixture_design(designs, len(items))
        cp = contrastive_pair(rec, args.task, args.format, tok, seed=args.seed, design=design)
        length = max(len(tok.encode(t)) for t in (cp.plus, cp.minus, cp.neutral))
        if length > args.max_prompt_tokens:
            n_long += 1
            continue
        items.append((rec, cp))
        design_of[rec["id"]] = design
        if args.n_prompts is not None and len(items) == args.n_prompts:
            break
    # Chunks of similar lengths (less padding in their generation batches), fixed by the prompts alone and
    # each sampled from a seed of its ids (rlcd.jsonl): a resumed run writes what an uninterrupted one would.
    given = read_given(args, design_of) if args.from_pairs is not None else None
    chunks = fixed_chunks(items, args.batch_size, key=lambda it: (len(tok.encode(it[1].plus)), it[0]["id"]))
    n_todo = sum(rec["id"] not in done for rec, _ in items)
    if distributed.is_main():
        save_config(args, out.with_name(out.name + ".config.json"))
    written, n_tokens, seconds = append_chunks(
        out, chunks, lambda it: it[0]["id"], done, lambda chunk: make_pairs(model, tok, chunk, args, design_of, judge, given),
        PairsError, f"simulate {args.method}", "pair", args.progress)
    return {"out": str(out), "method": args.method, "format": args.format, "prompts": len(items),
            "already_done": len(items) - n_todo, "dropped_too_long": n_long,
            "dropped_failed": n_todo - written, "written": written, "seconds": round(seconds, 1),
            "pairs_per_min": round(60 * written / seconds, 2) if seconds > 0 else None,
            "gen_tokens_per_s": round(n_tokens / seconds, 1) if seconds > 0 else None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, prog="train.py simulate", description=__doc__.split("\n")[0])
    rc, summary = distributed.run_command(lambda: simulate(args), (PairsError, DataError, CheckpointError,
                                                                   ValueError, FileNotFoundError), "simulate", "error: ")
    if rc:
        return rc
    distributed.print0(json.dumps(summary))
    return 0


# ---------------------------------------------------------------------------------------------
# the stats command

@dataclass
class StatsArgs:
    files: list[str]                      # pairs files written by `train.py simulate`
    score: bool = True                    # judge every pair (loads the judge's model)
    judge: str = "default"                # default (the task's chosen judge, rlcd.judge), a judge spec, or self (the paper's scorer: the simulator judges its own pairs)
    model: str | None = None              # --judge self: the scorer model (default: the one named in the file)
    both_orders: bool = True              # --judge self: score both A/B orders and average, cancelling position bias
    batch_size: int = 16                  # scorer prompts per forward
    limit: int | None = None              # only the first N pairs of each file
    examples: int = 0                     # also print this many example pairs per file
    json_out: str | None = None           # write the stats as JSON here too
    device: str = "cpu"                   # cpu or cuda


def _words(s: str) -> set[str]:
    return set(s.lower().split())


def pair_stats(records: list[dict], tokenizer: Tokenizer) -> dict:
    """Model-free summary: counts, mean token lengths, identical / empty pairs, lexical overlap."""
    n = len(records)
    if n == 0:
        return {"pairs": 0}
    lc = [len(tokenizer.encode(r["chosen"])) for r in records]
    lr = [len(tokenizer.encode(r["rejected"])) for r in records]

    def jaccard(r):
        a, b = _words(r["chosen"]), _words(r["rejected"])
        return len(a & b) / len(a | b) if a | b else 1.0

    ended = [r for r in records if isinstance(r.get("ended"), dict)]
    scored = [r["scorer"]["p_b"] for r in records if isinstance(r.get("scorer"), dict) and "p_b" in r["scorer"]]
    return {
        "pairs": n,
        "method": ",".join(sorted({r["method"] for r in records})),
        "format": ",".join(sorted({r["format"] for r in records})),
        # the prompt designs and their pairs (a mixture's: several)
        "designs": ",".join(f"{d}:{k}" for d, k in sorted(Counter(
            ((r.get("settings") or {}).get("design") or {}).get("name", "?") for r in records).items())),
        "mean_tokens_chosen": sum(lc) / n,
        "mean_tokens_rejected": sum(lr) / n,
        "frac_identical": sum(r["chosen"].strip() == r["rejected"].strip() for r in records) / n,
        "frac_empty": sum(not r["chosen"].strip() or not r["rejected"].strip() for r in records) / n,
        # Word-set Jaccard overlap of chosen and rejected: a model-free "how alike are the two".
        "mean_word_overlap": sum(map(jaccard, records)) / n,
        "frac_ended": (sum(r["ended"]["chosen"] + r["ended"]["rejected"] for r in ended) / (2 * len(ended))
                       if ended else None),
        "mean_label": sum(float(r["label"]) for r in records) / n,
        # |2 label - 1|: 1 for hard labels, near 0 for soft labels that barely prefer either side.
        "mean_label_margin": sum(abs(2 * float(r["label"]) - 1) for r in records) / n,
        # The stored P("B") of files scored by --judge self: for rlaif, whose A and B are i.i.d., any
        # distance from 0.5 is the scorer's position bias (a judge spec averages both orders: no P("B")).
        "mean_stored_p_b": sum(scored) / len(scored) if scored else None,
    }


def score_stats(records: list[dict], model, tokenizer: Tokenizer, both_orders: bool = True,
                batch_size: int = 16) -> dict:
    """The RLAIF scorer's P(chosen better than rejected) over a file (the paper's Mechanism 1: how
    differentiated the pairs are). Principle `affix_index` of the record's task, the neutral dialogue
    in plain form, rejected shown as A and chosen as B (and the reverse too with both_orders).

    p_chosen: mean P(chosen better), with its standard error; agree: fraction with P > 0.5 (for rlcd: the scorer agrees with the
    construction label); margin: mean |2P - 1|, how decisively the scorer separates the two, in
    either direction (comparable between rlcd and rlaif, whose chosen side is arbitrary).
    """
    if not records:
        return {}
    conv = [format_prompt(r["messages"], "plain") for r in records]
    instr = []
    for i, r in enumerate(records):
        if r["task"] not in TASKS:
            raise PairsError(f"record {i + 1} ({r['id']}): unknown task {r['task']!r}, cannot pick a principle")
        ins = TASKS[r["task"]].instructions
        instr.append(ins[int(r["affix_index"]) % len(ins)])
    p = score_pairs(model, tokenizer, conv, instr, [r["rejected"] for r in records],
                    [r["chosen"] for r in records], both_orders=both_orders, batch_size=batch_size)
    se = p.std().item() / len(p) ** 0.5 if len(p) > 1 else None
    return {"scorer_p_chosen": p.mean().item(), "scorer_p_chosen_se": se,
            "scorer_agree": (p > 0.5).float().mean().item(),
            "scorer_margin": (2 * p - 1).abs().mean().item(), "scorer_both_orders": both_orders}


def judge_stats(records: list[dict], spec: judges.JudgeSpec, model, tokenizer: Tokenizer,
                batch_size: int = 16, progress: bool = False) -> dict:
    """How differentiated the pairs of one file are by a judge spec (rlcd.judge, both orders): the mean
    P(chosen better) with its standard error, the fraction above 0.5 (for rlcd: the judge agrees with the
    construction) and the margin |2P - 1|, beside what is known of the judge's agreement with people."""
    if not records:
        return {}
    tasks = {r["task"] for r in records}
    if len(tasks) != 1:
        raise PairsError(f"one task per file to judge, found {sorted(tasks)}")
    task = tasks.pop()
    conv = [format_prompt(r["messages"], "plain") for r in records]
    p = judges.judge(spec, model, tokenizer, conv, task, [r["chosen"] for r in records],
                     [r["rejected"] for r in records], batch_size, progress=progress).p_first.double()
    se = p.std().item() / len(p) ** 0.5 if len(p) > 1 else None
    split = judges.length_split(records, (p > 0.5).double().tolist())   # its agreement on each side
    return {"judge": spec.name, "judge_p_chosen": p.mean().item(), "judge_p_chosen_se": se,
            "judge_agree": (p > 0.5).float().mean().item(), "judge_margin": (2 * p - 1).abs().mean().item(),
            **split, "judge_accuracy": judges.describe_accuracy(judges.measured_accuracy(spec, task))}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v)


def _stats_judge(args: StatsArgs, task: str) -> judges.JudgeSpec:
    try:
        spec = judges.resolve_judge(args.judge, task)
    except ValueError as e:
        raise ValueError(f"--judge: {e}") from None
    return spec


def stats_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Files come first on the command line (`stats A.jsonl B.jsonl --no-score`).
    if argv and not argv[0].startswith("-"):
        argv = ["--files", *argv]
    args = parse_args(StatsArgs, argv, prog="train.py stats", description="summarise pairs files")
    try:
        columns, examples = [], []
        models: dict[str, tuple] = {}
        for path in args.files:
            lines, end = read_records(path)
            records = [r for _, r in lines]
            if end < Path(path).stat().st_size:
                print(f"stats: {path}: ignoring a partial last line (an interrupted run)", file=sys.stderr)
            records = records[:args.limit] if args.limit is not None else records
            name = args.model or (records[0]["model"] if records else None)
            if name is None:
                columns.append({"file": path, "pairs": 0})
                continue
            self_judge = args.score and args.judge == "self"
            if (name, self_judge) not in models:
                models[name, self_judge] = (load_model(name, device=args.device) if self_judge
                                            else (None, Tokenizer.from_dir(resolve(name))))
            model, tok = models[name, self_judge]
            col = {"file": path, **pair_stats(records, tok)}
            if self_judge:
                col.update(score_stats(records, model, tok, args.both_orders, args.batch_size))
            elif args.score:
                spec = _stats_judge(args, records[0]["task"])
                if spec.needs_model and (spec.model, True) not in models:
                    models[spec.model, True] = load_model(spec.model, device=args.device)
                j_model, j_tok = models[spec.model, True] if spec.needs_model else (None, None)
                col.update(judge_stats(records, spec, j_model, j_tok, args.batch_size))
            columns.append(col)
            examples += [(path, r) for r in records[:args.examples]]
    except (PairsError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"stats: error: {e}", file=sys.stderr)
        return 2
    keys = list(dict.fromkeys(k for c in columns for k in c))
    print("| | " + " | ".join(Path(c["file"]).name for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for k in keys[1:]:
        print(f"| {k} | " + " | ".join(_fmt(c.get(k)) for c in columns) + " |")
    for path, r in examples:
        print(f"\n--- {Path(path).name} {r['id']} (label {float(r['label']):.3f})\nprompt: "
              f"{r['messages'][-1]['content']}\nchosen: {r['chosen']}\nrejected: {r['rejected']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(columns, indent=2))
    return 0
