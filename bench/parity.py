"""Quality parity of precisions: the same pipeline run in bf16 and in fp32 with several seeds, side by side.

    RLCD_CPU_BF16=0 python train.py pipeline --budget quick --seed 0 --out runs/parity/fp32-s0   # auto -> fp32
    python train.py pipeline --budget quick --seed 0 --out runs/parity/bf16-s0                   # auto -> bf16 (AMX)
    ... seeds 1 ...
    python bench/parity.py runs/parity/bf16-s0 runs/parity/bf16-s1 runs/parity/fp32-s0 runs/parity/fp32-s1

Prints, per run (its precision read from the stages' own records), the preference models' dev accuracy
and human-pair agreement, the PPO curves' means (score, KL, entropy over the first and last quarter of
iterations), the judged win rate of each policy against base, the refusal rates and the stage seconds;
then, per figure, the spread between seeds within a precision beside the gap between the precisions'
means. A precision difference shows as a gap well outside the seed spread.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _precision(run: Path) -> str:
    """What the run's PPO stage computed in, as its checkpoint's run.json records it (rlcd.precision)."""
    f = run / "ppo-rlcd" / "policy" / "run.json"
    return json.loads(f.read_text()).get("precision", "?") if f.is_file() else "?"


def figures(run: Path) -> dict[str, float | None]:
    """The figures of one pipeline run directory."""
    out: dict[str, float | None] = {}
    for m in ("rlcd", "rlaif"):
        summ = next((r for r in reversed(_jsonl(run / f"pm-{m}" / "metrics.jsonl")) if r.get("summary")), {})
        out[f"pm-{m} dev acc"] = summ.get("dev_accuracy")
        ag = run / f"agreement-{m}.json"
        out[f"pm-{m} human acc"] = json.loads(ag.read_text()).get("accuracy") if ag.is_file() else None
        recs = [r for r in _jsonl(run / f"ppo-{m}" / "metrics.jsonl") if "score" in r and "samples" not in r]
        q = max(1, len(recs) // 4)
        for k in ("score", "kl", "entropy"):
            for part, rs in (("first", recs[:q]), ("last", recs[-q:])):
                out[f"ppo-{m} {k} {part}"] = sum(r[k] for r in rs) / len(rs) if rs else None
    cmp_file = run / "compare.json"
    if cmp_file.is_file():
        res = json.loads(cmp_file.read_text())
        for c in res.get("comparisons", []):
            if c["b"] == "base":
                out[f"{c['a']} vs base win rate"] = c["win_rate"]
            elif c["a"] == "base":
                out[f"{c['b']} vs base win rate"] = 1 - c["win_rate"]
        for name, r in res.get("refusals", {}).items():
            out[f"{name} refusals"] = r.get("rate")
    stages = [json.loads(f.read_text()) for f in sorted((run / "stages").glob("*.json"))]
    out["seconds"] = sum(s.get("seconds", 0) for s in stages) if stages else None
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: python bench/parity.py RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    runs = [Path(a) for a in argv]
    missing = [str(r) for r in runs if not (r / "pipeline.json").is_file()]
    if missing:
        print(f"parity: not a pipeline run directory (no pipeline.json): {', '.join(missing)}", file=sys.stderr)
        return 2
    precision = {r: _precision(r) for r in runs}
    seed = {r: json.loads((r / "pipeline.json").read_text()).get("seed") for r in runs}
    figs = {r: figures(r) for r in runs}
    keys = [k for k in figs[runs[0]] if any(figs[r].get(k) is not None for r in runs)]
    f = lambda v: "-" if v is None else f"{v:.3f}"   # noqa: E731
    print("| figure | " + " | ".join(f"{precision[r]} seed {seed[r]}" for r in runs) + " | seed spread (max within a "
          "precision) | gap between precisions' means |")
    print("|---|" + "---:|" * (len(runs) + 2))
    groups: dict[str, list[Path]] = {}
    for r in runs:
        groups.setdefault(precision[r], []).append(r)
    for k in keys:
        vals = {r: figs[r].get(k) for r in runs}
        spread = [max(v) - min(v) for g in groups.values()
                  if len(v := [vals[r] for r in g if vals[r] is not None]) > 1]
        means = [sum(v) / len(v) for g in groups.values() if (v := [vals[r] for r in g if vals[r] is not None])]
        print(f"| {k} | " + " | ".join(f(vals[r]) for r in runs)
              + f" | {f(max(spread) if spread else None)} | {f(max(means) - min(means) if len(means) > 1 else None)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
