"""What `GET /metrics` shows, in Prometheus' text format: the figures operators of llama-server
and vLLM scrape (requests by status, tokens, running and waiting work, KV cells in use,
latency histograms), through prometheus_client, one registry per server.

Counters count since the server started; gauges are read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    """The server's counters and histograms; `gauges` maps a gauge's name to (help, how to
    read it now)."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "pocketlm_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.prompt_tokens = Counter("pocketlm_prompt_tokens", "Prompt tokens of generations", registry=registry)
        self.generation_tokens = Counter(
            "pocketlm_generation_tokens", "Tokens generated (every choice of every request)", registry=registry
        )
        self.embedding_tokens = Counter(
            "pocketlm_embedding_tokens", "Input tokens of embeddings requests", registry=registry
        )
        self.time_to_first_token = Histogram(
            "pocketlm_time_to_first_token_seconds",
            "From a generation request's arrival to its first token",
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "pocketlm_time_per_output_token_seconds",
            "Between a request's successive tokens",
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=registry).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
