# Two entry points (see README):
#   make run   -- set up .venv and run the main job: the whole RLCD pipeline at the quick budget
#   make test  -- set up .venv and run the test suite
#   make test-portable -- the fast tests again under lower CPU instruction sets (what the next machine may have)
# Both create or reuse .venv and install only what is missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is pinned so that pip picks the CPU build lying on this machine's disk rather than a
# multi-GB CUDA build from the index; on a GPU machine with a CUDA torch already in the venv nothing
# is reinstalled.
TORCH_SPEC ?= torch==2.13.0

# Machines of this project's kind are an Intel Xeon (AVX-512) or an AMD EPYC (AVX2 only): MKL and ATen pick
# other kernels, so fp32 results differ in the last bits. test-portable reruns the tests that need no real
# model with the kernels of lower instruction sets (MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY), so that
# a tolerance that holds only for this machine's rounding fails here, not on the next machine, and writes
# how much of each assert_close tolerance was used to .margins-<isa>.txt (tests/numerics.py). torch.compile's
# cache is kept apart per instruction set: a kernel compiled for AVX2 does not build under ATen's default.
PORTABLE_ISAS ?= default:SSE4_2 avx2:AVX2
PORTABLE_MARKS ?= not slow and not network

.PHONY: venv run test test-portable bench trl-env bench-trl clean

$(VENV)/.installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

venv: $(VENV)/.installed

# The main job: RLCD end to end (pairs, preference models, SFT, PPO, evaluation, report) at the quick budget;
# rerunning it resumes where it stopped. RUN_ARGS adds or overrides pipeline flags.
RUN_OUT  ?= runs/quick-harmless
RUN_ARGS ?=
run: venv
	$(PY) train.py pipeline --task harmless --budget quick --out $(RUN_OUT) $(RUN_ARGS)

test: venv
	$(PY) -m pytest -q tests

test-portable: venv
	@set -e; for isa in $(PORTABLE_ISAS); do \
	  aten=$${isa%%:*}; mkl=$${isa##*:}; \
	  echo "== ATEN_CPU_CAPABILITY=$$aten MKL_ENABLE_INSTRUCTIONS=$$mkl"; \
	  ATEN_CPU_CAPABILITY=$$aten MKL_ENABLE_INSTRUCTIONS=$$mkl TORCHINDUCTOR_CACHE_DIR=/tmp/rlcd-inductor-$$aten \
	    $(PY) -m pytest -q -p no:cacheprovider -m "$(PORTABLE_MARKS)" --margins .margins-$$aten.txt tests; \
	  head -6 .margins-$$aten.txt; \
	done

bench: venv
	$(PY) bench/bench_generate.py

# The peers of the benchmarks (TRL's PPOTrainer, transformers' generate) live in a side environment, never
# in the project's: `make bench-trl` times one PPO iteration of ours and of TRL's, interleaved in one process.
TRL_ENV ?= .trl-env
$(TRL_ENV)/.installed: requirements.txt bench/trl-requirements.txt
	@test -x $(TRL_ENV)/bin/python || $(PYTHON) -m venv $(TRL_ENV)
	@$(TRL_ENV)/bin/python -c "import torch" 2>/dev/null || $(TRL_ENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(TRL_ENV)/bin/python -m pip install -q -r requirements.txt -r bench/trl-requirements.txt
	@touch $@

trl-env: $(TRL_ENV)/.installed

bench-trl: trl-env
	$(TRL_ENV)/bin/python bench/bench_ppo.py --trl

clean:
	rm -rf $(VENV) $(TRL_ENV) .pytest_cache .margins-*.txt
