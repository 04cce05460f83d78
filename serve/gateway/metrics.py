"""Prometheus metrics: the gateway's own (requests, tokens, latencies, in-flight, replica health) and the
engines' queue and KV-cache figures, scraped from each vLLM's /metrics and re-exported with a replica label.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

# Seconds; TTFT and duration span a CPU engine's seconds, ITL a GPU's milliseconds.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
# The engine figures worth re-exporting: queue depth, running requests, KV-cache use, preemptions.
_ENGINE_METRICS = re.compile(
    r"^(vllm:(num_requests_running|num_requests_waiting|kv_cache_usage_perc|gpu_cache_usage_perc"
    r"|cpu_cache_usage_perc|num_preemptions_total))(\{[^}]*\})?\s+(\S+)"
)


class GatewayMetrics:
    """One registry per gateway (no process-wide globals, so tests can build as many as they like)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "deploykit_requests",
            "Requests answered, by model, key and HTTP status.",
            ["model", "key", "status"],
            registry=r,
        )
        self.tokens = Counter(
            "deploykit_tokens",
            "Tokens processed, by model, key and kind (prompt|completion).",
            ["model", "key", "kind"],
            registry=r,
        )
        self.spend = Counter(
            "deploykit_spend_usd",
            "Dollars the ledger priced, by model and key: spilled requests at the managed endpoint's token prices, "
            "local ones at serve --token-price (when set).",
            ["model", "key"],
            registry=r,
        )
        self.audio = Counter(
            "deploykit_audio_seconds",
            "Seconds of audio transcribed or translated, by model and key.",
            ["model", "key"],
            registry=r,
        )
        self.ttft = Histogram(
            "deploykit_ttft_seconds",
            "Time to the first content event of a streamed answer.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "deploykit_inter_token_seconds",
            "Gaps between a stream's content events (one event per engine step).",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "deploykit_request_duration_seconds",
            "Request duration through the gateway.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("deploykit_in_flight_requests", "Requests in flight, by model.", ["model"], registry=r)
        self.queued = Gauge(
            "deploykit_queued_requests",
            "Requests waiting for a slot under --max-concurrent-streams (0 without that cap).",
            registry=r,
        )
        self.replica_up = Gauge(
            "deploykit_replica_up",
            "1 when the replica's engine is ready to serve, else 0.",
            ["model", "replica"],
            registry=r,
        )

    def own(self) -> bytes:
        """This process's own figures, for the other gateway workers of one `serve --workers N` to add up."""
        return generate_latest(self.registry)

    def render(
        self, engine_texts: Iterable[tuple[str, str]] = (), peers: Sequence[str] = (), shared: str = ""
    ) -> bytes:
        """The exposition text: ours (added up with the `peers`' own, the other workers of one deployment),
        the figures every gateway reads alike from the database (`shared`: budgets), then each (replica, engine
        /metrics text) re-labelled."""
        ours = self.own().decode()
        lines = [(summed([ours, *peers]) if peers else ours) + shared]
        for replica, text in engine_texts:
            lines += relabel_engine_metrics(text, replica)
        return ("".join(lines[:1]) + "".join(f"{line}\n" for line in lines[1:])).encode()


def summed(texts: Sequence[str]) -> str:
    """Several gateway processes' own figures as one process's: every sample added up over the processes
    (requests, tokens and spend; histogram buckets, sums and counts; requests in flight and queued), except
    whether each replica is up, which the first process's own watch says. Creation times are left out."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for i, text in enumerate(texts):
        for family in text_string_to_metric_families(text):
            if family.name.endswith("_created") or (i and family.name == "deploykit_replica_up"):
                continue
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sample.labels.items()))
                samples[key] = samples.get(key, 0.0) + sample.value
    registry = CollectorRegistry(auto_describe=False)
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry).decode()


class _Fixed:
    """A collector of families already made (the sums above)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def relabel_engine_metrics(text: str, replica: str) -> list[str]:
    """The engine samples worth keeping, each with `replica` added to its labels."""
    kept = []
    for line in text.splitlines():
        match = _ENGINE_METRICS.match(line)
        if match is None:
            continue
        name, labels, value = match.group(1), match.group(3), match.group(4)
        inner = labels[1:-1] if labels else ""
        joined = f'replica="{_escape(replica)}"' + (f",{inner}" if inner else "")
        kept.append(f"{name}{{{joined}}} {value}")
    return kept


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
