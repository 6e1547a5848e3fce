#!/usr/bin/env bash
# The prompt-design sweep of docs/SIMULATE.md: RLCD pairs on a task's dev prompts from three simulators under
# the designs written for that task (rlcd.designs.SWEEPS), with the cross-model row (o+ from the 1.5B model,
# o- from the 135M one), measured judge-free; then judged. Harmless: the 1.5B model's cells, by the question
# validated on refusal-vs-compliance pairs (docs/JUDGES.md). Helpful and outlines: every simulator's cells (not the
# cross rows), by the task's default judge (the paper's pairwise prompt, unvalidated: no human pairs for these tasks).
# Rerun to resume: finished cells and judgements are kept.
#   bash bench/contrast.sh [TASK] [N_PROMPTS] [OUT]   tables on stdout; OUT/contrast.json, OUT/contrast-judged.json
set -euo pipefail
cd "$(dirname "$0")/.."
TASK=${1:-harmless}
N=${2:-64}
OUT=${3:-runs/contrast-$TASK}
PY=.venv/bin/python
Q15=qwen2.5-coder-1.5b-instruct
SIMS="$Q15 qwen2.5-coder-0.5b-instruct smollm2-135m-instruct"
DESIGNS=$($PY -c "import sys; from rlcd.designs import SWEEPS; print(' '.join(SWEEPS[sys.argv[1]]))" "$TASK")
# shellcheck disable=SC2086  # one word per simulator and design
$PY eval.py contrast --simulator $SIMS --design $DESIGNS --task "$TASK" --n-prompts "$N" --batch-size 32 \
  --judge none --cross "$Q15,smollm2-135m-instruct" --out "$OUT" --out-json "$OUT/contrast.json"
if [ "$TASK" = harmless ]; then JUDGED=$Q15; JUDGE="$Q15:pointwise:chat:q3"; else JUDGED=$SIMS; JUDGE=default; fi
# shellcheck disable=SC2086
$PY eval.py contrast --simulator $JUDGED --design $DESIGNS --task "$TASK" --n-prompts "$N" --batch-size 32 \
  --judge "$JUDGE" --out "$OUT" --out-json "$OUT/contrast-judged.json"
