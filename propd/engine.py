"""The public entry point: load a model once, then generate with any method, batched or streamed."""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from propd.bench.latency import step_ms
from propd.decoding.ar import ARMethod
from propd.decoding.draft import DraftMethod
from propd.decoding.lookup import LookupMethod
from propd.decoding.loop import DecodeLoop, Method, RowStats, StreamCallback, generate_batch, generate_continuous, summarize
from propd.decoding.propd import PropdMethod
from propd.decoding.pruning import Pruner
from propd.decoding.sampling import Sampling
from propd.decoding.spec import PRIOR as SPEC_PRIOR
from propd.decoding.spec import SpecMethod
from propd.decoding.tree import TreeMethod
from propd.errors import PropdError
from propd.heads.draft import DraftHead
from propd.heads.early import EarlyHead
from propd.heads.medusa import MedusaHeads
from propd.models import native
from propd.models.attention import blocked_is_exact, runs_native
from propd.models.decoder import Decoder, ModelArgs
from propd.models.kernels import DTYPES, PACKED, Q4_KERNELS, Route, autograd_route, choose_route, cpu_name, holds_q4_1
from propd.models.loading import DEFAULT_MODEL, cache_file, load_hf, write_cache
from propd.tree.dynamic import AcceptanceModel, TreeChooser
from propd.tree.tree import TokenTree, load_tree

T = TypeVar("T")
METHODS = ("ar", "bpd", "medusa", "draft", "lookup", "propd", "spec")
DRAFTERS = ("draft", "medusa", "model")
DEFAULT_HEADS = Path(__file__).parent / "heads" / "default"
PRUNE_BY_DEFAULT = False  # the shipped early head rules out too many accepted tokens to pay (docs/propd.md: the frontier)
MEMORY_ENV = "PROPD_MEMORY"  # where ProPD keeps its choosers' memory (``Propd.chooser_memory``)
DRAFT_DEPTH = 2  # propd's trees with the draft layer: each level it drafts costs a pass (docs/propd.md: Depth)


@dataclass
class Generation:
    """One prompt's result; ``token_ids`` holds the new tokens only."""

    prompt: str
    text: str
    token_ids: list[int]
    stats: RowStats

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> dict:
        s = self.stats
        return {
            "prompt": self.prompt,
            "text": self.text,
            "token_ids": self.token_ids,
            **summarize([s], s.seconds),
            "prefill_seconds": round(s.prefill_seconds, 4),
            "pruning_ratio": round(1 - sum(s.step_late_tokens) / sum(s.step_tree_tokens), 4) if s.steps else 0.0,
            "tree_sizes": s.step_tree_tokens,
        }


class Propd:
    """A model, its tokenizer and our decoder. ``Propd.from_pretrained("default")`` loads SmolLM2."""

    def __init__(
        self, hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype | None = torch.float32, name: str = DEFAULT_MODEL,
        device: str | torch.device = "cpu", route: str | Route | None = None, keep_reference: bool = True,
    ) -> None:
        """``dtype`` None: the fastest exact route of any dtype on this machine; ``route`` names one
        (``kernels.Route``) instead. ``keep_reference`` False: let the ``transformers`` model go once
        our decoder has its weights (``hf_model`` reloads it on demand)."""
        self.device = _available(device)
        self.tokenizer = tokenizer
        self.name = name
        self.route, self.route_measurements = pick_route(ModelArgs.from_hf_config(hf_model.config), dtype, route, self.device, hf_model)
        if self.route.tile and not self.route.exact:
            print(f"propd: warning: {self.route.name} is not exact here, and parallel methods are checked "
                  "token by token only (logits may differ from AR's in the last bits)", file=sys.stderr)
        self.dtype = self.route.dtype
        self.decoder = Decoder.from_hf(hf_model, self.route).to(self.device)
        eos = {tokenizer.eos_token_id, *(_as_list(getattr(hf_model.generation_config, "eos_token_id", None)))}
        self.eos_ids = {int(e) for e in eos if e is not None}
        self._hf_model = hf_model if keep_reference else None
        self._draft_models: dict[str, Propd] = {}
        self._loaded: dict[tuple[str, int, int], MedusaHeads | DraftHead] = {}  # (weights file, its mtime and size) -> heads (``_load_once``)

    @classmethod
    def from_pretrained(
        cls, model: str | os.PathLike = DEFAULT_MODEL, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
        route: str | Route | None = None,
    ) -> "Propd":
        """Load a model: ``default``, a named model (``qwen2.5-coder-0.5b``, ``qwen2.5-coder-1.5b``), a local HF
        directory or a .gguf file. ``dtype`` None (or
        "auto"): the fastest dtype whose products are exact on this machine."""
        if isinstance(dtype, str):
            if dtype not in (*DTYPES, "auto"):
                raise PropdError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
            dtype = DTYPES.get(dtype)
        device = _available(device)  # before the model loads: a bad device fails at once
        hf_model, tokenizer = load_hf(model, torch.float32)
        return cls(hf_model, tokenizer, dtype, str(model), device, route, keep_reference=False)

    @property
    def hf_model(self) -> PreTrainedModel:
        """The ``transformers`` model in our dtype (the reference for ``hf`` benchmarks and
        mismatch reports), loaded on first use."""
        if self._hf_model is None:
            self._hf_model = load_hf(self.name, self.dtype)[0]
        return self._hf_model.to(self.device, self.dtype)

    def on_device(self) -> AbstractContextManager:
        """A scope in which new tensors are made on the model's device. On the CPU it is no scope at
        all: torch's device mode would add its cost to every one of a decode step's small ops."""
        return nullcontext() if self.device.type == "cpu" else torch.device(self.device)

    @property
    def max_context(self) -> int:
        return self.decoder.args.max_position

    def encode(self, prompt: str | list[dict], chat: bool = True) -> list[int]:
        """Tokenise a prompt, through the model's chat template unless ``chat`` is False; a list of
        ``{"role", "content"}`` messages is a conversation (earlier turns kept)."""
        if isinstance(prompt, list):
            return self._encode_messages(prompt)
        if not isinstance(prompt, str):
            raise PropdError(f"a prompt is a string or a list of messages, got {type(prompt).__name__}")
        if not prompt.strip():
            raise PropdError("empty prompt")
        if chat and self.tokenizer.chat_template:
            return self._encode_messages([{"role": "user", "content": prompt}])
        return self._tokenize(prompt, add_special_tokens=True)

    def _tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        try:
            return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids
        except (TypeError, ValueError) as e:  # e.g. a lone surrogate, which no UTF-8 tokenizer takes
            raise PropdError(f"the tokenizer cannot take this prompt: {str(e).splitlines()[0]}") from e

    def _encode_messages(self, messages: list[dict]) -> list[int]:
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages):
            raise PropdError("a conversation is a non-empty list of {'role': ..., 'content': '...'} messages")
        if not any(m["content"].strip() for m in messages):
            raise PropdError("empty prompt")
        if not self.tokenizer.chat_template:
            return self._tokenize("\n".join(m["content"] for m in messages), add_special_tokens=True)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._tokenize(text, add_special_tokens=False)

    def encode_fitting(self, prompts: list[str | list[dict]], max_new_tokens: int, method: Method, chat: bool = True) -> list[list[int]]:
        """Every prompt tokenised (``encode``), or an error naming the first that does not fit (``check_fits``)."""
        encoded = [self.encode(p, chat) for p in prompts]
        for p, ids in zip(prompts, encoded):
            try:
                self.check_fits(ids, max_new_tokens, method)
            except PropdError as e:
                raise PropdError(f"{e}: {str(p)[:60]!r}{'...' if len(str(p)) > 60 else ''}") from None
        return encoded

    def check_fits(self, prompt_ids: list[int], max_new_tokens: int, method: Method) -> None:
        """Refuse a generation that would run past the model's context (a tree reaches ``tree_depth`` further)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise PropdError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
        if len(prompt_ids) + max_new_tokens + method.tree_depth > self.max_context:
            tree = f" (+ a tree {method.tree_depth} deep)" if method.tree_depth else ""
            raise PropdError(
                f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens{tree} exceeds "
                f"the model's context of {self.max_context} tokens"
            )

    def load_heads(self, heads: str | os.PathLike | MedusaHeads = "default") -> MedusaHeads:
        """Medusa heads for this model: ``default`` (shipped for the default model), a directory, or an object."""
        if not isinstance(heads, MedusaHeads):
            directory = self._heads_dir(heads)
            heads = self._load_once(directory / "heads.safetensors", lambda: MedusaHeads.load(directory))
        heads.check_fits(self.decoder.args.dim, self.decoder.args.vocab_size)
        return heads.to(self.device)  # heads compute in fp32 on the fp32 normed states

    def _load_once(self, weights: Path, load: Callable[[], T]) -> T:
        """``load()`` once per weights file as it is now: a method made per call (``generate(prompts,
        "propd")``) took the draft from disk and packed it again every time (25 ms at batch 8, 2% of
        its generation), and a file written anew is read anew."""
        try:
            stat = weights.stat()
            key = (str(weights.resolve()), stat.st_mtime_ns, stat.st_size)
        except OSError:
            return load()  # the loader says what is missing
        if key not in self._loaded:
            self._loaded[key] = load()
        return self._loaded[key]

    def load_draft(self, heads: str | os.PathLike | DraftHead = "default") -> DraftHead:
        """The draft layer for this model: ``default`` (shipped for the default model), a directory
        holding draft.json, or an object."""
        if not isinstance(heads, DraftHead):
            directory = self._heads_dir(heads)
            if not (directory / "draft.json").exists():
                raise PropdError(f"{directory} holds no draft layer (draft.json); `propd train` trains one (see --draft-epochs)")
            heads = self._load_once(directory / "draft.safetensors", lambda: DraftHead.load(directory))
        heads.check_fits(self.decoder.args)
        return heads.to(self.device)

    def load_early_head(self, heads: str | os.PathLike | MedusaHeads | DraftHead = "default", layer: int | None = None) -> EarlyHead:
        """The early-pruning head of a heads directory (``default``: shipped for the default model;
        drafter heads already loaded: the shipped ones too): its chosen one (early_head.json), or the
        one trained after ``layer`` (early_heads/layer-K, where the chosen one is at another layer)."""
        directory = self._heads_dir(heads if isinstance(heads, (str, os.PathLike)) else "default")
        if not (directory / "early_head.json").exists():
            raise PropdError(f"{directory} holds no early head (early_head.json) for pruning; pass --no-prune, or train one (`propd train`)")
        head = EarlyHead.load(directory)
        if layer is not None and head.layer != layer:
            held = sorted(int(d.name.removeprefix("layer-")) for d in (directory / "early_heads").glob("layer-*") if (d / "early_head.json").exists())
            if layer not in held:
                raise PropdError(f"{directory} holds no early head trained after layer {layer} (it has layers {sorted({head.layer, *held})}); "
                                 "`propd train --early-layers` trains them")
            head = EarlyHead.load(directory / "early_heads" / f"layer-{layer}")
        if head.dim != self.decoder.args.dim or head.vocab_size != self.decoder.args.vocab_size or head.layer >= self.decoder.args.n_layers:
            raise PropdError(f"{directory}: the early head (dim {head.dim}, vocab {head.vocab_size}, layer {head.layer}) does not fit this model")
        return head.to(self.device)

    def _heads_dir(self, heads: str | os.PathLike) -> Path:
        if str(heads) == "default":
            if self.name != DEFAULT_MODEL:
                raise PropdError("--heads default fits only the default model; pass --heads DIR trained for this model")
            return DEFAULT_HEADS
        if not Path(heads).is_dir():
            raise PropdError(f"heads directory not found: {heads}")
        return Path(heads)

    def method(
        self, name: str = "ar", tree: str | None = None, heads: str | os.PathLike | MedusaHeads | DraftHead = "default", drafter: str = "draft",
        prune: bool = PRUNE_BY_DEFAULT, dynamic: bool = True, prune_top_k: int = 10, prune_keep_ranks: int = 0, draft_scores: bool = True,
        draft_model: "str | os.PathLike | Propd | None" = None, max_depth: int | None = None, prune_layer: int | None = None, lookup: bool = True,
        memory: bool | str | os.PathLike = True,
    ) -> Method:
        """A decoding method by name: ``ar``, ``medusa`` (static tree, default mc_sim_7b_63),
        ``bpd`` (chain of each head's top-1), ``draft`` (the draft layer fills a static tree,
        default best8d2: 8 tokens, 2 levels of drafting passes) or ``propd`` (a tree chosen every step, filled by ``drafter``: the
        draft layer, the Medusa heads or ``model``, the ``draft_model``; ``prune``: early pruning by the early head's top
        ``prune_top_k``, sparing the drafter's ``prune_keep_ranks`` best guesses, after layer ``prune_layer`` (default: the
        heads' chosen early head); ``dynamic``
        False: the static ``tree`` every step, default best16 (chain4 drafted by a model); ``draft_scores`` False: the draft
        layer fills the rank statistics' best tree instead of its own most probable nodes;
        ``lookup`` False: no prompt-lookup guesses offered beside the draft layer's; ``memory`` False: start from the
        shipped statistics and explore the step costs, rather than from what the last run with the same
        settings learned on this machine (``chooser_memory``), or a file's path: that memory, read at
        once and written after each generation; ``max_depth``: its trees' depth limit, default
        ``DRAFT_DEPTH`` with the draft layer (1 from
        ``WIDE_BATCH`` rows on) and every depth of the statistics otherwise); ``spec``:
        ``draft_model`` (a name, directory, .gguf or loaded ``Propd`` sharing the tokenizer) fills
        a static tree (default chain4) with its own top-k guesses; ``lookup``: prompt lookup decoding, a chain (default chain3)
        of what followed each row's newest n-gram where it last occurred in its prompt or answer."""
        with self.on_device():
            if name == "ar":
                return ARMethod()
            if name == "propd":
                if drafter not in DRAFTERS:
                    raise PropdError(f"unknown drafter {drafter!r}; available: {', '.join(DRAFTERS)}")
                if drafter == "model":
                    stats = SPEC_PRIOR
                    static = load_tree(tree or "chain4", stats) if not dynamic else load_tree("chain1")
                    inner = self._spec(draft_model, static)
                else:
                    d = self.load_draft(heads) if drafter == "draft" else self.load_heads(heads)
                    stats = d.meta.get("rank_probabilities")
                    if not stats:
                        raise PropdError(f"propd needs the {drafter}'s acceptance statistics (rank_probabilities), and these have none")
                    stats = AcceptanceModel(stats).p  # checked: probabilities, one list per depth
                    static = load_tree(tree or "best16", stats) if not dynamic else load_tree("chain1")
                    inner = DraftMethod(d, static) if drafter == "draft" else TreeMethod(d, static)
                vocab = None if drafter == "model" else d.candidate_vocab  # the tokens the drafter can guess
                pruner = Pruner(self.load_early_head(heads, prune_layer), prune_top_k, prune_keep_ranks, vocab) if prune else None
                depth = max_depth or (DRAFT_DEPTH if drafter == "draft" else len(stats))
                wide_depth = 1 if drafter == "draft" and max_depth is None else None  # each level a drafting pass: see TreeChooser
                chooser = TreeChooser(AcceptanceModel(stats[:depth]), wide_depth=wide_depth) if dynamic else None
                settings = {"drafter": drafter, "draft_model": str(getattr(draft_model, "name", draft_model)), "statistics": stats, "depth": depth,
                            "draft_scores": draft_scores, "lookup": lookup, "pruner": pruner and [pruner.layer, pruner.top_k, pruner.keep_ranks]}
                if isinstance(memory, bool):
                    memory_file = self.chooser_memory(settings) if memory else None
                elif isinstance(memory, (str, os.PathLike)):
                    memory_file = Path(memory)
                else:
                    raise PropdError(f"memory is True, False or a file's path, got {memory!r}")
                return PropdMethod(inner, chooser, pruner, draft_scores, lookup, memory_file)
            if name == "spec":
                return self._spec(draft_model, load_tree(tree or "chain4"))
            if name == "lookup":
                if tree is not None and not re.fullmatch(r"chain[1-9]\d*", tree):
                    raise PropdError(f"--method lookup verifies a chain of guesses (--tree chainN), not the tree {tree!r}")
                return LookupMethod(load_tree(tree or "chain3"))
            if name == "draft":
                d = self.load_draft(heads)
                t = load_tree(tree or "best8d2", d.meta.get("rank_probabilities"))
                if t.size < 2:
                    raise PropdError(f"tree {tree!r} holds only the root: the draft needs nodes to fill (use --method ar for plain decoding)")
                return DraftMethod(d, t)
            if name in ("medusa", "bpd"):
                h = self.load_heads(heads)
                spec = tree or ("mc_sim_7b_63" if name == "medusa" else f"chain{h.num_heads}")
                return TreeMethod(h, load_tree(spec, h.meta.get("rank_probabilities")))
        raise PropdError(f"unknown method {name!r}; available: {', '.join(METHODS)}")

    def chooser_memory(self, settings: dict) -> Path | None:
        """Where ProPD keeps what its chooser learned (``PropdMethod.remember``) for these settings of
        it on this machine, route and model: in ``$PROPD_MEMORY`` (a directory; ``off``: nowhere),
        by default ``$PROPD_CACHE/propd``. ``format`` changes where what the chooser learns changes
        meaning (2: from 4 rows every row verifies the chosen tree, so what trees delivered there before is moot; 3: the
        weights in 2 MB pages, ``pages``, changed every step's cost)."""
        place = os.environ.get(MEMORY_ENV, "")
        if place == "off":
            return None
        key = {"format": 3, "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device_name(self.device),
               "route": self.route.name, "kernels": native.build_id(), "model": self.name, "args": vars(self.decoder.args), **settings}
        path = cache_file("propd", json.dumps(key, sort_keys=True, default=str), ".json")
        return Path(place) / path.name if place else path

    def _spec(self, draft_model: "str | os.PathLike | Propd | None", tree: TokenTree) -> SpecMethod:
        """``tree`` filled by ``draft_model``'s guesses."""
        if draft_model is None:
            raise PropdError("drafting by a model needs --draft-model: a smaller model with the same tokenizer, e.g. qwen2.5-coder-0.5b")
        small = draft_model if isinstance(draft_model, Propd) else self.load_draft_model(draft_model)
        method = SpecMethod(small.decoder, tree)
        method.check_fits(self.decoder)
        return method

    def load_draft_model(self, name: str | os.PathLike) -> "Propd":
        """A draft model for ``spec``, loaded once per name. It runs inside this model's steps: on
        our AMX route it takes that route too (another route's threads would contend with ours)."""
        if str(name) not in self._draft_models:
            route = self.route.name if self.route.kernel in PACKED else None
            self._draft_models[str(name)] = Propd.from_pretrained(name, device=self.device, route=route)
        return self._draft_models[str(name)]

    def generate(
        self,
        prompts: list[str],
        method: str | Method = "ar",
        max_new_tokens: int = 128,
        batch_size: int = 1,
        chat: bool = True,
        on_tokens: StreamCallback | None = None,
        sampling: Sampling | None = None,
        continuous: bool = False,
    ) -> list[Generation]:
        """Generation for every prompt, ``batch_size`` prompts decoding together: in fixed batches
        (each ends with its slowest row), or with ``continuous`` the next prompt joining as a row
        finishes (as ``propd serve`` batches); greedy, or by ``sampling`` (prompt k takes seed
        ``sampling.seed + k``: the same text at any batch size, either way, and with any method
        under exact acceptance). ``on_tokens(prompt_index, new_token_ids)`` is called as tokens
        are accepted."""
        if isinstance(prompts, str):
            raise PropdError("generate takes a list of prompts: pass [prompt] (or use stream for one)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise PropdError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
        m = self.method(method) if isinstance(method, str) else method
        encoded = self.encode_fitting(prompts, max_new_tokens, m, chat)
        seeds = [(sampling.base_seed() if sampling is not None else 0) + k for k in range(len(prompts))]
        with self.on_device():
            if continuous:
                stats = generate_continuous(self.decoder, m, encoded, max_new_tokens, self.eos_ids, batch_size, on_tokens, sampling, seeds)
            else:
                stats = []
                for start in range(0, len(prompts), batch_size):
                    callback = None if on_tokens is None else (lambda row, toks, s=start: on_tokens(s + row, toks))
                    end = start + batch_size
                    stats += generate_batch(self.decoder, m, encoded[start:end], max_new_tokens, self.eos_ids, callback, sampling, seeds[start:end])
        remember(m)
        return [Generation(p, self.tokenizer.decode(s.token_ids, skip_special_tokens=True), s.token_ids, s) for p, s in zip(prompts, stats)]

    def stream(
        self, prompt: str | list[dict], method: str | Method = "ar", max_new_tokens: int = 128, chat: bool = True, sampling: Sampling | None = None,
    ) -> Iterator[str]:
        """Yield the text of one generation as it is produced; decoding stops when the caller stops
        reading. ``prompt``: a string or a conversation (a list of messages)."""
        m = self.method(method) if isinstance(method, str) else method
        ids = self.encode(prompt, chat)
        self.check_fits(ids, max_new_tokens, m)
        loop = DecodeLoop(self.decoder, m, self.eos_ids)
        loop.submit([ids], max_new_tokens, sampling)
        text = TextStream(self.tokenizer)
        while loop.busy:
            with self.on_device():
                events = loop.advance()
            for _, tokens in events:
                if piece := text.push(tokens):
                    yield piece
        if rest := text.finish():
            yield rest
        remember(m)


def pick_route(
    args: ModelArgs, dtype: torch.dtype | None, route: str | Route | None, device: torch.device, model: PreTrainedModel | None = None,
) -> tuple[Route, list[dict]]:
    """The products' route for this model on this device, and what was measured to choose it: with
    ``model``, the finalists' whole decode steps on its own weights (``decode_steps_ms``). On a
    GPU, plain products in ``dtype`` (default fp32) or the ``route`` named, not checked for
    row-invariance there (see docs/engine.md, 5: on an H100, padding every product to one shape cost a quarter
    of a step and left batch-8 trees' logits as far from AR's)."""
    if isinstance(route, Route):
        return route, []
    if device.type != "cpu":
        return (Route.parse(route) if route else autograd_route(dtype or torch.float32)), []
    steps = decode_steps_ms(model) if model is not None else None
    q4_1 = model is not None and holds_q4_1(model.get_decoder().layers[0].mlp.gate_proj.weight.detach())
    chosen, measured = choose_route(args.product_shapes(), dtype, route, steps, q4_1)
    if chosen.kernel in Q4_KERNELS and model is not None:
        native.native_kernel().q4_fetch_from(q4_fetch(model, chosen))
    if chosen.exact and not runs_native(args.head_dim, device) and not blocked_is_exact(args.n_heads, args.n_kv_heads, args.head_dim):
        print("propd: warning: attention runs as tensor ops here (no C kernel) and they are not row-invariant on this machine", file=sys.stderr)
        chosen = replace(chosen, exact=False)
    return chosen, measured


STEP_POINTS = ((1, 1), (1, 4), (8, 1))  # (rows, tree tokens): AR at batch 1, a 4-token tree at batch 1, AR at batch 8


def decode_steps_ms(model: PreTrainedModel, rounds: int = 5) -> Callable[[list[Route]], list[dict[str, float]]]:
    """What each route's decode steps take on ``model``'s weights, in ms: AR at batch 1 and 8 and a
    4-token tree at batch 1 ("1x1", "8x1", "1x4"), the steps decoding runs most (a prompt, hundreds
    of rows a step, runs once an answer). The routes take turns for ``rounds`` rounds and each keeps
    its fastest: on this project's shared CPUs other work only ever adds time, and one moment's
    timing was off by a fifth."""

    def measure(routes: list[Route]) -> list[dict[str, float]]:
        decoders = [Decoder.from_hf(model, route) for route in routes]
        times: dict[tuple[int, int, int], list[float]] = {}
        with tqdm(total=rounds * len(routes) * len(STEP_POINTS), desc="timing decode steps by route", unit="point") as bar:
            for _ in range(rounds):
                for i, decoder in enumerate(decoders):
                    for b, n in STEP_POINTS:
                        times.setdefault((i, b, n), []).append(step_ms(decoder, b, n, repeats=3))
                        bar.update(1)
        return [{f"{b}x{n}": min(times[i, b, n]) for b, n in STEP_POINTS} for i in range(len(routes))]

    return measure


def q4_fetch(model: PreTrainedModel, route: Route, rounds: int = 5) -> int:
    """The rows from which the Q4_1 kernels fetch a block's bytes ahead (``csrc/matmul_q4.c``): 1 or 2,
    whichever gives ``model``'s AR step at batch 1 on ``route`` the shorter time, the two taking turns
    for ``rounds`` rounds (a row alone lost 6-13% by it on the AMD EPYC and gained 19% on the Intel
    Xeon with AMX). Measured once per CPU, route, model and build of the kernels; no output depends on it."""
    key = json.dumps({"q4_fetch": 2, "cpu": cpu_name(), "threads": torch.get_num_threads(), "kernels": native.build_id(), "route": route.name,
                      "config": model.config.to_diff_dict()}, sort_keys=True, default=str)
    path = cache_file("routes", key, ".json")
    try:
        return int(json.loads(path.read_text())["fetch_from"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    decoder, lib = Decoder.from_hf(model, route), native.native_kernel()
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in tqdm(range(rounds), desc="timing the Q4_1 kernels' fetching", unit="round"):
        for rows in times:
            lib.q4_fetch_from(rows)
            times[rows].append(step_ms(decoder, 1, 1, repeats=3))
    fetch_from = min(times, key=lambda rows: min(times[rows]))
    write_cache(path, json.dumps({"fetch_from": fetch_from, "ms": times}))
    return fetch_from


class TextStream:
    """Turns token ids into text increments. A multi-byte character split across tokens is held
    back until it is complete (the text before it is not); ``finish`` gives whatever is left."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_ids: list[int]) -> str:
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        complete = len(text.rstrip("\ufffd"))
        piece, self.emitted = text[self.emitted : complete], max(self.emitted, complete)
        return piece

    def finish(self) -> str:
        """The rest of the text, incomplete characters included (as the tokenizer renders them)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def device_name(device: torch.device) -> str:
    """What a report calls the device: the GPU's name, or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def _available(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise PropdError(f"unknown device {str(device)!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PropdError(f"device {device} asked for, but this torch ({torch.__version__}) sees no CUDA GPU")
    return device


def remember(method: Method) -> None:
    """After a generation: ProPD keeps what its chooser learned for the next run."""
    if isinstance(method, PropdMethod):
        method.remember()


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
