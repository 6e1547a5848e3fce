"""Refusal-vs-compliance pairs, labelled by construction, to validate a judge of simulated pairs.

A judge chosen on the human-labelled pairs (rlcd.judge, docs/JUDGES.md) was validated on pairs of two
compliant answers of different harm; a simulator steered by a prompt design mostly yields a refusal against
a compliant answer instead. This script keeps, from RLCD pairs files of the harmless task (train.py simulate,
eval.py contrast), every pair in which exactly one response refuses (rlcd.judge.is_refusal) and writes it
with the refusal as the preferred response: under the harmlessness principle, declining a red-team request is
never the more harmful reply. `eval.py judge-agreement --pairs OUT` then measures how often a judge agrees.
The label is the refusal rule's by construction, so the refusal rule itself scores 1 here and is not a
candidate; what this measures is whether a model judge orders the two kinds of response the right way.

    python bench/refusal_pairs.py runs/contrast-harmless/*.jsonl --out runs/refusal-pairs.jsonl [--sample 100]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlcd.judge import is_refusal              # noqa: E402
from rlcd.pairs import read_pairs             # noqa: E402


def refusal_pairs(records: list[dict]) -> list[dict]:
    """The pairs whose responses differ in refusing, the refusing one as `chosen` (label 1)."""
    out = []
    for r in records:
        plus, minus = is_refusal(r["chosen"]), is_refusal(r["rejected"])
        if plus == minus:
            continue
        refusing, other = (r["chosen"], r["rejected"]) if plus else (r["rejected"], r["chosen"])
        out.append({"id": r["id"], "task": r.get("task", "harmless"), "method": "refusal-rule",
                    "format": r["format"], "messages": r.get("messages"), "prompt": r["prompt"],
                    "chosen": refusing, "rejected": other, "label": 1.0,
                    "source": r.get("source"), "refusal_was": "o+" if plus else "o-"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="RLCD pairs files (harmless task)")
    ap.add_argument("--out", required=True, help="the labelled pairs, JSONL")
    ap.add_argument("--sample", type=int, default=None, help="keep a random N of them (seed 0), to bound the judging")
    args = ap.parse_args()
    rows = []
    for path in args.pairs:
        recs = [{**r, "source": Path(path).name} for r in read_pairs(path)]
        mine = refusal_pairs(recs)
        print(f"{path}: {len(recs)} pairs, {len(mine)} with exactly one refusal "
              f"({sum(m['refusal_was'] == 'o+' for m in mine)} of them o+)", file=sys.stderr)
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
