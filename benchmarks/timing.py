"""How much the load generator adds to what it times, against the server's own log and against a lean
client, side by side in one run.

    .venv/bin/python -m benchmarks.timing [--streams 4,64] [--seconds 10] [--tokens 64]

The synthetic SSE server (tests/fakes/sse_server.py, in a process of its own) logs when each answer's every
content event left it, on the clock all processes of the machine share (time.monotonic). For each stream
count, `deploykit loadtest run -c N` (its own process, as a user runs it) and then a lean client (plain
asyncio streams, one coroutine a stream, timestamp on each chunk read: the least a Python client can add)
drive the same server for the same time. Every answer is matched to the server's log by its id; the error
of a timestamp is when the client saw an event minus when the server sent it. Printed per client: the
first token's error (what TTFT measures on top of the server's own) and every event's, p50 and p99, and for
deploykit the run's own validity verdict (its probe lag p99). The targets (issue #16): deploykit's TTFT
error p99 within 1.5 x the lean client's + 2 ms, p50 within 0.5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from deploykit.loadtests.metrics import percentile

HOST = "127.0.0.1"


async def lean_client(port: int, streams: int, seconds: float, tokens: int) -> list[dict[str, object]]:
    """`streams` keep-alive connections, each sending the next request as the last answer ends."""
    body = json.dumps(
        {"model": "synth", "messages": [{"role": "user", "content": "x"}], "max_tokens": tokens, "stream": True,
         "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    ).encode()  # fmt: skip
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    deadline = time.monotonic() + seconds
    answers: list[dict[str, object]] = []

    async def stream() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        while time.monotonic() < deadline:
            writer.write(head + body)
            await reader.readuntil(b"\r\n\r\n")
            events: list[float] = []
            answer_id = None
            while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) != 0:
                chunk = await reader.readexactly(size + 2)
                now = time.monotonic()
                if b'"content"' in chunk:
                    event = json.loads(chunk[chunk.index(b"{") : chunk.rindex(b"}") + 1])
                    answer_id = answer_id or event.get("id")
                    choices = event.get("choices") or [{}]
                    if (choices[0].get("delta") or {}).get("content"):
                        events.append(now)
            await reader.readuntil(b"\r\n")
            answers.append({"id": answer_id, "events": events})
        writer.close()

    await asyncio.gather(*(stream() for _ in range(streams)))
    return answers


def errors(answers: list[dict[str, object]], sent: dict[str, list[float]]) -> tuple[list[float], list[float]]:
    """(first-token errors, every event's), in ms: client time minus the server's, matched by answer id."""
    first, every = [], []
    for answer in answers:
        server = sent.get(str(answer["id"]))
        client = answer["events"]
        if not server or not isinstance(client, list) or len(client) != len(server):
            continue  # cut off at the end of the run, or not logged yet
        first.append((client[0] - server[0]) * 1000)
        every += [(c - s) * 1000 for c, s in zip(client, server, strict=True)]
    return first, every


def measure(streams: int, seconds: float, tokens: int, folder: Path) -> list[dict[str, object]]:
    log = folder / f"server-{streams}.jsonl"
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.sse_server", str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # its tracebacks of clients cut off at the end of a run
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        out = folder / f"deploykit-{streams}.json"
        subprocess.run(
            [sys.executable, "-m", "deploykit", "loadtest", "run", f"http://{HOST}:{port}", "--model", "synth",
             "-c", str(streams), "--duration", str(seconds), "--output-tokens", str(tokens),
             "--out", str(out)],
            check=True, capture_output=True,
        )  # fmt: skip
        report = json.loads(out.read_text())
        ours = [{"id": r["response_id"], "events": [t for t, _ in r["events"]]} for r in report["records"]]
        lean = asyncio.run(lean_client(port, streams, seconds, tokens))
        time.sleep(0.5)  # the last answers' log lines
    finally:
        server.terminate()
        server.wait()
    sent = {}
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        sent[entry["id"]] = entry["sends"]
    rows = []
    for name, answers in (("deploykit loadtest", ours), ("lean asyncio client", lean)):
        first, every = errors(answers, sent)
        row: dict[str, object] = {"streams": streams, "client": name, "answers": len(first)}
        for label, values in (("ttft", first), ("event", every)):
            ordered = sorted(values)
            row[f"{label}_p50_ms"] = percentile(ordered, 50) if ordered else None
            row[f"{label}_p99_ms"] = percentile(ordered, 99) if ordered else None
        if name.startswith("deploykit"):
            lag = report["schedule_lag"] or {}
            row["valid"] = report["valid"]
            row["lag_p99_ms"] = lag.get("p99", 0) * 1000
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="4,64")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    print("| streams | client | answers | TTFT error p50 / p99 | every event's p50 / p99 | run valid (lag p99) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for streams in (int(x) for x in args.streams.split(",")):
            rows = measure(streams, args.seconds, args.tokens, Path(tmp))
            for row in rows:
                valid = f"{'yes' if row['valid'] else 'no'} ({row['lag_p99_ms']:.1f} ms)" if "valid" in row else "-"
                print(
                    f"| {row['streams']} | {row['client']} | {row['answers']} | "
                    f"{row['ttft_p50_ms']:.2f} / {row['ttft_p99_ms']:.2f} ms | "
                    f"{row['event_p50_ms']:.2f} / {row['event_p99_ms']:.2f} ms | {valid} |"
                )
            ours, lean = rows
            bound = 1.5 * float(lean["ttft_p99_ms"]) + 2  # type: ignore[arg-type]
            p50_ok = float(ours["ttft_p50_ms"]) <= float(lean["ttft_p50_ms"]) + 0.5  # type: ignore[arg-type]
            print(
                f"|  | target: p99 <= {bound:.2f} ms, p50 <= lean + 0.5 ms | "
                f"{'met' if float(ours['ttft_p99_ms']) <= bound and p50_ok else 'missed'} | | | |"  # type: ignore[arg-type]
            )


if __name__ == "__main__":
    main()
