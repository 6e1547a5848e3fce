"""Pairs labelled by a rule, to validate a judge of simulated pairs: refusal vs compliance (harmless), or a
response that meets its prompt's stated constraints vs one that does not (instructions).

A judge chosen on the human-labelled pairs (rlcd.judge, docs/JUDGES.md) was validated on pairs of two
compliant answers of different harm; a simulator steered by a prompt design mostly yields a refusal against
a compliant answer instead. This script keeps, from RLCD pairs files of the harmless task (train.py simulate,
eval.py contrast), every pair in which exactly one response refuses (rlcd.judge.is_refusal) and writes it
with the refusal as the preferred response: under the harmlessness principle, declining a red-team request is
never the more harmful reply. `eval.py judge-agreement --pairs OUT` then measures how often a judge agrees.
The label is the refusal rule's by construction, so the refusal rule itself scores 1 here and is not a
candidate; what this measures is whether a model judge orders the two kinds of response the right way.

    python bench/rule_pairs.py runs/contrast-harmless/*.jsonl --out runs/refusal-pairs.jsonl [--sample 100]

`--rule constraints` does the same for the instructions task with rlcd.constraints: it keeps every pair in
which exactly one response meets every checkable constraint of its prompt, that one preferred, so a judge's
agreement is measured against a program's verdict rather than a person's:

    python bench/rule_pairs.py runs/contrast-instructions/*.jsonl --rule constraints --out runs/constraint-pairs.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlcd.constraints import constraints_of, followed   # noqa: E402
from rlcd.judge import is_refusal              # noqa: E402
from rlcd.pairs import read_pairs             # noqa: E402


def rule_pairs(records: list[dict], rule: str = "refusal") -> list[dict]:
    """The pairs whose responses differ under the rule, the one it prefers as `chosen` (label 1): the refusing
    one (rule "refusal"), or the one that meets its prompt's constraints (rule "constraints")."""
    cons = constraints_of("instructions") if rule == "constraints" else None
    verdict = ((lambda r, text: is_refusal(text)) if rule == "refusal"
               else (lambda r, text: followed(cons.get(r["id"], []), text)))
    out = []
    for r in records:
        plus, minus = verdict(r, r["chosen"]), verdict(r, r["rejected"])
        if plus is None or plus == minus:
            continue
        good, other = (r["chosen"], r["rejected"]) if plus else (r["rejected"], r["chosen"])
        out.append({"id": r["id"], "task": r.get("task", "harmless"), "method": f"{rule}-rule",
                    "format": r["format"], "messages": r.get("messages"), "prompt": r["prompt"],
                    "chosen": good, "rejected": other, "label": 1.0,
                    "source": r.get("source"), "preferred_was": "o+" if plus else "o-"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="RLCD pairs files (harmless task; instructions with --rule constraints)")
    ap.add_argument("--rule", choices=("refusal", "constraints"), default="refusal", help="what labels a pair")
    ap.add_argument("--out", required=True, help="the labelled pairs, JSONL")
    ap.add_argument("--sample", type=int, default=None, help="keep a random N of them (seed 0), to bound the judging")
    args = ap.parse_args()
    rows = []
    for path in args.pairs:
        recs = [{**r, "source": Path(path).name} for r in read_pairs(path)]
        mine = rule_pairs(recs, args.rule)
        print(f"{path}: {len(recs)} pairs, {len(mine)} that the {args.rule} rule orders "
              f"({sum(m['preferred_was'] == 'o+' for m in mine)} of them o+ preferred)", file=sys.stderr)
        rows += mine
    if args.sample is not None and args.sample < len(rows):
        random.Random(0).shuffle(rows)
        rows = rows[:args.sample]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} pairs -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
