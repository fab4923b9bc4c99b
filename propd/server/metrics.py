"""What ``GET /metrics`` reports, in Prometheus' text format (``prometheus_client``): requests,
tokens and their rate, accepted tokens per step and per depth, tree sizes, the share of tree tokens
the late layers see (1.0 until pruning drops some), step latency, batch occupancy and queue length."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from propd.decoding.loop import StepRecord

if TYPE_CHECKING:
    from propd.server.scheduler import Ticket

RATE_WINDOW_S = 10.0


class Metrics:
    def __init__(self, max_depth: int = 8):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("propd_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("propd_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generated = Counter("propd_generated_tokens", "tokens generated", registry=r)
        self.rate = Gauge("propd_tokens_per_second", f"tokens generated per second over the last {RATE_WINDOW_S:.0f} s", registry=r)
        self.ttft = Histogram("propd_time_to_first_token_seconds", "from a request's admission to its first token", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30))
        self.steps = Counter("propd_decode_steps", "decode steps (one forward pass over every running row)", registry=r)
        self.row_steps = Counter("propd_row_steps", "decode steps summed over rows", registry=r)
        self.step_seconds = Histogram("propd_step_seconds", "wall time of one decode step", registry=r,
                                      buckets=(0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0))
        self.accepted = Histogram("propd_accepted_tokens_per_step", "tokens a row emits per step (bonus included)", registry=r,
                                  buckets=tuple(range(1, max_depth + 2)))
        self.depth = Counter("propd_accepted_depth", "row-steps whose accepted path reached this depth (divide by propd_row_steps)",
                             ["depth"], registry=r)
        self.tree_size = Histogram("propd_tree_tokens_per_step", "tokens verified per row and step (the chosen tree size)", registry=r,
                                   buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64))
        self.tree_tokens = Counter("propd_tree_tokens", "tree tokens verified", registry=r)
        self.late_tokens = Counter("propd_late_tokens", "tree tokens that went through the late layers (pruning drops the rest)", registry=r)
        self.rows = Gauge("propd_batch_rows", "rows decoding now", registry=r)
        self.queue = Gauge("propd_queue_length", "requests waiting to join the batch (prefilling included)", registry=r)
        self._recent: deque[tuple[float, int]] = deque()  # (when, tokens) of the last RATE_WINDOW_S
        self._recent_tokens = 0  # their sum, kept as they come and go (summed at every event, it was 1.3% of a decode thread's time)

    def tokens(self, ticket: Ticket, tokens: list[int], first: bool) -> None:
        if first:
            self.ttft.observe(time.perf_counter() - ticket.submitted)
            self.prompt_tokens.inc(len(ticket.prompt_ids))
        self.generated.inc(len(tokens))
        now = time.perf_counter()
        self._recent.append((now, len(tokens)))
        self._recent_tokens += len(tokens)
        while self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent_tokens -= self._recent.popleft()[1]
        span = max(1e-3, min(RATE_WINDOW_S, now - self._recent[0][0]))
        self.rate.set(self._recent_tokens / span)

    def step(self, record: StepRecord) -> None:
        self.steps.inc()
        self.step_seconds.observe(record.seconds)
        for emitted, tree, late in zip(record.emitted, record.tree_tokens, record.late_tokens):
            self.row_steps.inc()
            self.accepted.observe(emitted)
            for d in range(1, emitted):
                self.depth.labels(str(d)).inc()
            self.tree_size.observe(tree)
            self.tree_tokens.inc(tree)
            self.late_tokens.inc(late)

    def occupancy(self, rows: int, waiting: int) -> None:
        self.rows.set(rows)
        self.queue.set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
