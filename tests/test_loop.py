"""The decode loop: rows join a running batch (continuous batching) and leave it, each getting the
tokens it gets alone, for every method; streams stop when their reader stops."""

import math
import random

import pytest

from propd.decoding.ar import ARMethod
from propd.decoding.draft import DraftMethod
from propd.decoding.loop import LEAD_SCALE, PREFILL_CHUNK, DecodeLoop, generate_batch, generate_continuous
from propd.decoding.propd import PropdMethod
from propd.decoding.spec import SpecMethod
from propd.decoding.tree import TreeMethod
from propd.engine import TextStream
from propd.models.decoder import Decoder
from propd.models.kernels import Route
from propd.tree.dynamic import AcceptanceModel, TreeChooser
from tests.conftest import REAL_PROMPTS, tiny_hf_model
from tests.test_draft import random_draft
from tests.test_tree import random_heads, random_tree


def methods(dec: Decoder, rng: random.Random, seed: int) -> dict:
    tree = random_tree(rng, nodes=rng.randint(2, 12), depth=3, width=3)
    chooser = TreeChooser(AcceptanceModel([[rng.random() / (r + 1) for r in range(3)] for _ in range(3)]), sizes=(1, 3, 8))
    chooser.latency.observe((1, 0), 1, 1.0)  # every tree size looks free to try
    return {
        "ar": ARMethod(),
        "medusa": TreeMethod(random_heads(64, 96, 3, seed), tree),
        "draft": DraftMethod(random_draft(dec.args, seed), tree),
        "propd": PropdMethod(DraftMethod(random_draft(dec.args, seed), tree), chooser),
        "spec": SpecMethod(dec, tree),  # the model drafting for itself: every guess it ranks first is right
    }


@pytest.mark.parametrize("seed", range(3))
def test_rows_joining_a_running_batch_get_the_tokens_they_get_alone(seed):
    rng = random.Random(seed)
    dec = Decoder.from_hf(tiny_hf_model(["llama", "mistral", "qwen2"][seed], seed=seed), Route.parse("float32-torch-pad8"))
    prompts = [[rng.randrange(1, 96) for _ in range(rng.choice([3, 20, PREFILL_CHUNK + 40]))] for _ in range(6)]
    limits = [rng.randint(1, 30) for _ in prompts]
    arrivals = sorted(rng.randrange(12) for _ in prompts)  # the loop step at which each prompt is submitted
    for name, method in methods(dec, rng, seed).items():
        alone = [generate_batch(dec, method, [p], n, {0})[0].token_ids for p, n in zip(prompts, limits)]
        loop = DecodeLoop(dec, method, {0})
        rows, step, most = [], 0, 0
        while len(rows) < len(prompts) or loop.busy:
            due = [i for i in range(len(rows), len(prompts)) if arrivals[i] <= step]
            if due:  # prompts arriving at one step are prefilled together
                rows += loop.submit([prompts[i] for i in due], [limits[i] for i in due])
            loop.advance()
            most, step = max(most, len(loop.rows)), step + 1
        assert [r.stats.token_ids for r in rows] == alone, name
        assert all(r.done and r.finish_reason in ("stop", "length") for r in rows)
        assert most > 1, "rows never shared a step"


@pytest.mark.parametrize("rows", [1, 3])
def test_continuous_generation_keeps_at_most_its_rows_in_flight_and_each_gets_its_tokens_alone(rows):
    rng = random.Random(rows)
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=rows), Route.parse("float32-torch-pad8"))
    prompts = [[rng.randrange(1, 96) for _ in range(rng.randint(2, 30))] for _ in range(7)]
    for name, method in methods(dec, rng, rows).items():
        alone = [generate_batch(dec, method, [p], 12, {0})[0].token_ids for p in prompts]
        in_flight, step_seconds, groups = [], [], []
        advance, submit = DecodeLoop.advance, DecodeLoop.submit

        def counted(loop):
            in_flight.append(loop.in_flight)
            events = advance(loop)
            step_seconds.append(loop.last_step.seconds if loop.last_step else 0.0)
            return events

        DecodeLoop.advance, DecodeLoop.submit = counted, lambda loop, *a: groups.append(submit(loop, *a)) or groups[-1]
        try:
            stats = generate_continuous(dec, method, prompts, 12, {0}, rows)
        finally:
            DecodeLoop.advance, DecodeLoop.submit = advance, submit
        assert [s.token_ids for s in stats] == alone, name
        assert max(in_flight) == rows and min(in_flight[: len(in_flight) // 2]) == rows, name  # full until the queue runs dry
        # the rows' shares partition the loop's steps and prefills
        prefills = sum(group[0].stats.prefill_seconds for group in groups)
        assert sum(s.share_seconds for s in stats) == pytest.approx(sum(step_seconds) + prefills), name
        assert all(s.share_seconds >= sum(s.step_seconds) / rows for s in stats), name


def test_a_fixed_batch_weighs_its_rows_by_how_far_behind_they_are_and_a_joinable_one_does_not():
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=1), Route.parse("float32-torch-pad8"))
    seen = []
    method = ARMethod()
    step = method.step
    method.step = lambda *a: seen.append(a[-1].weights) or step(*a)
    generate_batch(dec, method, [[5, 6, 7], [8, 9]], 6, set())
    assert seen[0] is None  # no row ahead yet
    loop = DecodeLoop(dec, method, set())
    loop.submit([[5, 6, 7], [8, 9]], [6, 3])
    loop.fixed = True
    loop.advance()  # the prompts' first tokens: 5 and 2 left
    assert loop.weights() == pytest.approx([1.0, math.exp(-3 / LEAD_SCALE)])  # the row with fewer left counts less
    loop.fixed = False
    assert loop.weights() is None  # rows may join: every token counts


def test_a_cancelled_row_leaves_and_the_others_go_on():
    dec = Decoder.from_hf(tiny_hf_model("llama", seed=1), Route.parse("float32-torch-pad8"))
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13]]
    alone = [s.token_ids for s in generate_batch(dec, ARMethod(), prompts, 20, set())]
    loop = DecodeLoop(dec, DraftMethod(random_draft(dec.args, 1), random_tree(random.Random(1), 6, 2, 3)), set())
    rows = loop.submit(prompts, 20)
    while len(rows[1].stats.token_ids) < 4:
        loop.advance()
    loop.cancel(rows[1])
    cut = len(rows[1].stats.token_ids)
    while loop.busy:
        loop.advance()
        assert rows[1] not in loop.rows
    assert rows[1].stats.token_ids == alone[1][:cut] and rows[1].done
    assert [rows[0].stats.token_ids, rows[2].stats.token_ids] == [alone[0], alone[2]]


def test_stream_stops_decoding_when_its_reader_stops(default_model, monkeypatch):
    steps = []
    real_advance = DecodeLoop.advance
    monkeypatch.setattr(DecodeLoop, "advance", lambda self: steps.append(1) or real_advance(self))
    stream = default_model.stream(REAL_PROMPTS[1], "draft", max_new_tokens=200)
    first = next(stream)
    stream.close()
    assert first and len(steps) <= 3
    # the same method serves the next generation at once, whole
    full = "".join(default_model.stream(REAL_PROMPTS[1], default_model.method("draft"), max_new_tokens=40))
    assert full == default_model.generate([REAL_PROMPTS[1]], "ar", max_new_tokens=40)[0].text


def test_text_stream_holds_back_only_an_incomplete_character_and_finish_flushes(default_model):
    tok = default_model.tokenizer
    ids = tok("naïve café 🙂", add_special_tokens=False).input_ids
    stream = TextStream(tok)
    pieces = [stream.push([i]) for i in ids]
    assert "".join(pieces) + stream.finish() == tok.decode(ids)
    emoji = tok("🙂", add_special_tokens=False).input_ids
    assert len(emoji) > 1  # a character split across tokens
    stream = TextStream(tok)
    assert stream.push(tok("ok ", add_special_tokens=False).input_ids + emoji[:1]) == "ok "  # the text before it is not held
    assert stream.finish() != ""  # the partial character is not held back forever


def test_chat_keeps_earlier_turns(default_model):
    conversation = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hello Ada!"},
                    {"role": "user", "content": "What is my name?"}]
    ids = default_model.encode(conversation)
    assert "Ada" in default_model.tokenizer.decode(ids) and len(ids) > len(default_model.encode("What is my name?"))
    with pytest.raises(Exception, match="conversation"):
        default_model.encode([{"role": "user"}])
