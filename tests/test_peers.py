"""llama.cpp as a peer in ``propd bench``: stand-in binaries that print what llama.cpp's
``llama-completion`` and ``llama-lookup`` print (their output and log lines copied from real runs),
so the parsing, the prompt handed over and the report are checked without building llama.cpp."""

import json
import stat
import sys

import pytest

from propd.bench.peers import END_OF_TEXT, LlamaCpp, answer_text, run_seconds
from propd.bench.report import build_results, markdown
from propd.bench.run import machine_facts, run_bench
from propd.errors import PropdError
from propd.prompts import load_prompts
from tests.test_bench import tiny_propd  # noqa: F401 (fixture)

ANSWER = "Paris is the capital of France."

COMPLETION_LOG = """0.01.092.334 I common_perf_print:    sampling time =       7.39 ms
0.01.092.373 I common_perf_print:        load time =     100.59 ms
0.01.092.387 I common_perf_print: prompt eval time =     158.76 ms /    52 tokens (    3.05 ms per token,   327.55 tokens per second)
0.01.092.401 I common_perf_print:        eval time =     695.19 ms /    95 runs   (    7.32 ms per token,   136.65 tokens per second)
0.01.092.415 I common_perf_print:       total time =     871.52 ms /   147 tokens
"""
LOOKUP_LOG = """0.01.090.395 I encoded   52 tokens in    0.159 seconds, speed:  938.600 t/s
0.01.090.414 I decoded   97 tokens in    0.747 seconds, speed:  129.872 t/s
0.01.090.441 I n_draft      = 3
0.01.090.600 I common_perf_print: prompt eval time =     198.94 ms /    64 tokens (    3.11 ms per token,   321.70 tokens per second)
0.01.090.614 I common_perf_print:        eval time =     668.83 ms /    91 runs   (    7.35 ms per token,   136.06 tokens per second)
"""

# A stand-in binary: records its arguments, prints ANSWER as the named binary prints an answer the model ended, and its log.
STAND_IN = """import json, sys
args = sys.argv[1:]
with open({calls!r}, "a") as f:
    f.write(json.dumps(sys.argv) + "\\n")
prompt = args[args.index("-p") + 1]
if {lookup}:
    sys.stdout.write("\\n\\n" + prompt + {answer!r} + "<|im_end|>" + "\\n\\n")
else:
    sys.stdout.write({answer!r} + {end!r})
sys.stderr.write({log!r})
"""


@pytest.fixture
def llama_cpp(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    for name, lookup, log in (("llama-completion", False, COMPLETION_LOG), ("llama-lookup", True, LOOKUP_LOG)):
        path = tmp_path / name
        code = STAND_IN.format(calls=str(tmp_path / "calls.jsonl"), lookup=lookup, answer=ANSWER, end=END_OF_TEXT, log=log)
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return LlamaCpp(tmp_path, gguf, threads=2)


def test_the_binaries_outputs_and_logs_are_read_as_llama_cpp_prints_them():
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert answer_text("Hello there." + END_OF_TEXT, prompt, False, ["<|im_end|>"]) == ("Hello there.", True)
    assert answer_text("Hello there", prompt, False, ["<|im_end|>"]) == ("Hello there", False)  # stopped by -n
    assert answer_text("\n\n" + prompt + "Hello.<|im_end|>\n\n", prompt, True, ["<|endoftext|>", "<|im_end|>"]) == ("Hello.", True)
    assert answer_text("\n\n" + prompt + "Hello\n\n", prompt, True, ["<|im_end|>"]) == ("Hello", False)
    with pytest.raises(PropdError, match="does not start with the prompt"):
        answer_text("\n\nsomething else", prompt, True, ["<|im_end|>"])
    assert run_seconds(COMPLETION_LOG, lookup=False) == pytest.approx(0.87152)  # total: evaluation, decoding, sampling; not the load
    assert run_seconds(LOOKUP_LOG, lookup=True) == pytest.approx(0.159 + 0.747)
    with pytest.raises(PropdError, match="total time"):
        run_seconds("no timings here", lookup=False)


def test_llama_cpp_runs_in_bench_beside_ar_with_the_chat_prompt_and_its_own_timings(tiny_propd, llama_cpp, tmp_path):  # noqa: F811
    prompts = load_prompts(limit=2)
    runs = run_bench(tiny_propd, prompts, ["ar", "llama.cpp", "llama.cpp+lookup"], [1], 12, llama_cpp=llama_cpp)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2 * 3  # two prompts, each binary once at the warm-up and once in the round
    assert {args[args.index("-p") + 1] for args in calls} == {tiny_propd.tokenizer.decode(tiny_propd.encode(p.text)) for p in prompts}
    for args in calls:
        assert args[args.index("-m") + 1] == str(llama_cpp.gguf) and args[args.index("--temp") + 1] == "0"
        assert args[args.index("-n") + 1] == ("11" if args[0].endswith("llama-lookup") else "12")  # llama-lookup emits one past -n
    answer = tiny_propd.tokenizer(ANSWER, add_special_tokens=False).input_ids
    by_method = {r.method: r for r in runs}
    for method, seconds in (("llama.cpp", 0.87152), ("llama.cpp+lookup", 0.906)):
        for g in by_method[method].generations:
            assert g.text == ANSWER and g.token_ids[:-1] == answer and g.token_ids[-1] in tiny_propd.eos_ids  # the model ended it
            assert g.stats.seconds == pytest.approx(seconds)
        assert by_method[method].seconds == pytest.approx(2 * seconds)
    results = build_results(tiny_propd, runs, machine_facts(tiny_propd), {})
    report = markdown(results | {"config": {"prompts_file": "builtin", "prompts": 2, "max_new_tokens": 12}})
    assert "| llama.cpp | 1 |" in report and "peer: differs (2 prompts" in report and "**NO**" not in report


def test_llama_cpp_is_refused_where_it_cannot_run(tiny_propd, llama_cpp, tmp_path):  # noqa: F811
    prompts = load_prompts(limit=2)
    with pytest.raises(PropdError, match="--llama-cpp DIR"):
        run_bench(tiny_propd, prompts, ["ar", "llama.cpp"], [1], 4)
    with pytest.raises(PropdError, match="one prompt at a time"):
        run_bench(tiny_propd, prompts, ["ar", "llama.cpp"], [1, 2], 4, llama_cpp=llama_cpp)
    with pytest.raises(PropdError, match="one prompt at a time"):
        run_bench(tiny_propd, prompts, ["ar", "llama.cpp"], [1], 4, continuous=True, llama_cpp=llama_cpp)
    (tmp_path / "llama-lookup").unlink()
    with pytest.raises(PropdError, match="make llama-cpp"):
        run_bench(tiny_propd, prompts, ["ar", "llama.cpp+lookup"], [1], 4, llama_cpp=llama_cpp)
    with pytest.raises(PropdError, match="--llama-gguf"):
        run_bench(tiny_propd, prompts, ["ar", "llama.cpp"], [1], 4, llama_cpp=LlamaCpp(tmp_path, tmp_path / "missing.gguf", 2))
