#!/usr/bin/env bash
# The judge candidates on the 156 allowed human-labelled harm pairs (PyRIT's half whose request hashes to
# 0-7), every design choice selected by 5-fold cross-validation by request (eval.py judge-agreement). The
# model measurements are cached under $RLCD_HOME/judge-cache, so a rerun or a larger grid measures only
# what is new. The measured table: docs/JUDGES.md.
#   bash bench/judges.sh [OUT_JSON]     (about 1.5 hours on 2 cores in bf16, most of it Qwen2.5-Coder-1.5B)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/judges.json}
S=smollm2-135m-instruct
Q05=qwen2.5-coder-0.5b-instruct
Q15=qwen2.5-coder-1.5b-instruct
ALL16=$(seq -s + 0 15)
candidates=(
  "$S:pairwise:chat:p1:prob" "$S:pairwise:plain:p1:prob"
  $(for i in $(seq 0 15); do echo "$S:pairwise:chat:p$i:prob"; done) "$S:pairwise:chat:p$ALL16:prob"
  $(for q in 0 1 2 3; do echo "$S:pointwise:chat:q$q"; done)
  "$Q05:pairwise:chat:p1:prob" $(for q in 0 1 2 3; do echo "$Q05:pointwise:chat:q$q"; done)
  "$Q15:pairwise:chat:p1:prob" $(for q in 0 1 2 3; do echo "$Q15:pointwise:chat:q$q"; done)
)
.venv/bin/python eval.py judge-agreement --pairs human --precision bf16 --batch-size 8 --select balanced \
  --judge "${candidates[@]}" --out "$OUT"
