#!/usr/bin/env bash
# How strongly the RLCD affixes steer a simulator: RLCD pairs from the default 135M model and from
# Qwen2.5-Coder-0.5B in each prompt format / design (rlcd.designs), then the judge's preference for o+ over o-
# (eval.py judge-agreement: "accuracy" = the fraction of pairs where the judge, both orders averaged,
# prefers the positive-affix response). The measured table: docs/SIMULATE.md.
#   bash bench/contrast.sh [N_PROMPTS] [JUDGE] [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-24}
JUDGE=${2:-qwen2.5-coder-0.5b-instruct}
OUT=${3:-runs/contrast}
PY=.venv/bin/python
mkdir -p "$OUT"
for sim in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct; do
  for cfg in chat:paper-header chat:paper-system plain:paper-header; do
    fmt=${cfg%%:*}; design=${cfg##*:}
    f="$OUT/$sim-$fmt-$design.jsonl"
    $PY train.py simulate --task harmless --method rlcd --model "$sim" --n-prompts "$N" --max-new-tokens 48 \
      --format "$fmt" --design "$design" --batch-size 24 --no-progress --out "$f" > "$f.summary.json"
    $PY train.py stats --files "$f" --no-score > "$f.stats.txt" 2>&1
    $PY -c "import json, sys; from rlcd.evaluate import is_refusal; r = [json.loads(l) for l in open(sys.argv[1])]; \
print(json.dumps({'pairs': len(r), 'refusal_chosen': sum(is_refusal(x['chosen']) for x in r) / len(r), \
'refusal_rejected': sum(is_refusal(x['rejected']) for x in r) / len(r)}))" "$f" > "$f.refusals.json"
    $PY eval.py judge-agreement --judge "$JUDGE" --pairs "$f" --out "$f.judge.json" > "$f.judge.txt" 2>&1
    echo "$sim $fmt $design: $(cat "$f.refusals.json") $(tail -1 "$f.judge.txt")"
  done
done
