"""How differentiated a simulator's RLCD pairs are under a prompt design (eval.py contrast).

For every simulator x design asked for, RLCD pairs are simulated on the task's *dev* prompts (train.py
simulate --method rlcd --split dev; resumable, one file per cell under OUT/), then measured:

    judge       the judge's P(o+ better) over the pairs (rlcd.judge, both orders): its mean with a 95%
                interval (normal, from the standard error over pairs), and the fraction of pairs it prefers
                o+ in. A judge that is also the simulator measured favours its own style: such cells are
                marked "self-judged".
    refusals    the refusal-phrase rate of o+ and of o- (rlcd.evaluate.is_refusal): judge-free, and the
                direction the harmless task wants is o+ above o-.
    identical   the fraction of pairs whose o+ and o- are the same text.
    lengths     mean characters of o+ and o-; overlap: the mean word-set Jaccard of o+ and o-.
    surface     the token overlap of p+ and p- (the Jaccard of their token multisets under the simulator's
                tokenizer): 1 for prompts that differ in nothing, lower the more the design changes. The
                paper keeps it high, so that o+ and o- differ in the principle only.

One table (markdown on stdout, JSON with --out-json) over all cells: a sweep is one command,
    python eval.py contrast --simulator smollm2-135m-instruct qwen2.5-coder-1.5b-instruct \\
        --design paper-header persona refuse-vs-prefill --task harmless --n-prompts 64 --out runs/contrast
"""
from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from models import CheckpointError
from rlcd import judge as judges
from rlcd.cli import parse_args
from rlcd.designs import DesignError, load_design
from rlcd.evaluate import is_refusal
from rlcd import simulate as sim


@dataclass
class Args:
    """Pair contrast of simulators x prompt designs on the dev prompts (eval.py contrast)."""
    out: str                                   # directory of the pairs files (one per simulator x design; rerun to resume)
    simulator: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct"])  # simulator models
    design: list[str] = field(default_factory=lambda: ["paper-header"])  # designs: built-in names or JSON files (rlcd.designs)
    task: str = "harmless"                     # the task (its dev prompts, affixes and judge)
    prompts: str | None = None                 # a prompts file instead of the task's built-in set (its dev split)
    format: str = "chat"                       # chat or plain prompts
    n_prompts: int = 64                        # dev prompts per cell
    max_new_tokens: int = 64                   # tokens per response
    temperature: float = 0.7                   # sampling temperature
    top_p: float = 0.9                         # nucleus threshold
    judge: str = "default"                     # the judge (rlcd.judge spec; default: the task's chosen judge); none: judge-free only
    batch_size: int = 16                       # sequences per generation / judge batch
    seed: int = 0                              # sampling seed
    device: str = "cpu"                        # cpu or cuda
    precision: str = "auto"                    # auto, fp32 or bf16 (rlcd.precision)
    progress: bool = True                      # progress bars
    out_json: str | None = None                # also write the table as JSON here


def surface_overlap(tokenizer, a: str, b: str) -> float:
    """Jaccard of the token multisets of two prompts: |A & B| / |A | B| (1 when they are equal)."""
    ca, cb = Counter(tokenizer.encode(a)), Counter(tokenizer.encode(b))
    union = sum((ca | cb).values())
    return sum((ca & cb).values()) / union if union else 1.0


def contrast_stats(records: list[dict], tokenizer, judged: dict | None = None) -> dict:
    """The judge-free measures of one pairs file (rlcd.simulate.pair_stats for identical pairs and word
    overlap), and the judge's, from rlcd.simulate.judge_stats, as P(o+ better) with a 95% interval."""
    n = len(records)
    if n == 0:
        return {"pairs": 0}
    mean = lambda xs: sum(xs) / len(xs)                                    # noqa: E731
    s = sim.pair_stats(records, tokenizer)
    out = {
        "pairs": n,
        "refusal_plus": mean([is_refusal(r["chosen"]) for r in records]),
        "refusal_minus": mean([is_refusal(r["rejected"]) for r in records]),
        "identical": s["frac_identical"],
        "chars_plus": mean([len(r["chosen"].strip()) for r in records]),
        "chars_minus": mean([len(r["rejected"].strip()) for r in records]),
        "word_overlap": s["mean_word_overlap"],
        "surface_overlap": mean([surface_overlap(tokenizer, r["p_plus"], r["p_minus"]) for r in records]),
    }
    if judged:
        m = judged["judge_p_chosen"]
        se = judged["judge_p_chosen_se"] if judged["judge_p_chosen_se"] is not None else math.nan
        out |= {"judge_p_plus": m, "judge_p_plus_ci": [m - 1.96 * se, m + 1.96 * se],
                "judge_prefers_plus": judged["judge_agree"]}
    return out


def run(args: Args) -> dict:
    """Simulate every cell (resuming what is on disk), then measure it; returns {"rows": [...], ...}."""
    from models import load_model
    from models.checkpoint import resolve
    from models.tokenizer import Tokenizer
    from rlcd.jsonl import read_objects
    from rlcd.precision import resolve as resolve_precision

    designs = [load_design(d) for d in args.design]                   # every design checked before any work
    precision = resolve_precision(args.precision, args.device)
    spec = None if args.judge == "none" else judges.resolve_judge(args.judge, args.task)
    out = Path(args.out)
    files = {}
    for s in args.simulator:
        for d, name in zip(designs, args.design):
            f = out / f"{Path(s).name}--{d.name}.jsonl"
            sim_args = sim.Args(out=str(f), task=args.task, prompts=args.prompts, method="rlcd", split="dev",
                                format=args.format, design=name, model=s, n_prompts=args.n_prompts,
                                max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                                seed=args.seed, device=args.device, precision=args.precision,
                                progress=args.progress)
            print(f"contrast: simulating {s} x {d.name} -> {f}", file=sys.stderr)
            sim.simulate(sim_args)
            files[s, d.name] = f
    records = {cell: [r for _, r in read_objects(f)[0]] for cell, f in files.items()}
    judged = {}
    if spec is not None:
        model = tok = None
        if spec.needs_model:
            model, tok = load_model(spec.model, device=args.device, dtype=precision.inference_dtype)
        judged = {cell: sim.judge_stats(recs, spec, model, tok, args.batch_size, progress=args.progress)
                  for cell, recs in records.items()}
        del model
    rows = []
    for (s, dname), recs in records.items():
        tok = Tokenizer.from_dir(resolve(s))
        rows.append({"simulator": s, "design": dname, "file": str(files[s, dname]),
                     "self_judged": spec is not None and spec.needs_model and spec.model == s,
                     **contrast_stats(recs, tok, judged.get((s, dname)))})
    return {"task": args.task, "split": "dev", "judge": spec.name if spec else None,
            "judge_accuracy": judges.describe_accuracy(judges.measured_accuracy(spec, args.task)) if spec else None,
            "precision": precision.name, "rows": rows}


def format_table(result: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.2f}"                       # noqa: E731
    lines = ["| simulator | design | pairs | judge P(o+ better) [95% CI] | prefers o+ | refusals o+ / o- | "
             "identical | chars o+ / o- | word overlap | p+/p- token overlap |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        judged = (f"{f(r['judge_p_plus'])} [{f(r['judge_p_plus_ci'][0])}, {f(r['judge_p_plus_ci'][1])}]"
                  + (" (self-judged)" if r["self_judged"] else "")) if "judge_p_plus" in r else "-"
        lines.append(f"| {r['simulator']} | {r['design']} | {r['pairs']} | {judged} | "
                     f"{f(r.get('judge_prefers_plus'))} | {f(r.get('refusal_plus'))} / {f(r.get('refusal_minus'))} | "
                     f"{f(r.get('identical'))} | {r.get('chars_plus', 0):.0f} / {r.get('chars_minus', 0):.0f} | "
                     f"{f(r.get('word_overlap'))} | {f(r.get('surface_overlap'))} |")
    lines.append(f"task {result['task']}, dev prompts; judge {result['judge']}"
                 + (f": {result['judge_accuracy']}" if result["judge_accuracy"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(Args, argv, prog="eval.py contrast", description=Args.__doc__)
    try:
        result = run(args)
    except (CheckpointError, DesignError, ValueError, FileNotFoundError, OSError) as e:
        print(f"eval.py contrast: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(result, indent=2))
    return 0
