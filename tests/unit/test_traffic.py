"""Real traffic shapes for the load tester: traces read from the three formats (with the line of a bad row),
bursty arrivals whose gaps keep the rate and spread as the gamma shape says, and a trace's schedule with
its lengths, sped up and shared between processes."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import pytest

from deploykit.core.errors import UsageError
from deploykit.loadtests.config import LoadTestConfig
from deploykit.loadtests.request import request_body
from deploykit.loadtests.schedule import Schedule
from deploykit.loadtests.server_view import ServerSample, read_sample
from deploykit.loadtests.traces import Arrival, read_trace
from deploykit.loadtests.workload import Prompt

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.0000000,879,0
2023-11-16 18:15:47.0000000,21,7
"""
BURSTGPT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5.0,ChatGPT,472,18,490,Conversation log
45.5,GPT-4,1087,0,1087,Conversation log
7.25,ChatGPT,300,120,420,API log
"""


def test_the_three_trace_formats(tmp_path: Path) -> None:
    azure = tmp_path / "azure.csv"
    azure.write_text(AZURE)
    trace = read_trace(azure)
    # sorted by arrival, relative to the first; the row with no answer tokens is left out, counted
    assert [(round(a.at, 4), a.input_tokens, a.output_tokens) for a in trace.arrivals] == [
        (0.0, 374, 44),
        (0.3194, 21, 7),
        (4.3146, 396, 109),
    ]
    assert trace.skipped == 1 and trace.span_s == pytest.approx(4.314579)
    burst = tmp_path / "burst.csv"
    burst.write_text(BURSTGPT)
    assert read_trace(burst).arrivals == [Arrival(0.0, 472, 18), Arrival(2.25, 300, 120)]
    jsonl = tmp_path / "trace.jsonl"
    jsonl.write_text(
        '{"arrival": 1.5, "input_tokens": 10, "output_tokens": 5}\n\n'
        '{"timestamp": 1.0, "input_tokens": 3, "output_tokens": 2}\n'
    )
    assert read_trace(jsonl).arrivals == [Arrival(0.0, 3, 2), Arrival(0.5, 10, 5)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"arrival": 0, "input_tokens": 1, "output_tokens": 1}\n{"arrival": 1}\n', "Line 2 of the trace"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,12,x\n", "Line 2 of the trace"),
        ("time,prompt,answer\n1,2,3\n", "has columns ['answer', 'prompt', 'time']"),
        ("Timestamp,Request tokens,Response tokens\n1,0,0\n", "holds no request with prompt and answer tokens"),
    ],
)
def test_a_bad_trace_says_where(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.trace"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")) as raised:
        read_trace(path)
    assert "JSONL" in raised.value.hint
    with pytest.raises(UsageError, match="Cannot read the trace"):
        read_trace(tmp_path / "missing.jsonl")


def _config(**shape: object) -> LoadTestConfig:
    return LoadTestConfig(url="http://x", model="m", **shape)  # type: ignore[arg-type]


@pytest.mark.parametrize(("burstiness", "cv"), [(1.0, 1.0), (0.25, 2.0), (4.0, 0.5)])
def test_bursty_arrivals_keep_the_rate_and_spread_as_the_gamma_shape_says(burstiness: float, cv: float) -> None:
    schedule = Schedule(_config(rate=10.0, burstiness=burstiness, seed=7), start=100.0)
    times = [schedule.take(0.0)[0] for _ in range(40_000)]  # type: ignore[index]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 100.0
    assert statistics.fmean(gaps) == pytest.approx(0.1, rel=0.03)  # 10 a second, however bursty
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.06)  # 1 / sqrt(shape)


def test_a_closed_loop_sends_now() -> None:
    schedule = Schedule(_config(concurrency=2, input_tokens="8", output_tokens="3"), start=0.0)
    due, prompt = schedule.take(42.0)  # type: ignore[misc]
    assert due == 42.0 and prompt.max_tokens == 3


def _answers(schedule: Schedule) -> list[int]:
    lengths = []
    while (taken := schedule.take(0.0)) is not None:
        lengths.append(taken[1].max_tokens)
    return lengths


def test_a_trace_is_replayed_with_its_lengths_sped_up_and_shared(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    rows = [(0.0, 100, 10), (1.0, 200, 20), (3.0, 300, 30), (4.0, 400, 40), (8.0, 500, 50)]
    path.write_text("".join(f'{{"arrival": {a}, "input_tokens": {i}, "output_tokens": {o}}}\n' for a, i, o in rows))
    config = _config(trace=str(path), trace_speed=2.0, shared_prefix_tokens=0)
    schedule = Schedule(config, start=10.0)
    taken = [schedule.take(0.0) for _ in range(6)]
    assert taken[-1] is None  # the trace's end
    assert [t[0] for t in taken[:-1]] == [10.0, 10.5, 11.5, 12.0, 14.0]  # type: ignore[index]
    assert [t[1].max_tokens for t in taken[:-1]] == [10, 20, 30, 40, 50]  # type: ignore[index]
    assert [len(t[1].text.split()) for t in taken[:-1]] == [100, 200, 300, 400, 500]  # type: ignore[index]
    parts = config.model_copy(update={"processes": 2}).split()
    assert [p.trace_part for p in parts] == [(0, 2), (1, 2)]
    assert [_answers(Schedule(p, 0.0)) for p in parts] == [[10, 30, 50], [20, 40]]  # each request once in all
    with pytest.raises(ValueError, match="exactly one of concurrency"):
        _config(rate=1.0, trace=str(path))


VLLM_METRICS = """# TYPE vllm:num_preemptions counter
vllm:num_preemptions_total{model_name="m"} 3.0
vllm:num_requests_running{replica="http://a:8000"} 2
vllm:num_requests_running{replica="http://b:8000"} 3
vllm:num_requests_waiting{replica="http://a:8000"} 1
vllm:gpu_cache_usage_perc{replica="http://a:8000"} 0.25
vllm:kv_cache_usage_perc{replica="http://b:8000"} 0.5
deploykit_requests_total{model="m",key="",status="200"} 9
"""


def test_the_server_view_sums_replicas_and_keeps_the_fullest_cache() -> None:
    assert read_sample(VLLM_METRICS, 7.0) == ServerSample(7.0, running=5, waiting=1, kv_cache=0.5, preemptions=3)
    assert read_sample("vllm:num_requests_running 0\n", 1.0) == ServerSample(1.0, 0, 0, None, 0)
    assert read_sample('{"object": "list", "data": []}', 1.0) is None  # not Prometheus text: not a vLLM server
    assert read_sample("up 1\n", 1.0) is None  # Prometheus text without vLLM's figures


def test_a_conversation_turn_carries_the_turns_so_far() -> None:
    config = _config(concurrency=1, turns=3)
    history = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "answer"}]
    body = request_body(config, Prompt("second", 8), history)
    assert body["messages"] == [*history, {"role": "user", "content": "second"}] and body["max_tokens"] == 8
    for shape in ({"rate": 1.0, "turns": 2}, {"concurrency": 1, "turns": 2, "api": "completions"}):
        with pytest.raises(ValueError, match="need the chat API and a closed loop"):
            _config(**shape)
