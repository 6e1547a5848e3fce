#!/usr/bin/env bash
# The prompt-design sweep of docs/SIMULATE.md: RLCD pairs on the harmless task's dev prompts from three
# simulators under every built-in design (rlcd.designs), with the cross-model row (o+ from the 1.5B model,
# o- from the 135M one), measured judge-free; then the 1.5B model's cells judged by the question validated on
# refusal-vs-compliance pairs (docs/JUDGES.md). Rerun to resume: finished cells and judgements are kept.
#   bash bench/contrast.sh [N_PROMPTS] [OUT]        tables on stdout; OUT/contrast.json, OUT/contrast-judged.json
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-64}
OUT=${2:-runs/contrast-harmless}
PY=.venv/bin/python
Q15=qwen2.5-coder-1.5b-instruct
DESIGNS=$($PY -c "from rlcd.designs import DESIGNS; print(' '.join(DESIGNS))")
# shellcheck disable=SC2086  # one word per design
$PY eval.py contrast --simulator $Q15 qwen2.5-coder-0.5b-instruct smollm2-135m-instruct --design $DESIGNS \
  --task harmless --n-prompts "$N" --batch-size 32 --judge none --cross "$Q15,smollm2-135m-instruct" \
  --out "$OUT" --out-json "$OUT/contrast.json"
# shellcheck disable=SC2086
$PY eval.py contrast --simulator $Q15 --design $DESIGNS --task harmless --n-prompts "$N" --batch-size 32 \
  --judge "$Q15:pointwise:chat:q3" --out "$OUT" --out-json "$OUT/contrast-judged.json"
