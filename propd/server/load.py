"""``propd load``: many concurrent streaming clients against ``propd serve`` on the loopback, one
server per method, bounded in clients and time.

For each method: start a server, ask every prompt once alone (its solo answer), then let
``clients`` streaming clients ask prompts in turn for ``seconds``; every answer must equal its
solo answer. Reports aggregate tokens/s, time to first token and errors per method, as a table,
``load.json`` and ``load.png``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from openai import AsyncOpenAI

from propd.errors import PropdError

MAX_CLIENTS, MAX_SECONDS = 64, 600


@dataclass
class Answer:
    prompt: int
    text: str = ""
    tokens: int = 0
    ttft_s: float | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class LoadResult:
    method: str
    clients: int
    seconds: float
    answers: list[Answer] = field(default_factory=list)
    mismatches: int = 0

    def summary(self) -> dict:
        ok = [a for a in self.answers if a.error is None]
        ttft = sorted(a.ttft_s for a in ok if a.ttft_s is not None)
        return {
            "method": self.method, "clients": self.clients, "requests": len(self.answers), "errors": len(self.answers) - len(ok),
            "mismatches": self.mismatches, "tokens": sum(a.tokens for a in ok), "seconds": round(self.seconds, 2),
            "tokens_per_s": round(sum(a.tokens for a in ok) / self.seconds, 2) if self.seconds else None,
            "ttft_median_s": round(statistics.median(ttft), 3) if ttft else None,
            "ttft_p90_s": round(ttft[int(0.9 * (len(ttft) - 1))], 3) if ttft else None,
        }


async def ask(client: AsyncOpenAI, prompt: str, index: int, max_tokens: int) -> Answer:
    answer, t0 = Answer(index), time.perf_counter()
    try:
        stream = await client.chat.completions.create(model="default", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                                      stream=True, stream_options={"include_usage": True})
        pieces = []
        async for chunk in stream:
            if chunk.usage is not None:
                answer.tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                if answer.ttft_s is None:
                    answer.ttft_s = time.perf_counter() - t0
                pieces.append(chunk.choices[0].delta.content)
        answer.text = "".join(pieces)
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        answer.error = f"{type(e).__name__}: {e}"
    answer.seconds = time.perf_counter() - t0
    return answer


async def run_load(url: str, method: str, prompts: list[str], clients: int, seconds: float, max_tokens: int) -> LoadResult:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    solo = [await ask(client, p, i, max_tokens) for i, p in enumerate(prompts)]
    failed = [a for a in solo if a.error]
    if failed:
        raise PropdError(f"a solo request to the {method} server failed: {failed[0].error}")
    result = LoadResult(method, clients, 0.0)
    deadline = time.perf_counter() + seconds
    turn = itertools.count()

    async def worker() -> None:
        while time.perf_counter() < deadline:
            i = next(turn) % len(prompts)
            result.answers.append(await ask(client, prompts[i], i, max_tokens))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    result.seconds = time.perf_counter() - t0
    result.mismatches = sum(a.error is None and a.text != solo[a.prompt].text for a in result.answers)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(method: str, model: str, max_batch_size: int, max_tokens: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "propd.cli", "serve", "--model", model, "--method", method, "--port", str(port),
           "--max-batch-size", str(max_batch_size), "--max-queue", str(MAX_CLIENTS), "--max-new-tokens", str(max_tokens), "--log-level", "warning",
           "--served-model-name", "default"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise PropdError(f"`{' '.join(cmd)}` exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=5)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise PropdError(f"the {method} server did not answer /health in 10 minutes")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def load_test(methods: list[str], prompts: list[str], clients: int, seconds: float, max_tokens: int, out: Path, model: str = "default",
              max_batch_size: int = 8) -> list[dict]:
    if not 1 <= clients <= MAX_CLIENTS or not 0 < seconds <= MAX_SECONDS:
        raise PropdError(f"clients must be 1-{MAX_CLIENTS} and seconds in (0, {MAX_SECONDS}]")
    summaries = []
    for method in methods:
        proc, url = start_server(method, model, max_batch_size, max_tokens)
        try:
            result = asyncio.run(run_load(url, method, prompts, clients, seconds, max_tokens))
        finally:
            stop_server(proc)
        summaries.append(result.summary())
        errors = [a.error for a in result.answers if a.error]
        print(json.dumps(summaries[-1]) + (f"\n  first error: {errors[0]}" if errors else ""), file=sys.stderr)
        (out / f"answers-{method}.json").parent.mkdir(parents=True, exist_ok=True)
        (out / f"answers-{method}.json").write_text(json.dumps([asdict(a) for a in result.answers], indent=1))
    (out / "load.json").write_text(json.dumps(summaries, indent=1))
    plot_load(summaries, out / "load.png")
    return summaries


def plot_load(summaries: list[dict], path: Path) -> None:
    from propd.bench.plotting import plt, save_figure

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    names = [s["method"] for s in summaries]
    a1.bar(names, [s["tokens_per_s"] or 0 for s in summaries], color="tab:blue")
    a1.set(title=f"aggregate tokens/s, {summaries[0]['clients']} streaming clients", ylabel="tokens/s")
    a2.bar(names, [s["ttft_median_s"] or 0 for s in summaries], color="tab:orange", label="median")
    a2.scatter(names, [s["ttft_p90_s"] or 0 for s in summaries], color="black", marker="_", s=400, label="p90", zorder=3)
    a2.set(title="time to first token", ylabel="seconds")
    a2.legend()
    save_figure(fig, path)
