"""``propd bench``: every method on the same prompts, same process, interleaved, Spec-Bench style.

For each batch size the prompts are cut into batches; every batch runs each method ``rounds`` times,
in an order shuffled from run to run (seeded) so that machine noise, and whatever state a method
leaves the machine in for the next, hits all methods alike (a rotation keeps every method behind
the same one). A method's tokens/s is its new tokens over its wall time, and its per-batch speed-ups over ``ar`` (the same batch,
the same round) give a median that one slow moment of the machine does not move; its output must be
token-identical to ``ar``'s (``lossless``).

With ``continuous``, each method decodes all the prompts at once with at most the batch size in
flight, the next prompt joining as a row finishes (as ``propd serve`` batches): no row waits for a
fixed batch's slowest one. A prompt's time is then its share of the steps it took part in (each
step's time split evenly among its rows), scaled to the run's wall time.
"""

from __future__ import annotations

import dataclasses
import platform
import random
import re
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from propd.bench.peers import BINARIES, LlamaCpp
from propd.decoding.loop import RowStats
from propd.decoding.propd import PropdMethod
from propd.decoding.sampling import Sampling
from propd.engine import Generation, Propd, device_name
from propd.errors import PropdError
from propd.models.kernels import cpu_name
from propd.prompts import Prompt

HF = "hf"


def is_peer(method: str) -> bool:
    """Another implementation run beside propd's methods: transformers (``hf``) or llama.cpp (``peers``)."""
    return method == HF or method in BINARIES


@dataclass
class MethodRun:
    """Every generation of one method at one batch size."""

    method: str
    batch_size: int
    rounds: int = 1  # runs of every batch (generations and prompts hold each run's)
    generations: list[Generation] = field(default_factory=list)
    prompts: list[Prompt] = field(default_factory=list)
    prompt_seconds: list[float] = field(default_factory=list)  # each prompt's share of its batch's wall time
    batches: list[tuple[int, float]] = field(default_factory=list)  # each batch run's new tokens and wall time, in run order
    from_memory: bool = False  # propd: its chooser started from what an earlier run learned (``PropdMethod.remember``)

    @property
    def seconds(self) -> float:
        return sum(self.prompt_seconds)


def machine_facts(model: Propd) -> dict:
    """Where a run happened and how the products ran (``exact``: the route's row-invariance check passed)."""
    return {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": model.route.dtype_name,
        "route": model.route.name,
        "exact": model.route.exact,
        "device": device_name(model.device),
        "cuda_graphs": model.decoder.graphed is not None,
        "argmax_screen": model.decoder.lm_head.screen is not None,  # greedy argmax read in int8, exact (csrc/screen.c)
    }


def hf_generate(model: Propd, prompts: list[str], max_new_tokens: int) -> list[Generation]:
    """``transformers`` greedy generate on the same batch (left-padded), timed as one call."""
    encoded = [model.encode(p) for p in prompts]
    width = max(len(e) for e in encoded)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else min(model.eos_ids)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.hf_model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=sorted(model.eos_ids)
        )
    seconds = time.perf_counter() - t
    results = []
    for p, row in zip(prompts, out[:, width:].tolist()):
        tokens = []
        for tok in row:
            tokens.append(tok)
            if tok in model.eos_ids:
                break
        stats = RowStats(token_ids=tokens, seconds=seconds)
        results.append(Generation(p, model.tokenizer.decode(tokens, skip_special_tokens=True), tokens, stats))
    return results


def run_bench(
    model: Propd,
    prompts: list[Prompt],
    methods: list[str],
    batch_sizes: list[int],
    max_new_tokens: int,
    heads: str = "default",
    tree: str | None = None,
    sampling: Sampling | None = None,
    draft_model: str | None = None,
    rounds: int = 1,
    continuous: bool = False,
    llama_cpp: LlamaCpp | None = None,
) -> list[MethodRun]:
    """Every method on every batch of prompts (``continuous``: on all of them, at most a batch size
    at once), ``rounds`` times, side by side. With ``sampling``
    (its seed set), prompt k samples with seed + k under every method and batch size, so exact
    acceptance must give AR sampling's very tokens; ``hf`` and llama.cpp (``llama_cpp``, its
    binaries and GGUF file) stay greedy. llama.cpp runs one prompt at a time, timed by its own
    counters (``peers``)."""
    if "ar" not in methods:
        raise PropdError("bench needs 'ar' among the methods: it is the reference for speed-up and losslessness")
    if rounds < 1:
        raise PropdError("rounds must be at least 1")
    if continuous and HF in methods:
        raise PropdError("hf cannot bench continuously: transformers' generate decodes fixed batches")
    if peers := [m for m in methods if m in BINARIES]:
        if llama_cpp is None:
            raise PropdError(f"{peers[0]} needs llama.cpp's binaries: pass --llama-cpp DIR (built by `make llama-cpp`)")
        if continuous or batch_sizes != [1]:
            raise PropdError(f"{peers[0]} runs one prompt at a time here: bench it with --batch-sizes 1, without --continuous")
        llama_cpp.check(peers)
    builders = {m: (None if is_peer(m) else _build(model, m, tree, heads, draft_model)) for m in methods}

    def run_one(method: str, batch: list[Prompt], n: int, rows: int, start: int = 0) -> tuple[list[Generation], float]:
        texts = [p.text for p in batch]
        seeded = None if sampling is None else dataclasses.replace(sampling, seed=sampling.seed + start)
        if method in BINARIES:
            gens = llama_cpp.generate(model, texts, method, n)
            return gens, sum(g.stats.seconds for g in gens)
        t = time.perf_counter()
        gens = hf_generate(model, texts, n) if method == HF else model.generate(texts, builders[method], n, rows, sampling=seeded, continuous=continuous)
        return gens, time.perf_counter() - t

    runs = []
    total = rounds * sum(len(methods) * (1 if continuous else -(-len(prompts) // b)) for b in batch_sizes)
    with tqdm(total=total, desc="bench", unit="run") as bar:
        for b in batch_sizes:
            for m in methods:  # warm-up at this batch size: first-call allocations, caches, a GPU's graphs of these rows and lengths
                run_one(m, prompts[:b], max_new_tokens, b)
            by_method = {m: MethodRun(m, b, rounds, from_memory=isinstance(builders[m], PropdMethod) and builders[m].recalled) for m in methods}
            width = len(prompts) if continuous else b
            batch_starts = [start for _ in range(rounds) for start in range(0, len(prompts), width)]  # round by round
            for k, start in enumerate(batch_starts):
                batch = prompts[start : start + width]
                order = random.Random(k).sample(methods, len(methods))  # not a rotation: that keeps each method behind the same one
                for m in order:
                    gens, seconds = run_one(m, batch, max_new_tokens, b, start)
                    r = by_method[m]
                    r.generations += gens
                    r.prompts += batch
                    r.prompt_seconds += _shares(gens, seconds) if continuous else [seconds / len(batch)] * len(batch)
                    r.batches.append((sum(g.new_tokens for g in gens), seconds))
                    bar.set_postfix(batch_size=b, method=m)
                    bar.update(1)
            runs += by_method.values()
    return runs


def _shares(generations: list[Generation], seconds: float) -> list[float]:
    """Each generation's part of a continuous run's ``seconds``: its share of the loop's steps and
    prefills (``RowStats.share_seconds``), scaled to the whole."""
    shares = [g.stats.share_seconds for g in generations]
    total = sum(shares)
    return [seconds * s / total if total else seconds / len(shares) for s in shares]


def _build(model: Propd, spec: str, default_tree: str | None, heads, draft_model: str | None = None):
    """``medusa@top16`` names a method with its own tree (a bare name takes ``--tree``);
    ``propd@medusa`` / ``propd@model`` (the ``--draft-model``) names propd's drafter (default the draft layer); ``+prune[K][rR][lL]``
    (top-K, sparing the drafter's R best guesses, after layer L),
    ``+noprune``, ``+static[TREE]``, ``+ranks`` (no draft scores), ``+nolookup`` (no prompt-lookup guesses), ``+nomemory`` (not started from
    what the last run learned) and ``+depthN`` (trees at most N deep) set propd's mechanisms
    (``propd+static+prune``: prune-only)."""
    head, *switches = spec.split("+")
    name, _, suffix = head.partition("@")
    if name != "propd":
        if switches:
            raise PropdError(f"{spec!r}: only propd takes +prune / +static")
        return model.method(name, suffix or default_tree, heads=heads, draft_model=draft_model)
    options = {"drafter": suffix or "draft"}
    for switch in switches:
        if switch.startswith("noprune"):
            options["prune"] = False
        elif match := re.fullmatch(r"prune(\d*)(?:r(\d+))?(?:l(\d+))?", switch):
            options.update(prune=True, prune_top_k=int(match[1] or 10), prune_keep_ranks=int(match[2] or 0), prune_layer=int(match[3]) if match[3] else None)
        elif switch.startswith("static"):
            options.update(dynamic=False, tree=switch[6:] or None)
        elif switch == "ranks":
            options["draft_scores"] = False
        elif switch == "nolookup":
            options["lookup"] = False
        elif switch == "nomemory":
            options["memory"] = False
        elif match := re.fullmatch(r"depth(\d+)", switch):
            options["max_depth"] = int(match[1])
        else:
            raise PropdError(f"{spec!r}: unknown switch +{switch}; use +prune[K][rR][lL], +noprune, +static[TREE], +ranks, +nolookup, +nomemory, +depthN")
    return model.method(name, heads=heads, draft_model=draft_model, **options)


def first_mismatch(model: Propd, prompt: Prompt, reference: list[int], got: list[int]) -> dict | None:
    """Where a method's tokens first differ from AR's, and the reference logit gap there
    (the model's logit of AR's token minus that of the method's token at that position)."""
    n = next((i for i, (a, b) in enumerate(zip(reference, got)) if a != b), None)
    if n is None:
        if len(reference) == len(got):
            return None
        n = min(len(reference), len(got))
        return {
            "prompt_id": prompt.id, "position": n, "ar_token": reference[n] if n < len(reference) else None,
            "method_token": got[n] if n < len(got) else None, "logit_gap": None,
        }
    ids = torch.tensor([model.encode(prompt.text) + reference[:n]], device=model.device)
    with torch.inference_mode():
        logits = model.hf_model(ids).logits[0, -1]
    return {
        "prompt_id": prompt.id,
        "position": n,
        "ar_token": reference[n],
        "method_token": got[n],
        "logit_gap": round(float(logits[reference[n]] - logits[got[n]]), 6),
    }
