"""``propd serve`` over real HTTP on 127.0.0.1: the official ``openai`` client (streamed and not),
raw requests for bad input, continuous batching identical to solo runs, queue limits, clients
that go away, and a clean stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import uvicorn
from openai import OpenAI

from propd.decoding.sampling import Sampling
from propd.server.app import StopText, create_app
from tests.conftest import REAL_PROMPTS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A propd app served by uvicorn on a thread of this process."""

    def __init__(self, model, method: str, **options):
        self.port = free_port()
        self.app = create_app(model, model.method(method), method, "default", **options)
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        while not self.uvicorn.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def health(self) -> dict:
        return json.loads(urllib.request.urlopen(self.url + "/health").read())


def post(url: str, body: bytes | dict, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(default_model):
    with Server(default_model, "propd", max_batch_size=4, max_queue=16, default_max_tokens=48) as s:
        yield s


def test_openai_client_chat_and_completions_equal_generate(server, default_model):
    want_chat = default_model.generate([REAL_PROMPTS[0]], "ar", max_new_tokens=40)[0]
    want_raw = default_model.generate(["The three primary colours are"], "ar", max_new_tokens=24, chat=False)[0]
    client = server.client()
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": REAL_PROMPTS[0]}], max_tokens=40)
    assert chat.choices[0].message.content == want_chat.text
    assert chat.usage.completion_tokens == len(want_chat.token_ids) and chat.usage.prompt_tokens == len(default_model.encode(REAL_PROMPTS[0]))
    assert chat.choices[0].finish_reason == ("length" if len(want_chat.token_ids) == 40 else "stop")
    raw = client.completions.create(model="default", prompt="The three primary colours are", max_tokens=24)
    assert raw.choices[0].text == want_raw.text and raw.choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list().data] == ["default"]


def test_streaming_delivers_every_piece_and_usage(server, default_model):
    want = default_model.generate([REAL_PROMPTS[2]], "ar", max_new_tokens=48)[0].text
    stream = server.client().chat.completions.create(
        model="default", messages=[{"role": "user", "content": REAL_PROMPTS[2]}], max_tokens=48, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices
    raw = list(server.client().completions.create(model="default", prompt="Once upon a time", max_tokens=20, stream=True))
    assert "".join(c.choices[0].text for c in raw) == default_model.generate(["Once upon a time"], "ar", max_new_tokens=20, chat=False)[0].text


def test_concurrent_requests_share_steps_and_each_equals_its_solo_run(server, default_model):
    prompts = REAL_PROMPTS + ["Name three rivers in Africa.", "What is 17 times 23?"]
    limits = [48, 20, 36, 48, 30, 12, 40]
    solo = [default_model.generate([p], "ar", max_new_tokens=n)[0].text for p, n in zip(prompts, limits)]
    client = server.client()

    def ask(i: int) -> str:
        time.sleep(0.2 * (i % 3))  # requests arrive while others decode
        stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompts[i]}], max_tokens=limits[i], stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, range(len(prompts))))
    assert answers == solo
    metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    assert values["propd_row_steps_total"] > values["propd_decode_steps_total"]  # rows shared steps
    assert values["propd_time_to_first_token_seconds_count"] >= len(prompts)
    assert 'propd_accepted_depth_total{depth="1"}' in values and values["propd_tree_tokens_total"] >= values["propd_late_tokens_total"]


def test_sampled_requests_are_seeded_and_equal_generate(server, default_model):
    settings = Sampling(0.9, top_p=0.95, seed=7)
    want = default_model.generate([REAL_PROMPTS[3]], "ar", max_new_tokens=40, sampling=settings)[0].text
    ask = dict(model="default", messages=[{"role": "user", "content": REAL_PROMPTS[3]}], max_tokens=40, temperature=0.9, top_p=0.95)
    client = server.client()
    assert client.chat.completions.create(**ask, seed=7).choices[0].message.content == want
    assert "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**ask, seed=7, stream=True)) == want
    assert client.chat.completions.create(**ask, seed=8).choices[0].message.content != want


def test_the_servers_own_sampling_and_seed_serve_requests_that_send_none(default_model):
    settings = Sampling(0.9, top_p=0.95, seed=7)
    want = default_model.generate([REAL_PROMPTS[3]], "ar", max_new_tokens=24, sampling=settings)[0].text
    ask = dict(model="default", messages=[{"role": "user", "content": REAL_PROMPTS[3]}], max_tokens=24)
    with Server(default_model, "ar", default_sampling=settings) as served:
        assert served.client().chat.completions.create(**ask).choices[0].message.content == want
    with Server(default_model, "ar", default_sampling=Sampling(0.9, top_p=0.95)) as served:  # no server seed: each request draws one
        answers = {served.client().chat.completions.create(**ask).choices[0].message.content for _ in range(2)}
    assert len(answers) == 2


def test_stop_strings_cut_the_text(server, default_model):
    full = default_model.generate([REAL_PROMPTS[4]], "ar", max_new_tokens=48)[0].text
    stop = full[20:24]
    for stream in (False, True):
        r = server.client().chat.completions.create(model="default", messages=[{"role": "user", "content": REAL_PROMPTS[4]}],
                                                    max_tokens=48, stop=[stop, "never-appears"], stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert text == full[: full.index(stop)] and reason == "stop"


def test_the_token_rate_counts_the_last_ten_seconds(monkeypatch):
    import propd.server.metrics as metrics_module
    from propd.server.metrics import Metrics

    metrics, clock = Metrics(), iter([0.0, 5.0, 12.0, 30.0])
    monkeypatch.setattr(metrics_module.time, "perf_counter", lambda: next(clock))
    rates = []
    for tokens in ([1] * 5, [1] * 3, [1] * 2, [1]):
        metrics.tokens(None, tokens, first=False)
        rates.append(metrics.rate._value.get())
    assert rates == pytest.approx([5 / 1e-3, 8 / 5, 5 / 7, 1 / 1e-3])  # at 12 s the first 5 tokens left; at 30 s all but the newest


def test_stop_text_holds_back_only_what_may_start_a_stop_string():
    stop = StopText(["END", "xyz"])
    assert stop.push("abc E") == "abc " and stop.push("N") == "" and stop.push("D more") == "" and stop.stopped
    stop = StopText(["END"])
    assert stop.push("the EN") == "the " and stop.push("ough") == "ENough" and stop.finish() == ""


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    chat = server.url + "/v1/chat/completions"
    good = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    cases = [
        (b'{"model": "default", "messages": [', 400),
        ({"model": "default"}, 400),
        ({**good, "messages": "Hi"}, 400),
        ({**good, "messages": [{"role": "user", "content": 5}]}, 400),
        ({**good, "messages": []}, 400),
        ({**good, "max_tokens": "4"}, 400),
        ({**good, "max_tokens": 0}, 400),
        ({**good, "max_tokens": 10**6}, 400),
        ({**good, "messages": [{"role": "user", "content": "word " * 9000}]}, 400),
        ({**good, "messages": [{"role": "user", "content": "   "}]}, 400),
        ({**good, "model": "gpt-4"}, 404),
        ({**good, "temperature": 3.0}, 400),
        ({**good, "top_p": 0}, 400),
        ({**good, "n": 2}, 400),
    ]
    for body, status in cases:
        code, reply = post(chat, body)
        assert code == status and reply["error"]["message"] and reply["error"]["type"], (body if isinstance(body, bytes) else str(body)[:80], code, reply)
    code, reply = post(server.url + "/v1/completions", {"model": "default", "prompt": ["a", "b"]})
    assert code == 400 and "one prompt" in reply["error"]["message"]
    code, reply = post(server.url + "/v1/nothing", good)
    assert code == 404 and "error" in reply
    code, reply = post(chat, {**good, "messages": [{"role": "user", "content": "\ud800 hi"}]})  # a lone surrogate: no tokenizer takes it
    assert code == 400 and "tokenizer" in reply["error"]["message"]
    metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
    assert 'endpoint="other",status="404"' in metrics and "/v1/nothing" not in metrics  # unknown paths grow no series
    assert 'endpoint="/v1/chat/completions",status="400"' in metrics
    code, reply = post(chat, good)
    assert code == 200 and reply["choices"][0]["message"]["content"]
    assert server.health()["status"] == "ok"


def test_full_queue_gets_429_and_a_client_that_leaves_frees_its_row(default_model):
    with Server(default_model, "ar", max_batch_size=1, max_queue=1, default_max_tokens=400) as s:
        chat = s.url + "/v1/chat/completions"
        # a prompt whose greedy answer runs to the limit, so the row is still decoding when the 429 is asked
        # for ("Tell me a long story." ended at 49 tokens, about half a second)
        essay = "Write a 2000-word essay about the history of Rome."
        first = s.client().chat.completions.create(model="default", messages=[{"role": "user", "content": essay}],
                                                   max_tokens=400, stream=True)
        next(iter(first))  # admitted and decoding
        waiting = threading.Thread(target=post, args=(chat, {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}))
        waiting.start()
        while s.health()["waiting"] < 1:
            time.sleep(0.05)
        code, reply = post(chat, {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert code == 429 and reply["error"]["code"] == "rate_limit_exceeded"
        first.close()  # the client goes away mid-stream: its row leaves, the waiting request runs
        waiting.join(60)
        assert not waiting.is_alive()
        while s.health()["running"]:
            time.sleep(0.05)


def test_a_client_that_leaves_before_a_whole_answer_frees_its_row(default_model):
    with Server(default_model, "ar", max_batch_size=1) as s:  # this essay's greedy answer runs to 3000 tokens (~30 s)
        body = {"model": "default", "messages": [{"role": "user", "content": "Write a 2000-word essay about the history of Rome."}], "max_tokens": 3000}
        request = urllib.request.Request(s.url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with pytest.raises(OSError):  # the client gives up waiting for the whole answer
            urllib.request.urlopen(request, timeout=1)
        deadline = time.time() + 60
        while s.health()["running"] and time.time() < deadline:
            time.sleep(0.05)
        metrics = urllib.request.urlopen(s.url + "/metrics").read().decode()
        generated = next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("propd_generated_tokens_total"))
    assert generated < 1500


@pytest.mark.slow
def test_a_propd_server_keeps_what_its_chooser_learned_when_it_stops(default_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PROPD_MEMORY", str(tmp_path))
    with Server(default_model, "propd", default_max_tokens=16) as s:
        code, reply = post(s.url + "/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "Hi"}]})
        assert code == 200 and not list(tmp_path.glob("*.json"))
    (memory,) = tmp_path.glob("*.json")
    assert json.loads(memory.read_text())["latency"]["sizes"]


def test_serve_cli_answers_and_stops_cleanly_on_sigterm():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "propd.cli", "serve", "--method", "ar", "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.5)
        body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        code, reply = post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
        assert code == 200 and reply["usage"]["completion_tokens"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
