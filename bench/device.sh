#!/usr/bin/env bash
# Everything checked and measured on a GPU machine, in one call (device time is scarce: see docs/PERFORMANCE.md,
# "GPU"). Run from the repository root on the device machine:
#
#     bash bench/device.sh            # logs and markdown tables under $OUT (or /tmp/device-out)
#
# Order: correctness first (the model-level CUDA checks and the kernel tests, side by side: neither is
# timed), then the benchmarks one at a time. Every step has its own time limit and the whole script a
# deadline (DEADLINE_S, default 400 s), so one hung step costs its limit, not the call. TRL for the PPO
# comparison travels as wheels in .whl/ (trl, datasets, dill, multiprocess; see docs/PERFORMANCE.md) and is installed
# into /tmp/site for that step only. ONLY="name ..." runs just the named steps (a rerun in the time left).
set -u
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
DEADLINE=$(( $(date +%s) + ${DEADLINE_S:-400} ))

left() { echo $(( DEADLINE - $(date +%s) )); }

# step NAME LIMIT_S CMD...: run CMD with at most LIMIT_S seconds (less if the deadline is closer), log to
# $OUT/NAME.log, print its status and the log's tail.
step() {
    local name=$1 limit=$2; shift 2
    if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return; fi
    local t=$(( limit < $(left) ? limit : $(left) ))
    if (( t < 10 )); then echo "== $name skipped: deadline"; return; fi
    local t0=$(date +%s)
    timeout "$t" "$@" > "$OUT/$name.log" 2>&1
    echo "== $name rc=$? in $(( $(date +%s) - t0 )) s (limit $t s)"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    lscpu | grep "Model name"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. correctness, the two in parallel (Triton compiles on the CPU cores)
step cuda_check 150 python3 bench/cuda_check.py &
step kernel_tests 150 python3 -m pytest -x -q -p no:cacheprovider tests/test_kernels_attention.py tests/test_kernels_logprob.py &
wait
tail -n 12 "$OUT/cuda_check.log" "$OUT/kernel_tests.log" 2>/dev/null

# 2. PPO iteration vs TRL, same process, interleaved
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || echo "TRL wheels did not install (see pip.log)"
PYTHONPATH=$PWD:/tmp/site step ppo_trl 100 python3 bench/bench_ppo.py --device cuda --trl --warmup 2 --iters 5 \
    --out "$OUT/ppo_trl.md"
tail -n 25 "$OUT/ppo_trl.log" 2>/dev/null

# 3. kernels vs SDPA flash / plain PyTorch
step kernels 90 python3 bench/bench_kernels.py --out "$OUT/kernels.md"
tail -n 30 "$OUT/kernels.log" 2>/dev/null

# 4. decode: eager vs compiled (CUDA graph) vs transformers, bf16
step generate 150 python3 bench/bench_generate.py --device cuda --precision bf16 --random --batches 1 64 \
    --compile --hf --repeats 3
tail -n 6 "$OUT/generate.log" 2>/dev/null

# 5. preference-model step vs transformers' reward model
step pm 60 python3 bench/bench_pm.py --device cuda --hf --repeats 5 --out "$OUT/pm.md"
tail -n 8 "$OUT/pm.log" 2>/dev/null

# 6. PPO with the Triton attention kernel in the model (prefill, update, reference)
step ppo_triton 60 python3 bench/bench_ppo.py --device cuda --attn-impl triton --warmup 2 --iters 3 \
    --out "$OUT/ppo_triton.md"
tail -n 16 "$OUT/ppo_triton.log" 2>/dev/null
echo "== done, $(left) s before the deadline"
