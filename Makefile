# Two entry points (see README):
#   make run   -- set up .venv, fetch the default model, answer a prompt (later: the whole RLCD pipeline)
#   make test  -- set up .venv and run the test suite
# Both create or reuse .venv and install only what is missing.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch==2.13.0 is pinned so that pip picks the CPU build lying on this machine's disk rather than a
# multi-GB CUDA build from the index; on a GPU machine with a CUDA torch already in the venv nothing
# is reinstalled.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv run test bench clean

$(VENV)/.installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

venv: $(VENV)/.installed

run: venv
	$(PY) generate.py --prompt "What is the capital of France?"

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/bench_generate.py

clean:
	rm -rf $(VENV) .pytest_cache
