"""``propd`` command line: generate, chat, demo, bench, calibrate, latency, train, serve, load."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

from propd.decoding.sampling import ACCEPTANCES
from propd.engine import DRAFTERS, METHODS
from propd.errors import PropdError
from propd.models.kernels import DTYPES


def port_number(text: str) -> int:
    n = _int(text)
    if not 1 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {n}")
    return n


def output_dir(path: str) -> Path:
    """``--out``, made before the work whose results it will hold (a file there would lose them)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise PropdError(f"--out {out} is a file; pass a directory for the results")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PropdError(f"cannot make --out {out}: {e}") from e
    return out


def positive_int(text: str) -> int:
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def non_negative_int(text: str) -> int:
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers, e.g. ``1,4,8``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("needs one or more comma-separated integers")
    return [positive_int(p) for p in parts]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def check_method_args(args: argparse.Namespace) -> None:
    """Before the model loads: the tree must parse, and options the method ignores are named once."""
    from propd.tree.tree import check_tree_spec

    ignored = []
    if args.method == "ar":
        ignored += [o for o, set_ in (("--tree", args.tree), ("--heads", args.heads != "default")) if set_]
    if args.method == "lookup" and args.heads != "default":
        ignored.append("--heads")
    if args.method == "propd" and args.tree and args.dynamic:
        ignored.append("--tree")
    if args.method != "propd":
        switches = (("--prune", args.prune is not None), ("--no-dynamic", not args.dynamic), ("--no-draft-scores", not args.draft_scores),
                    ("--max-depth", args.max_depth is not None), ("--prune-layer", args.prune_layer is not None), ("--no-lookup", not args.lookup),
                    ("--no-memory", not args.memory))
        ignored += [o for o, set_ in switches if set_]
    if args.method != "propd" and args.drafter != "draft":
        ignored.append("--drafter")
    if args.method == "propd" and args.prune_layer is not None and not args.prune:
        print("propd: warning: --prune-layer is ignored without --prune", file=sys.stderr)
    for option in ignored:
        print(f"propd: warning: {option} is ignored by --method {args.method}", file=sys.stderr)
    if args.tree and "--tree" not in ignored:
        check_tree_spec(args.tree, root_only_ok=args.method != "draft")
    by_model = args.method == "spec" or (args.method == "propd" and args.drafter == "model")
    if by_model and not args.draft_model:
        raise PropdError(f"--method {args.method}{' --drafter model' if args.method == 'propd' else ''} needs --draft-model: "
                         "a smaller model with the same tokenizer, e.g. qwen2.5-coder-0.5b")
    if not by_model and args.draft_model:
        print(f"propd: warning: --draft-model is ignored by --method {args.method}{' --drafter ' + args.drafter if args.method == 'propd' else ''}",
              file=sys.stderr)
    if args.method not in ("ar", "spec", "lookup") and not by_model and args.heads == "default" and args.model != "default":
        raise PropdError(f"--method {args.method} needs heads trained for {args.model}: the shipped ones (--heads default) fit only the default "
                         "model; use --method ar, or pass --heads DIR (`propd train --model ...` trains them)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), qwen2.5-coder-0.5b, qwen2.5-coder-1.5b (see README: "
                   "Other models), a HF model directory or a .gguf file")
    add_dtype_args(p)
    add_device_arg(p)
    p.add_argument("--method", default="ar", choices=METHODS, help="decoding method; propd: a tree chosen every step")
    p.add_argument("--drafter", default="draft", choices=DRAFTERS,
                   help="what fills propd's trees: the draft layer, the Medusa heads or the --draft-model")
    p.add_argument("--heads", default="default", help="heads / draft layer: 'default' (shipped for the default model) or a directory")
    p.add_argument("--tree", help="token tree: mc_sim_7b_63, topN, bestN, bestNdD (at most D deep), chainN or a JSON file of rank paths")
    p.add_argument("--draft-model", help="spec, propd --drafter model: the model that drafts (a named model, HF directory or .gguf sharing the tokenizer), "
                   "e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--raw", action="store_true", help="do not apply the model's chat template")
    add_propd_args(p)
    add_sampling_args(p)


def add_propd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prune", action=argparse.BooleanOptionalAction, default=None,
                   help="propd: early pruning by the early head (default: off, see docs/propd.md); --no-prune for the ablation")
    p.add_argument("--prune-top-k", type=positive_int, default=10, help="propd: a node survives if its token is in its parent's early top-k")
    p.add_argument("--prune-keep-ranks", type=non_negative_int, default=0, help="propd: never prune the drafter's best N guesses at a node")
    p.add_argument("--prune-layer", type=positive_int,
                   help="propd: prune after this layer, with the heads' early head trained there (default: the heads' chosen one)")
    p.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True,
                   help="propd: choose the tree every step (default); --no-dynamic keeps --tree (default best16; chain4 with --drafter model) every step")
    p.add_argument("--max-depth", type=positive_int, help="propd: the deepest tree it builds (default 2 with the draft layer, whose every "
                   "level costs a drafting pass; every depth of the heads' statistics otherwise)")
    p.add_argument("--draft-scores", action=argparse.BooleanOptionalAction, default=True,
                   help="propd with the draft layer: its own path probabilities pick which drafted nodes to verify (default); "
                        "--no-draft-scores: the rank statistics' best tree")
    p.add_argument("--lookup", action=argparse.BooleanOptionalAction, default=True,
                   help="propd with the draft layer's scores: offer each row's prompt-lookup guesses (what followed its newest n-gram where it "
                        "last occurred in its prompt or answer) beside the draft's (default); --no-lookup for the ablation")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="propd: start from what the last run with these settings learned on this machine (kept in $PROPD_MEMORY, default $PROPD_CACHE/propd; "
                        "default); --no-memory: from the shipped statistics, exploring the step costs again")


def load_model_and_method(args: argparse.Namespace):
    """The model and the method the options name (propd's switches included), the options checked first."""
    from propd.engine import PRUNE_BY_DEFAULT, Propd

    check_method_args(args)
    model = Propd.from_pretrained(args.model, args.dtype, args.device, args.route)
    prune = PRUNE_BY_DEFAULT if args.prune is None else args.prune
    return model, model.method(
        args.method, args.tree, args.heads, args.drafter, prune, args.dynamic, args.prune_top_k, args.prune_keep_ranks, args.draft_scores,
        args.draft_model, args.max_depth, args.prune_layer, args.lookup, args.memory,
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sample (every method; see --acceptance)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens holding this probability")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="sample from the k most probable tokens (0: all)")
    p.add_argument("--seed", type=int, help="sampling seed (prompt k takes seed + k); default: a random one")
    p.add_argument("--acceptance", default="exact", choices=ACCEPTANCES,
                   help="tree methods when sampling: exact (AR sampling's very tokens for a seed) or typical (Medusa's; faster, lossy)")


def sampling_from(args: argparse.Namespace):
    """The ``Sampling`` the options ask for, its seed drawn now if none is given, or None (greedy)."""
    from propd.decoding.sampling import Sampling

    if args.temperature < 0:
        raise PropdError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.temperature == 0:
        unused = [name for name, given in (("--top-p", args.top_p != 1.0), ("--top-k", args.top_k != 0), ("--seed", args.seed is not None),
                                           ("--acceptance", args.acceptance != "exact")) if given]
        if unused:
            print(f"propd: warning: {', '.join(unused)}: used only when sampling (--temperature above 0); decoding greedily", file=sys.stderr)
        return None
    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.seed, args.acceptance)
    return dataclasses.replace(sampling, seed=sampling.base_seed())


def add_dtype_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: the fastest dtype whose products are exact on this machine (measured once, cached)")
    p.add_argument("--route", help="matrix-product route instead of the measured choice, e.g. bfloat16-onednn, float32-torch-pad8 "
                   "(also $PROPD_ROUTE)")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ...")


def cmd_generate(args: argparse.Namespace) -> None:
    from propd.engine import TextStream
    from propd.prompts import load_prompts

    if args.prompts:
        if args.prompt:
            print("propd: warning: the prompt given on the command line is ignored with --prompts", file=sys.stderr)
        prompts = [p.text for p in load_prompts(args.prompts, turn=args.turn, limit=args.limit, per_category=args.per_category)]
    elif args.prompt:
        prompts = args.prompt
    else:
        raise PropdError("give a prompt, or --prompts FILE.jsonl")
    if any(not p.strip() for p in prompts):
        raise PropdError("empty prompt")
    sampling = sampling_from(args)
    model, method = load_model_and_method(args)
    model.encode_fitting(prompts, args.max_new_tokens, method, not args.raw)  # every prompt fits before any answer streams
    if args.json or args.continuous:
        for g in model.generate(prompts, method, args.max_new_tokens, args.batch_size, not args.raw, sampling=sampling, continuous=args.continuous):
            print(json.dumps(g.to_json()) if args.json else f"### {_headline(g.prompt)}\n{g.text}\n", flush=True)
        return
    streams = [TextStream(model.tokenizer) for _ in prompts]
    single = len(prompts) == 1 or args.batch_size == 1

    def show(i: int, toks: list[int]) -> None:
        if single:
            sys.stdout.write(streams[i].push(toks))
            sys.stdout.flush()

    for i in range(0, len(prompts), args.batch_size):
        chunk = list(range(i, min(len(prompts), i + args.batch_size)))
        if single:
            print(f"### {_headline(prompts[i])}")
        results = model.generate([prompts[j] for j in chunk], method, args.max_new_tokens, args.batch_size, not args.raw, lambda r, t: show(chunk[r], t),
                                 None if sampling is None else dataclasses.replace(sampling, seed=sampling.seed + i))
        for j, g in zip(chunk, results):
            if not single:
                print(f"### {_headline(prompts[j])}\n{g.text}")
            if single:
                print(streams[j].finish())  # what was held back, and the streamed answer's own line
            s = g.to_json()
            print(f"\n[{s['new_tokens']} tokens, {s['tokens_per_s']} tok/s, {s['steps']} steps, {s['mean_accepted']} tokens/step]\n", file=sys.stderr)


def _headline(prompt: str, limit: int = 300) -> str:
    return prompt if len(prompt) <= limit else f"{prompt[:limit]}... ({len(prompt)} characters)"


def cmd_demo(args: argparse.Namespace) -> None:
    """Stream one generation with the chosen method, then time it and plain AR on the same prompt,
    three times each, interleaved (a shared machine's speed drifts between runs: one run each
    gave 1.04x to 1.45x for the same prompt)."""
    from propd.engine import TextStream

    if not args.prompt.strip():
        raise PropdError("empty prompt")
    sampling = sampling_from(args)
    model, method = load_model_and_method(args)
    for warm_up in (method, "ar"):  # first-call allocations, and propd's first measurements of its step costs
        model.generate(["Say hello."], warm_up, 16)
    print(f"### {args.prompt}  [{args.method}]")
    stream = TextStream(model.tokenizer)
    fast = model.generate([args.prompt], method, args.max_new_tokens, 1, not args.raw, lambda _, t: print(stream.push(t), end="", flush=True),
                          sampling)[0]
    print(stream.finish(), end="")
    runs: dict[str, list] = {args.method: [], "ar": []}
    for _ in range(3):
        for name, m in ((args.method, method), ("ar", "ar")):
            runs[name].append(model.generate([args.prompt], m, args.max_new_tokens, 1, not args.raw, sampling=sampling)[0].to_json())
    f, a = (sorted(runs[name], key=lambda r: r["tokens_per_s"])[1] for name in (args.method, "ar"))  # the medians
    same = all(r["token_ids"] == a["token_ids"] for r in runs[args.method]) and fast.token_ids == a["token_ids"]
    print(f"\n\n{args.method}: {f['tokens_per_s']} tokens/s, {f['mean_accepted']} tokens/step, {f['tree_tokens_per_step']} tree tokens/step (median of 3)")
    print(f"ar: {a['tokens_per_s']} tokens/s (median of 3)")
    print(f"speed-up over ar: {f['tokens_per_s'] / a['tokens_per_s']:.2f}x; identical output: {'yes' if same else 'NO'}")


def cmd_chat(args: argparse.Namespace) -> None:
    sampled = sampling_from(args) is not None  # bad sampling options fail (and unused ones warn) before the model loads
    model, method = load_model_and_method(args)
    print("propd chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    conversation: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        if not line.strip():
            break
        t = time.perf_counter()
        conversation.append({"role": "user", "content": line})
        answer = []
        try:
            sampling = sampling_from(args) if sampled else None  # each turn its own seed, unless --seed
            for piece in model.stream(conversation if not args.raw else line, method, args.max_new_tokens, not args.raw, sampling):
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except PropdError as e:  # e.g. the conversation outgrew the context: this message is dropped, the chat goes on
            conversation.pop()
            print(f"propd: error: {e}", file=sys.stderr)
            continue
        conversation.append({"role": "assistant", "content": "".join(answer)})
        print(f"\n[{time.perf_counter() - t:.1f} s]", file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from propd.bench.peers import BINARIES, LlamaCpp
    from propd.bench.report import build_results, write_report
    from propd.bench.run import machine_facts, run_bench
    from propd.engine import Propd
    from propd.models.loading import model_gguf
    from propd.prompts import builtin_prompts_path, load_prompts, long_context_prompts

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m.split("+")[0].partition("@")[0] not in (*METHODS, "hf") and m not in BINARIES]
    if unknown:
        raise PropdError(f"unknown method {unknown[0]!r} in --methods; available: hf, {', '.join(BINARIES)}, {', '.join(METHODS)}")
    batch_sizes = args.batch_sizes
    out = output_dir(args.out)
    short = args.prompts or not args.long_context
    prompts = load_prompts(args.prompts, turn=args.turn, limit=args.limit, per_category=args.per_category) if short else []
    sampling = sampling_from(args)
    model = Propd.from_pretrained(args.model, args.dtype, args.device, args.route)
    if args.long_context:
        if len(args.context_tokens) != 2:
            raise PropdError(f"--context-tokens takes MIN,MAX, got {args.context_tokens}")
        low, high = args.context_tokens
        prompts += long_context_prompts(args.long_context, lambda text: len(model.encode(text)), args.per_category or 4, low, high)
    llama_cpp = None
    if args.llama_cpp:
        gguf = Path(args.llama_gguf).expanduser() if args.llama_gguf else model_gguf(args.model)
        if gguf is None:
            raise PropdError(f"llama.cpp needs the model as a GGUF file: pass --llama-gguf (--model {args.model} is a directory)")
        llama_cpp = LlamaCpp(Path(args.llama_cpp).expanduser(), gguf, torch.get_num_threads())
    runs = run_bench(model, prompts, methods, batch_sizes, args.max_new_tokens, args.heads, args.tree, sampling, args.draft_model, args.rounds, args.continuous,
                     llama_cpp)
    sources = [str(args.prompts or builtin_prompts_path().name)] if short else []
    sources += [f"{args.long_context} ({args.context_tokens[0]}-{args.context_tokens[1]}-token documents)"] if args.long_context else []
    config = {
        "prompts_file": " + ".join(sources), "prompts": len(prompts), "methods": methods,
        "batch_sizes": batch_sizes, "continuous": args.continuous, "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
        "model": args.model, "heads": args.heads, "tree": args.tree,
        "sampling": dataclasses.asdict(sampling) if sampling else None,
        "llama_cpp": {"bin": str(llama_cpp.bin_dir), "gguf": str(llama_cpp.gguf)} if llama_cpp else None,
    }
    results = build_results(model, runs, machine_facts(model), config)
    paths = write_report(results, runs, out)
    print((out / "report.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> None:
    """Training runs in plain fp32 products: it needs gradients and speed, not row-invariance."""
    import torch

    from propd.engine import Propd
    from propd.training.pipeline import TrainConfig, report_markdown, run_training
    from propd.training.self_prompts import DEFAULT_OPENINGS

    cfg = TrainConfig(
        prompts=args.prompts, out=Path(args.out), num_prompts=args.num_prompts, self_prompts=args.self_prompts,
        self_prompt_openings=tuple(args.self_prompt_opening or DEFAULT_OPENINGS), max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, num_heads=args.num_heads, num_layers=args.num_layers,
        early_layers=tuple(int(k) for k in args.early_layers.split(",")), epochs=args.epochs, early_epochs=args.early_epochs,
        lr=args.lr, candidate_vocab=args.candidate_vocab, root_conditioned=args.root_conditioned,
        draft_epochs=args.draft_epochs, draft_depth=args.draft_depth, draft_batch_size=args.draft_batch_size, draft_lr=args.draft_lr,
    )
    from propd.models.kernels import autograd_route

    report = run_training(Propd.from_pretrained(args.model, device=args.device, route=autograd_route(torch.float32)), cfg)
    print(report_markdown(report))
    print(f"heads written to {cfg.out / 'heads'}", file=sys.stderr)


def cmd_calibrate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from propd.bench.calibration import CalibratingDraft, markdown, plot, summary
    from propd.bench.run import machine_facts
    from propd.engine import Propd
    from propd.prompts import load_prompts
    from propd.tree.dynamic import AcceptanceModel

    out = output_dir(args.out)
    prompts = [p.text for p in load_prompts(args.prompts, turn=args.turn, limit=args.limit, per_category=args.per_category)]
    model = Propd.from_pretrained(args.model, args.dtype, args.device, args.route)
    draft = model.method("draft", args.tree, args.heads)
    stats = draft.draft.meta.get("rank_probabilities")
    if not stats:
        raise PropdError("propd calibrate needs the draft's acceptance statistics (rank_probabilities), and these heads have none")
    method = CalibratingDraft(draft, AcceptanceModel(stats))
    for text in tqdm(prompts, desc="calibrate", unit="prompt"):
        model.generate([text], method, args.max_new_tokens)
    result = {"machine": machine_facts(model), "tree": args.tree, "prompts": len(prompts), **summary(method.record)}
    (out / "calibration.json").write_text(json.dumps(result, indent=1))
    header = f"{len(prompts)} prompts from `{args.prompts}`, draft layer over `{args.tree}`, {args.max_new_tokens} tokens, greedy."
    (out / "calibration.md").write_text(markdown(result, header))
    plot(result, out / "calibration.png")
    print((out / "calibration.md").read_text())
    print(f"wrote {out / 'calibration.json'}, {out / 'calibration.md'}, {out / 'calibration.png'}", file=sys.stderr)


def cmd_latency(args: argparse.Namespace) -> None:
    from propd.bench.latency import memory_bandwidth, plot_latency, step_latency, tree_build_time, weight_bytes
    from propd.engine import Propd, device_name
    from propd.models.kernels import SCREEN_ROWS, cpu_name

    out = output_dir(args.out)
    model = Propd.from_pretrained(args.model, args.dtype, args.device, args.route)
    graphs = model.decoder.graphed is not None
    screened = model.decoder.lm_head.screen is not None
    print(f"{cpu_name()}, {device_name(model.device)}: products by {model.route.name} ({'exact' if model.route.exact else 'not checked exact'})"
          + (f", greedy vocabulary argmax screened in int8 (calls of up to {SCREEN_ROWS} rows)" if screened else "")
          + (", steps replayed as CUDA graphs" if graphs else ""))
    rows = step_latency(model.decoder, args.sizes, args.batch_sizes, args.context)
    build_ms = tree_build_time()
    bandwidth = memory_bandwidth(model.device)
    floor_ms = 1e3 * weight_bytes(model.decoder) / (bandwidth * 1e9)
    record = {
        "cpu": cpu_name(), "device": device_name(model.device),
        "route": model.route.name, "exact": model.route.exact, "dtype": model.route.dtype_name, "route_candidates": model.route_measurements,
        "cuda_graphs": graphs, "context": args.context,
        "bandwidth_gb_s": round(bandwidth, 2), "weight_read_floor_ms": round(floor_ms, 2), "tree_build_ms_mc_sim_7b_63": build_ms, "steps": rows,
    }
    (out / "latency.json").write_text(json.dumps(record, indent=1))
    plot_latency(rows, out / "latency.png")
    print("| batch | tree tokens | ms/step | x weight-read floor |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['batch_size']} | {r['tree_tokens']} | {r['ms']} | {r['ms'] / floor_ms:.2f} |")
    print(f"\nread bandwidth {bandwidth:.1f} GB/s: reading the weights once takes {floor_ms:.1f} ms (the floor of a decode step)")
    print(f"building mc_sim_7b_63's tensors: {build_ms:.3f} ms; wrote {out / 'latency.json'}, {out / 'latency.png'}")


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from propd.server.app import create_app

    model, method = load_model_and_method(args)
    with model.on_device():
        model.generate(["Say hello."], method, 16)  # first-call allocations before the first client waits on them
    name = args.served_model_name or args.model
    sampling = sampling_from(args)
    sampling = sampling and dataclasses.replace(sampling, seed=args.seed)  # no --seed: every request draws its own
    app = create_app(model, method, args.method, name, args.max_batch_size, args.max_queue, args.max_new_tokens, sampling, args.acceptance)
    print(f"propd serve: {name} by {args.method} on http://{args.host}:{args.port}/v1 (up to {args.max_batch_size} rows a step)", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn shuts down gracefully, then re-raises SIGTERM: exit 0 after it
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def cmd_load(args: argparse.Namespace) -> None:
    from propd.prompts import load_prompts
    from propd.server.load import load_test

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise PropdError(f"unknown method {unknown[0]!r} in --methods; available: {', '.join(METHODS)}")
    prompts = [p.text for p in load_prompts(args.prompts, limit=args.limit, per_category=args.per_category)]
    summaries = load_test(methods, prompts, args.clients, args.seconds, args.max_tokens, Path(args.out), args.model, args.max_batch_size)
    print("| method | clients | requests | errors | not identical to solo | tokens/s | TTFT median s | TTFT p90 s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in summaries:
        print(f"| {s['method']} | {s['clients']} | {s['requests']} | {s['errors']} | {s['mismatches']} | {s['tokens_per_s']} | "
              f"{s['ttft_median_s']} | {s['ttft_p90_s']} |")
    print(f"wrote {Path(args.out) / 'load.json'}, {Path(args.out) / 'load.png'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="propd", description="Lossless parallel decoding (ProPD) for LLaMA-family models")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for prompts")
    g.add_argument("prompt", nargs="*", help="prompt text(s)")
    g.add_argument("--prompts", help="JSONL file: Spec-Bench/MT-Bench 'turns' or a 'prompt' field")
    g.add_argument("--turn", type=non_negative_int, default=0, help="which turn of multi-turn questions (0: the first)")
    g.add_argument("--limit", type=positive_int, help="at most this many prompts from --prompts")
    g.add_argument("--per-category", type=positive_int, help="at most this many prompts of each category")
    g.add_argument("--batch-size", type=positive_int, default=1)
    g.add_argument("--continuous", action="store_true",
                   help="the next prompt joins as a row finishes (at most --batch-size at once), not fixed batches; answers printed when all are done")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_model_args(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="side-by-side benchmark of decoding methods")
    b.add_argument("--prompts", help="question.jsonl (Spec-Bench / MT-Bench format); default: propd's built-in set")
    b.add_argument("--turn", type=non_negative_int, default=0)
    b.add_argument("--limit", type=positive_int, help="at most this many prompts")
    b.add_argument("--per-category", type=positive_int, help="at most this many prompts of each category (e.g. 2: 16 MT-Bench questions)")
    b.add_argument("--methods", default="hf,ar,bpd,medusa,propd",
                   help="comma-separated: hf (transformers generate), llama.cpp and llama.cpp+lookup (its prompt lookup; with --llama-cpp), "
                        "ar, bpd, medusa, draft, propd, spec (with --draft-model); "
                        "medusa@TREE / draft@TREE / spec@TREE picks a tree per method, "
                        "propd@medusa / propd@model (with --draft-model) propd's drafter; "
                        "propd+prune / propd+prune20 (early top-20) / propd+prune20r1 (and the drafter's top guess) / propd+prune20r1l16 (after layer 16) / "
                        "propd+noprune, propd+static / propd+staticTREE (one tree every step): the ablations")
    b.add_argument("--batch-sizes", type=positive_ints, default=[1], help="comma-separated, e.g. 1,2,4,8")
    b.add_argument("--rounds", type=positive_int, default=1,
                   help="runs of every batch with every method (interleaved); the per-batch median speed-up is over all of them")
    b.add_argument("--continuous", action="store_true",
                   help="decode all the prompts at once, at most the batch size in flight, the next joining as a row finishes "
                        "(as propd serve batches), rather than in fixed batches that end with their slowest row")
    b.add_argument("--long-context", metavar="SOURCE",
                   help="add Spec-Bench-style long-input prompts (summarization, retrieval; --per-category of each, default 4) built from "
                        "SOURCE's documents, e.g. ../shared/data/train_prompts.jsonl; without --prompts, only these")
    b.add_argument("--context-tokens", type=positive_ints, default=[1000, 2000], help="MIN,MAX prompt tokens of --long-context prompts")
    b.add_argument("--llama-cpp", metavar="DIR", help="llama.cpp's binaries (llama-completion, llama-lookup; `make llama-cpp` builds them) "
                                                          "for the peers llama.cpp and llama.cpp+lookup in --methods (batch 1)")
    b.add_argument("--llama-gguf", metavar="FILE", help="the GGUF file llama.cpp runs (default: the one --model loads from)")
    b.add_argument("--out", default="bench-out", help="directory for results.json, report.md and plots")
    add_model_args(b)
    b.set_defaults(func=cmd_bench, max_new_tokens=128)

    cal = sub.add_parser("calibrate", help="which predicts tree-node acceptance better: rank statistics or the draft's path probability")
    cal.add_argument("--prompts", help="question.jsonl (Spec-Bench / MT-Bench format); default: propd's built-in set")
    cal.add_argument("--turn", type=non_negative_int, default=0)
    cal.add_argument("--limit", type=positive_int, help="at most this many prompts")
    cal.add_argument("--per-category", type=positive_int, help="at most this many prompts of each category")
    cal.add_argument("--model", default="default")
    add_dtype_args(cal)
    add_device_arg(cal)
    cal.add_argument("--heads", default="default", help="draft layer: 'default' or a directory")
    cal.add_argument("--tree", default="best32", help="the static tree whose nodes are predicted")
    cal.add_argument("--max-new-tokens", type=positive_int, default=96)
    cal.add_argument("--out", default="bench-out/calibration")
    cal.set_defaults(func=cmd_calibrate)

    lat = sub.add_parser("latency", help="verification step time by tree size, and tree build time")
    lat.add_argument("--model", default="default")
    add_dtype_args(lat)
    add_device_arg(lat)
    lat.add_argument("--sizes", type=positive_ints, default=[1, 2, 4, 8, 16, 32, 64], help="tree tokens per row (root included)")
    lat.add_argument("--batch-sizes", type=positive_ints, default=[1])
    lat.add_argument("--context", type=positive_int, default=256, help="cached tokens before the tree")
    lat.add_argument("--out", default="bench-out")
    lat.set_defaults(func=cmd_latency)

    t = sub.add_parser("train", help="self-distil and train Medusa heads, early-pruning heads and the draft layer (resumable)")
    t.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field or Spec-Bench 'turns'")
    t.add_argument("--out", required=True, help="work directory; trained heads go to OUT/heads")
    t.add_argument("--model", default="default")
    add_device_arg(t)
    t.add_argument("--num-prompts", type=non_negative_int, default=1000, help="prompts drawn (seeded shuffle) from --prompts")
    t.add_argument("--self-prompts", type=non_negative_int, default=0,
                   help="also distil answers to this many prompts the model writes itself from its chat template (Magpie)")
    t.add_argument("--self-prompt-opening", action="append", metavar="TEXT",
                   help="start self-prompts with TEXT, in turn with the other openings given (repeatable; '' leaves the model free; "
                        "default: 30 openings that cover MT-Bench's categories)")
    t.add_argument("--max-new-tokens", type=positive_int, default=192, help="answer (and self-prompt) length for self-distillation")
    t.add_argument("--batch-size", type=positive_int, default=8, help="batch size for self-distillation and for caching hidden states")
    t.add_argument("--num-heads", type=positive_int, default=4)
    t.add_argument("--num-layers", type=positive_int, default=1, help="residual blocks per head")
    t.add_argument("--early-layers", default="4,8,12", help="candidate layers for the early-pruning head")
    t.add_argument("--epochs", type=float, default=2.0, help="Medusa heads' epochs (0: no Medusa heads)")
    t.add_argument("--early-epochs", type=float, default=1.0)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--candidate-vocab", type=non_negative_int, default=8192, help="heads guess among the N most emitted tokens (0: all)")
    t.add_argument("--root-conditioned", action=argparse.BooleanOptionalAction, default=True,
                   help="heads also read the embedding of the token the hidden state produced (default: yes)")
    t.add_argument("--draft-epochs", type=float, default=3.0, help="epochs for the EAGLE-style draft layer (0: no draft)")
    t.add_argument("--draft-depth", type=positive_int, default=3, help="tree depths the draft is unrolled over in training")
    t.add_argument("--draft-batch-size", type=positive_int, default=8, help="answers per draft training step")
    t.add_argument("--draft-lr", type=float, default=1e-3)
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="stream one answer with a fast method, then compare its speed with AR")
    d.add_argument("prompt", nargs="?", default="Explain how a rainbow forms, in a short paragraph.")
    add_model_args(d)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("chat", help="interactive chat, streamed")
    add_model_args(c)
    c.set_defaults(func=cmd_chat)

    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    add_model_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=port_number, default=8000)
    s.add_argument("--max-batch-size", type=positive_int, default=8, help="rows decoding together (requests beyond wait)")
    s.add_argument("--max-queue", type=positive_int, default=64, help="requests that may wait; more get HTTP 429")
    s.add_argument("--served-model-name", help="the model id clients send (default: --model)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve, method="propd", max_new_tokens=256)

    ld = sub.add_parser("load", help="concurrent streaming clients against `propd serve` (loopback), one server per method")
    ld.add_argument("--methods", default="ar,propd", help="comma-separated methods, one server each")
    ld.add_argument("--model", default="default")
    ld.add_argument("--prompts", help="question.jsonl (Spec-Bench / MT-Bench format); default: propd's built-in set")
    ld.add_argument("--limit", type=positive_int)
    ld.add_argument("--per-category", type=positive_int)
    ld.add_argument("--clients", type=positive_int, default=16)
    ld.add_argument("--seconds", type=float, default=120.0, help="how long clients keep asking (then in-flight answers finish)")
    ld.add_argument("--max-tokens", type=positive_int, default=96)
    ld.add_argument("--max-batch-size", type=positive_int, default=8)
    ld.add_argument("--out", default="bench-out/load")
    ld.set_defaults(func=cmd_load)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PropdError as e:
        print(f"propd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
