"""How often the saturation test (loadtests/saturation.py) calls a run saturated, by load and run length, on
simulated queues of known capacity: Poisson arrivals into 4 slots of fixed service time (the synthetic
server's "queue" model: 0.29 s an answer, first token after 0.05 s), first come first served.

    .venv/bin/python -m benchmarks.saturation [--runs 100] [--seconds 10,20,60]

Each row: the share of runs called saturated at that load (offered / capacity). Below 1 that share is the
false alarms, above 1 the detections. Then `--find-max`'s own search (search_levels) from 8 requests/s on
simulated levels: how often it ends within 10% of capacity, with and without its second, longer look at a
middle level that failed on its queue alone. The simulation is exact, so the figures are the test's own,
not the machine's; docs/PERFORMANCE.md records them.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random

from deploykit.loadtests.launch import search_levels
from deploykit.loadtests.records import RequestRecord
from deploykit.loadtests.saturation import open_loop

SLOTS, SERVICE_S, FIRST_TOKEN_S = 4, 0.29, 0.05
CAPACITY = SLOTS / SERVICE_S  # requests a second
LOADS = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2)


def simulated(load: float, seconds: float, seed: int) -> list[RequestRecord]:
    """Each request of a run at `load` x capacity, as the load generator would record it."""
    rng, t, free = random.Random(seed), 0.0, [0.0] * SLOTS
    records = []
    while (t := t + rng.expovariate(load * CAPACITY)) < seconds:
        start = max(t, heapq.heappop(free))
        heapq.heappush(free, start + SERVICE_S)
        records.append(
            RequestRecord(scheduled=t, sent=t, end=start + SERVICE_S, status=200, events=[(start + FIRST_TOKEN_S, 1)])
        )
    return records


def rate(load: float, seconds: float, runs: int) -> float:
    """The share of `runs` simulated runs called saturated."""
    return (
        sum(open_loop(simulated(load, seconds, seed), (0.0, seconds)).saturated is True for seed in range(runs)) / runs
    )


def search(seconds: float, seed: int, second_look: bool = True, start: float = 8.0) -> float | None:
    """`loadtest run --find-max` over rates on simulated runs (search_levels, the command's own search); the
    highest rate it accepts. Without `second_look` a level that failed on its queue is not run again."""
    tries = itertools.count()

    def outcome(rate_: float, longer: bool) -> str:
        s = seconds * (2 if longer else 1)
        if open_loop(simulated(rate_ / CAPACITY, s, seed * 1000 + next(tries)), (0.0, s)).saturated is not True:
            return "pass"
        return "queue" if second_look else "fail"

    return search_levels(start, False, 512, outcome)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seconds", default="10,20,60")
    args = parser.parse_args()
    lengths = [float(x) for x in args.seconds.split(",")]
    print("| load / capacity | " + " | ".join(f"{s:g} s runs" for s in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for load in LOADS:
        print(f"| {load:g} | " + " | ".join(f"{rate(load, s, args.runs):.0%}" for s in lengths) + " |")
    print()
    print("| search (levels of) | second look | ends within 10% of capacity | below | above |")
    print("|---|---|---|---|---|")
    for seconds in lengths:
        for second_look in (False, True):
            found = [(search(seconds, seed, second_look) or 0) / CAPACITY for seed in range(args.runs)]
            within = sum(0.9 <= x <= 1.1 for x in found) / len(found)
            below, above = sum(x < 0.9 for x in found) / len(found), sum(x > 1.1 for x in found) / len(found)
            print(f"| {seconds:g} s | {'yes' if second_look else 'no'} | {within:.0%} | {below:.0%} | {above:.0%} |")


if __name__ == "__main__":
    main()
