"""The parts of `serve --workers N` that need no process of their own: /metrics adding up the workers'
figures, the options a worker reads back, the share of the in-flight cap, the peers' addresses, and the
port that the first process binds and the others join."""

from __future__ import annotations

import json
import socket
from dataclasses import asdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploykit.core.errors import PortInUseError
from deploykit.core.ports import bind, join
from deploykit.serve.accounting.budgets import Price
from deploykit.serve.gateway.metrics import GatewayMetrics
from deploykit.serve.gateway.server import ConnectionLimits
from deploykit.serve.gateway.spill import SpillTarget
from deploykit.serve.runner import ServeOptions
from deploykit.serve.workers import Peers


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_add_up_every_workers_own_figures() -> None:
    first, second, third = GatewayMetrics(), GatewayMetrics(), GatewayMetrics()
    first.requests.labels("m", "k", "200").inc(3)
    second.requests.labels("m", "k", "200").inc(2)
    second.requests.labels("m", "k", "429").inc()
    third.tokens.labels("m", "k", "completion").inc(7)
    first.ttft.labels("m").observe(0.02)
    second.ttft.labels("m").observe(0.3)
    first.in_flight.labels("m").set(2)
    second.in_flight.labels("m").set(1)
    first.replica_up.labels("m", "r").set(1)
    second.replica_up.labels("m", "r").set(0)  # a stale view: the answering process's own watch counts
    page = first.render([("r", "vllm:num_requests_waiting 4\n")], [second.own().decode(), third.own().decode()])
    got = samples(page.decode())
    assert got[("deploykit_requests_total", (("key", "k"), ("model", "m"), ("status", "200")))] == 5
    assert got[("deploykit_requests_total", (("key", "k"), ("model", "m"), ("status", "429")))] == 1
    assert got[("deploykit_tokens_total", (("key", "k"), ("kind", "completion"), ("model", "m")))] == 7
    assert got[("deploykit_ttft_seconds_count", (("model", "m"),))] == 2
    assert got[("deploykit_ttft_seconds_sum", (("model", "m"),))] == pytest.approx(0.32)
    assert got[("deploykit_ttft_seconds_bucket", (("le", "0.025"), ("model", "m")))] == 1
    assert got[("deploykit_ttft_seconds_bucket", (("le", "0.5"), ("model", "m")))] == 2
    assert got[("deploykit_in_flight_requests", (("model", "m"),))] == 3
    assert got[("deploykit_replica_up", (("model", "m"), ("replica", "r")))] == 1
    assert got[("vllm:num_requests_waiting", (("replica", "r"),))] == 4  # the engines' once, after
    assert not any(name.endswith("_created") for name, _ in got)  # creation times do not add up
    assert page.decode().count("# TYPE deploykit_requests_total counter") == 1
    alone = samples(first.render().decode())  # one process: its figures as they are
    assert alone[("deploykit_requests_total", (("key", "k"), ("model", "m"), ("status", "200")))] == 3


def test_a_worker_reads_back_the_options_it_was_given() -> None:
    spill = SpillTarget("m", "gpt-4o-mini", "https://api.example/v1", "", "secret", False, 0.15, 0.6, max_queue=4)
    options = ServeOptions(
        host="0.0.0.0", port=9000, auth=True, spills=(spill,), metrics_token="t", max_concurrent=9, workers=4,
        limits=ConnectionLimits(max_header_bytes=1000, body_timeout_s=5), token_prices={"m": Price(0.1, 0.4)},
        priority_models=("m",), lora_on_demand=True, routing="prefix",
    )  # fmt: skip
    assert ServeOptions.from_dict(json.loads(json.dumps(asdict(options)))) == options
    assert options.max_concurrent_each == 2  # 9 over 4 processes: at most 8 in flight, never more than 9
    assert ServeOptions(max_concurrent=2, workers=4).max_concurrent_each == 1
    assert ServeOptions(max_concurrent=None, workers=4).max_concurrent_each is None
    assert ServeOptions(max_concurrent=5).max_concurrent_each == 5


def test_each_worker_reads_every_other_one_at_a_private_address() -> None:
    peers = Peers("s3cret", (8101, 8102, 8103))
    assert peers.others(0) == ("http://127.0.0.1:8102/s3cret", "http://127.0.0.1:8103/s3cret")
    assert peers.others(2) == ("http://127.0.0.1:8101/s3cret", "http://127.0.0.1:8102/s3cret")
    picked = Peers.pick(3)
    assert len(set(picked.ports)) == 3 and len(picked.secret) >= 32 and picked.secret != Peers.pick(3).secret


def test_the_first_process_binds_a_free_port_and_the_others_join_it() -> None:
    first = bind("127.0.0.1", 0, shared=True)
    port = first.getsockname()[1]
    try:
        second = join("127.0.0.1", port)  # SO_REUSEPORT: the kernel spreads connections over both
        second.close()
        with pytest.raises(PortInUseError):  # another deployment on a port in use is refused, shared or not
            bind("127.0.0.1", port, shared=True)
        with pytest.raises(PortInUseError):
            bind("127.0.0.1", port)
    finally:
        first.close()
    alone = bind("127.0.0.1", 0)
    try:
        assert not alone.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)  # one process: nobody may join
        with pytest.raises(PortInUseError):
            join("127.0.0.1", alone.getsockname()[1])
    finally:
        alone.close()
