"""How differentiated a simulator's RLCD pairs are under a prompt design (eval.py contrast).

For every simulator x design asked for, RLCD pairs are simulated on the task's *dev* prompts (train.py
simulate --method rlcd --split dev; resumable, one file per cell under OUT/), then measured:

    judges      each judge's P(o+ better) over the pairs (rlcd.judge, both orders): its mean with a 95%
                interval (normal, from the standard error over pairs), and the fraction of pairs it prefers
                o+ in, overall and on each side of the length split (o+ the longer / the shorter response:
                a judge that only likes length or brevity shows it there); one column per judge (--judge
                takes several), each cell's judgement cached beside its pairs file. A judge that is also
                the simulator measured favours its own style: such cells are marked "self-judged". A judge
                validated on the human pairs is not thereby valid here:
                simulated pairs mostly set a refusal against compliance, which the human pairs seldom do
                (docs/SIMULATE.md, bench/rule_pairs.py).
    refusals    the refusal-phrase rate of o+ and of o- (rlcd.judge.is_refusal): judge-free, and the
                direction the harmless task wants is o+ above o-.
    follows     for a task whose prompts carry verifiable constraints (instructions): the share of o+ and of o-
                that meets every checkable constraint of its prompt (rlcd.constraints), judge-free; the
                direction the task wants is o+ above o-.
    identical   the fraction of pairs whose o+ and o- are the same text.
    lengths     mean characters of o+ and o-, the share of pairs whose o+ is the longer (the length split a
                judge's preference is read against), the share of o+ and of o- that ended within the cap;
                overlap: the mean word-set Jaccard of o+ and o-.
    surface     the token overlap of p+ and p- (the Jaccard of their token multisets under the simulator's
                tokenizer): 1 for prompts that differ in nothing, lower the more the design changes. The
                paper keeps it high, so that o+ and o- differ in the principle only.

    cross       --cross PLUS,MINUS adds, per design, a row of o+ from simulator PLUS against o- from
                simulator MINUS (both among --simulator), joined by prompt: not RLCD's same-model premise,
                a reference for the contrast a simulator both able to follow prompts and unaligned could give.

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
from rlcd.constraints import constraints_of, pair_rule_stats
from rlcd.designs import DesignError, load_design
from rlcd.judge import is_refusal
from rlcd.jsonl import write_json_atomic
from rlcd.pairs import length_difference
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
    judge: list[str] = field(default_factory=lambda: ["default"])  # judges (rlcd.judge specs; default: the task's chosen judge); none: judge-free only
    cross: list[str] | None = None             # PLUS,MINUS: a row of o+ from simulator PLUS against o- from MINUS, per design
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


def contrast_stats(records: list[dict], tokenizer, surface: bool = True,
                   constraints: dict[str, list[dict]] | None = None) -> dict:
    """The judge-free measures of one pairs file (rlcd.simulate.pair_stats for identical pairs and word
    overlap); surface=False (a cross-model row, p+ and p- in two templates) leaves the p+/p- overlap out;
    `constraints` (prompt id -> its constraints) adds the share of o+ and of o- that follow them."""
    n = len(records)
    if n == 0:
        return {"pairs": 0}
    mean = lambda xs: sum(xs) / len(xs) if xs else None                    # noqa: E731
    s = sim.pair_stats(records, tokenizer)
    follows = {}
    if constraints:
        rule = pair_rule_stats(records, constraints)
        follows = {"follows_plus": rule["follows_chosen"], "follows_minus": rule["follows_rejected"],
                   "follows_pairs": rule["checked"]}
    return {**follows,
        "pairs": n,
        "refusal_plus": mean([is_refusal(r["chosen"]) for r in records]),
        "refusal_minus": mean([is_refusal(r["rejected"]) for r in records]),
        "identical": s["frac_identical"],
        "chars_plus": mean([len(r["chosen"].strip()) for r in records]),
        "chars_minus": mean([len(r["rejected"].strip()) for r in records]),
        # the length split: a judge's preference for o+ is worth as much as it differs from "longer wins"
        "plus_longer": mean([length_difference(r) > 0 for r in records]),
        "ended_plus": mean([r["ended"]["chosen"] for r in records if isinstance(r.get("ended"), dict)]),
        "ended_minus": mean([r["ended"]["rejected"] for r in records if isinstance(r.get("ended"), dict)]),
        "word_overlap": s["mean_word_overlap"],
        "surface_overlap": (mean([surface_overlap(tokenizer, r["p_plus"], r["p_minus"]) for r in records])
                            if surface else None),
    }


def judged_row(judged: dict, self_judged: bool) -> dict:
    """One judge's measures of one cell, from rlcd.simulate.judge_stats: P(o+ better) with a 95% interval."""
    m = judged["judge_p_chosen"]
    se = judged["judge_p_chosen_se"] if judged["judge_p_chosen_se"] is not None else math.nan
    return {"judge": judged["judge"], "p_plus": m, "ci": [m - 1.96 * se, m + 1.96 * se],
            "prefers_plus": judged["judge_agree"], "self_judged": self_judged,
            "prefers_plus_longer": judged["accuracy_chosen_longer"],
            "prefers_plus_shorter": judged["accuracy_chosen_shorter"]}


def cross_records(plus: list[dict], minus: list[dict]) -> list[dict]:
    """o+ of one simulator's pairs against o- of another's, joined by prompt id (prompts both simulated)."""
    by_id = {r["id"]: r for r in minus}
    return [{**r, "rejected": by_id[r["id"]]["rejected"], "p_minus": by_id[r["id"]]["p_minus"],
             "ended": {"chosen": r["ended"]["chosen"], "rejected": by_id[r["id"]]["ended"]["rejected"]}}
            for r in plus if r["id"] in by_id]


def judge_cells(spec, records: dict, files: dict, args: Args, precision) -> dict:
    """`spec`'s judge_stats of every cell, each cached beside its pairs file (and recomputed when the
    cell's pairs changed); the judge's model is loaded only when some cell is not cached."""
    from models import load_model

    out, todo = {}, []
    for cell, recs in records.items():
        cache = Path(f"{files[cell]}.judge.{spec.name.replace('/', '_')}.json")
        hit = json.loads(cache.read_text()) if cache.is_file() else None
        if hit and hit.get("pairs") == len(recs) and "accuracy_chosen_longer" in hit["stats"]:
            out[cell] = hit["stats"]
        else:
            todo.append((cell, cache))
    if todo:
        model = tok = None
        if spec.needs_model:
            model, tok = load_model(spec.model, device=args.device, dtype=precision.inference_dtype)
        for cell, cache in todo:
            out[cell] = sim.judge_stats(records[cell], spec, model, tok, args.batch_size, progress=args.progress)
            write_json_atomic(cache, {"pairs": len(records[cell]), "stats": out[cell]})
        del model
    return out


def run(args: Args) -> dict:
    """Simulate every cell (resuming what is on disk), then measure it; returns {"rows": [...], ...}."""
    from models.checkpoint import resolve
    from models.tokenizer import Tokenizer
    from rlcd.jsonl import read_objects
    from rlcd.precision import resolve as resolve_precision

    designs = [load_design(d) for d in args.design]                   # every design checked before any work
    precision = resolve_precision(args.precision, args.device)
    specs = [] if args.judge == ["none"] else [judges.resolve_judge(j, args.task) for j in args.judge]
    crosses = [tuple(c.split(",")) for c in args.cross or []]
    for c, text in zip(crosses, args.cross or []):
        if len(c) != 2 or not set(c) <= set(args.simulator):
            raise ValueError(f"--cross {text!r}: expected PLUS,MINUS, two of the --simulator models")
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
    sides = {s: (s, s) for s in args.simulator}          # a row's label -> (o+ simulator, o- simulator)
    for plus, minus in crosses:
        label = f"{plus} (o+) / {minus} (o-)"
        sides[label] = (plus, minus)
        for d in designs:
            records[label, d.name] = cross_records(records[plus, d.name], records[minus, d.name])
            files[label, d.name] = out / f"{Path(plus).name}--{Path(minus).name}--{d.name}.cross"
    judged = {spec.name: judge_cells(spec, records, files, args, precision) for spec in specs}
    cons = constraints_of(args.task) if args.prompts is None else None
    rows = []
    for (s, dname), recs in records.items():
        plus, minus = sides[s]
        tok = Tokenizer.from_dir(resolve(plus))                          # a cross row: its o+ simulator's
        rows.append({"simulator": s, "design": dname, "file": str(files[s, dname]), "cross": plus != minus,
                     **contrast_stats(recs, tok, surface=plus == minus, constraints=cons),
                     "judges": [judged_row(judged[spec.name][s, dname], spec.needs_model and spec.model in (plus, minus))
                                for spec in specs if judged[spec.name].get((s, dname))]})
    return {"task": args.task, "split": "dev", "precision": precision.name,
            "judges": [{"judge": spec.name,
                        "accuracy": judges.describe_accuracy(judges.measured_accuracy(spec, args.task))}
                       for spec in specs], "rows": rows}


def format_table(result: dict) -> str:
    f = lambda v: "-" if v is None else f"{v:.2f}"                       # noqa: E731
    names = [j["judge"] for j in result["judges"]]
    follows = any("follows_plus" in r for r in result["rows"])
    lines = ["| simulator | design | pairs | " + "".join(f"{n}: P(o+ better) [95% CI], prefers o+ (where o+ is the "
                                                      f"longer / the shorter) | " for n in names)
             + ("follows o+ / o- | " if follows else "")
             + "refusals o+ / o- | identical | ended o+ / o- | chars o+ / o-, o+ longer | word overlap | "
             "p+/p- token overlap |",
             "|---|---|---|" + "---|" * len(names) + ("---|" if follows else "") + "---|---|---|---|---|---|"]
    for r in result["rows"]:
        by = {j["judge"]: j for j in r["judges"]}
        judged = "".join(f"{f(j['p_plus'])} [{f(j['ci'][0])}, {f(j['ci'][1])}], {f(j['prefers_plus'])} "
                         f"({f(j['prefers_plus_longer'])} / {f(j['prefers_plus_shorter'])})"
                         + (" (self-judged)" if j["self_judged"] else "") + " | " if (j := by.get(n)) else "- | "
                         for n in names)
        lines.append(f"| {r['simulator']} | {r['design']} | {r['pairs']} | {judged}"
                     + (f"{f(r.get('follows_plus'))} / {f(r.get('follows_minus'))} | " if follows else "")
                     + f"{f(r.get('refusal_plus'))} / {f(r.get('refusal_minus'))} | "
                     f"{f(r.get('identical'))} | {f(r.get('ended_plus'))} / {f(r.get('ended_minus'))} | "
                     f"{r.get('chars_plus', 0):.0f} / {r.get('chars_minus', 0):.0f}, {f(r.get('plus_longer'))} | "
                     f"{f(r.get('word_overlap'))} | {f(r.get('surface_overlap'))} |")
    lines.append(f"task {result['task']}, dev prompts"
                 + "".join(f"; judge {j['judge']}: {j['accuracy']}" for j in result["judges"]))
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
        write_json_atomic(Path(args.out_json), result)
    return 0
