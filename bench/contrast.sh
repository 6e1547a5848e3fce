#!/usr/bin/env bash
# The prompt-design sweep of docs/SIMULATE.md as one command: RLCD pairs on the harmless task's dev prompts
# from the default 135M model and from Qwen2.5-Coder-1.5B under every built-in design (rlcd.designs),
# measured by eval.py contrast (the task's chosen judge, refusal rates of o+ and o-, overlaps). Rerun to resume.
#   bash bench/contrast.sh [N_PROMPTS] [OUT]        the table on stdout, the pairs and OUT/contrast.json in OUT
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-32}
OUT=${2:-runs/contrast}
PY=.venv/bin/python
DESIGNS=$($PY -c "from rlcd.designs import DESIGNS; print(' '.join(DESIGNS))")
# shellcheck disable=SC2086  # one word per design
exec $PY eval.py contrast --simulator smollm2-135m-instruct qwen2.5-coder-1.5b-instruct --design $DESIGNS \
  --task harmless --n-prompts "$N" --max-new-tokens 64 --out "$OUT" --out-json "$OUT/contrast.json"
