"""The server's own view during a load test: its /metrics scraped once a second (vLLM, or a deploykit
gateway, which re-exports its engines' figures per replica): requests running and waiting, KV-cache use and
preemptions over time, so a report shows why the latency moved. No locust here; the runner calls it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prometheus_client.parser import text_string_to_metric_families

_KV = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:cpu_cache_usage_perc")


@dataclass(frozen=True)
class ServerSample:
    at: float  # time.monotonic(), the records' clock
    running: float  # requests the engines run, summed over replicas
    waiting: float  # requests queued in the engines
    kv_cache: float | None  # the fullest replica's KV-cache use, 0 to 1
    preemptions: float  # preemptions so far, summed over replicas

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def read_sample(text: str, at: float) -> ServerSample | None:
    """One scrape's figures; None when the text holds no vLLM metrics (not a vLLM or deploykit server)."""
    totals: dict[str, float] = {}
    kv: list[float] = []
    try:
        samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    except ValueError:  # not the Prometheus text format at all
        return None
    for sample in samples:
        name = sample.name.removesuffix("_total") if sample.name.endswith("preemptions_total") else sample.name
        if name in _KV:
            kv.append(sample.value)
        elif name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_preemptions"):
            totals[name] = totals.get(name, 0.0) + sample.value
    if not totals and not kv:
        return None
    return ServerSample(
        at=at,
        running=totals.get("vllm:num_requests_running", 0.0),
        waiting=totals.get("vllm:num_requests_waiting", 0.0),
        kv_cache=max(kv) if kv else None,
        preemptions=totals.get("vllm:num_preemptions", 0.0),
    )
