"""The sizing model at its edges, where a one-character bug hides: the boundaries of what fits and what is
refused, a calibration carried through every step (size_model against the steps done by hand), the
warnings a calibration raises and where they stop, and the exact message and hint of each calibration
error (what a user reads to fix the command). The arithmetic itself is worked by hand in test_sizing.py."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from deploykit.core.errors import DeploykitError, NotFoundError, UsageError
from deploykit.core.slo import parse_slos
from deploykit.models.config import ModelConfig
from deploykit.models.fit import GIB, weight_bytes
from deploykit.models.prices import (
    GpuPrice,
    Prices,
    Provisioned,
    RentalExtras,
    ServicePrice,
    load_prices,
    stale_summary,
)
from deploykit.sizing import ranking
from deploykit.sizing.calibration import calibrate, calibration_at
from deploykit.sizing.cost import (
    SMALL_API_BELOW_PARAMS,
    BreakEven,
    CostReport,
    Overheads,
    SelfHosted,
    blended_price_per_token,
    break_even_cells,
    cheapest,
    compare,
    cost_figure,
    cost_model,
    default_offers,
    monthly_tokens_capacity,
    owning,
    plot_png,
    plot_series,
    report_html,
    self_host_cost_at,
    tokens_text,
)
from deploykit.sizing.hardware import Accelerator, HardwareByName, kv_tokens_on
from deploykit.sizing.load import TargetLoad
from deploykit.sizing.performance import closed_loop_point, point
from deploykit.sizing.ranking import (
    CALIBRATED_BAND,
    Infeasible,
    Option,
    Rental,
    cheapest_rental,
    nearest_feasible_hint,
    size,
    size_model,
    size_option,
)
from tests.unit.test_sizing import CPU, LLAMA8, PRICES, SMOL, TODAY, gpu

TOY = ModelConfig("Toy", 10, 512, 8, 8, 64, 4096, "bfloat16", 1_000_000_000)
TOY_GPU = Accelerator("toy", "Toy GPU", 16 * 1024**3, 1e12, 1e14, True, 300, 0.5, 0.5)
TOY_KV = 578_672  # worked by hand in test_sizing.test_one_option_by_hand


# what fits


def test_a_request_as_long_as_the_kv_cache_fits_and_one_token_more_does_not() -> None:
    fits = size_option(TOY, TOY_GPU, 1, TargetLoad(0.1, TOY_KV - 100, 100), 0.8, None)
    assert isinstance(fits, Option) and fits.max_concurrency == 1
    kv2 = kv_tokens_on(TOY, TOY_GPU, 2)
    assert kv2 > TOY_KV
    refused = size_option(TOY, TOY_GPU, 2, TargetLoad(0.1, kv2 - 99, 100), 0.8, None)
    # 2e9 B of weights over two devices: 0.93 GiB each
    assert refused == Infeasible(
        "toy",
        2,
        f"holds {kv2:,} KV tokens, not one {kv2 + 1:,}-token request (0.9 GiB of weights per device of 16 GiB)",
        (kv2 + 1) / kv2,
    )


def test_a_model_larger_than_the_device_is_infinitely_short() -> None:
    small = replace(TOY_GPU, memory_bytes=GIB)  # 1 GiB for 2e9 B of weights: no KV cache at all
    refused = size_option(TOY, small, 1, TargetLoad(0.1, 100, 100), 0.8, None)
    assert isinstance(refused, Infeasible) and refused.shortfall == float("inf")
    assert f"({weight_bytes(TOY, 'bfloat16') / GIB:.1f} GiB of weights per device of 1 GiB)" in refused.reason


@pytest.mark.parametrize("over", [1.0001, 1.3, 2.0, 4.0])
def test_the_largest_concurrency_is_found_by_a_plain_scan_too(over: float) -> None:
    """The binary search against a scan of every concurrency, on a calibrated CPU (whose overhead per step
    makes the SLO bind): `over` sets the TPOT limit just above the one-stream TPOT, so the answer runs
    from 1 stream upwards."""
    cal = calibration_at(SMOL, CPU, 1, 4, 64, 32, 0.070, 1.3, "run.json")
    one = point(SMOL, CPU, 1, 1, 64, 32, cal).tpot_s * (1 + CALIBRATED_BAND)
    w = TargetLoad(0.5, 64, 32, tuple(parse_slos(f"tpot_p95={one * over * 1000}ms")))
    option = size_option(SMOL, CPU, 1, w, 0.8, cal)
    assert isinstance(option, Option) and option.calibrated and option.band == CALIBRATED_BAND
    cap = min(kv_tokens_on(SMOL, CPU, 1) // 96, ranking.MAX_NUM_SEQS)
    meets = [
        c for c in range(1, cap + 1) if point(SMOL, CPU, 1, c, 64, 32, cal).tpot_s * (1 + CALIBRATED_BAND) <= one * over
    ]
    assert type(option.max_concurrency) is int and option.max_concurrency == max(meets)
    if over == 1.0001:
        assert option.max_concurrency == 1
    best = point(SMOL, CPU, 1, option.max_concurrency, 64, 32, cal)
    assert option.capacity_rps == best.rps(32)
    assert option.at_load == point(SMOL, CPU, 1, option.at_load.concurrency, 64, 32, cal)


def _rent(usd: float, gpus: tuple[int, ...], instance: str = "") -> GpuPrice:
    return GpuPrice(
        gpu="l4", provider="acme", kind="rent", usd=usd, gpus=gpus, instance=instance, as_of=TODAY, source="t",
        confidence="user",
    )  # fmt: skip


def test_a_tensor_parallel_replica_is_rented_as_one_host_never_as_single_gpus() -> None:
    w = TargetLoad(2.0, 512, 256, tuple(parse_slos("tpot_p95=50ms")))
    single = size_option(LLAMA8, gpu("l4"), 2, w, 0.8, None, [_rent(0.5, (1,))])
    assert isinstance(single, Option) and single.tp == 2 and single.replicas == 3
    assert single.rental is None and single.usd_per_hour is None  # nobody here rents a host of 2 L4s
    # a 4-GPU host at $1/GPU-h holds two replicas of 2; an 8-GPU one at $0.90 holds four; each is paid whole
    four, eight = _rent(1.0, (4,), "box4"), _rent(0.9, (8,), "box8")
    option = size_option(LLAMA8, gpu("l4"), 2, w, 0.8, None, [_rent(0.5, (1,)), four, eight])
    assert isinstance(option, Option) and option.replicas == 3
    # three replicas of 2: one 8-GPU host ($7.20), not two of 4 ($8), and never 6 x $0.50
    assert option.rental == Rental(eight, 8, 1) and option.usd_per_hour == pytest.approx(7.2)
    assert option.to_json(w)["rented_as"] == "1 x box8 (acme)"
    # more replicas: one size of host for all, whichever comes cheapest (five: three hosts of 4, not two of 8)
    assert [option.rent_per_hour(n) for n in (1, 2, 3, 4, 5, 8)] == pytest.approx([4.0, 4.0, 7.2, 7.2, 12.0, 14.4])


def test_a_replica_for_availability_can_cost_nothing_more_in_a_host_already_paid() -> None:
    w = TargetLoad(2.0, 512, 256, tuple(parse_slos("tpot_p95=50ms")))
    option = size_option(LLAMA8, gpu("l4"), 2, w, 0.8, None, [_rent(0.9, (8,), "box8")])
    assert isinstance(option, Option) and option.replicas == 3  # one 8-GPU host, room for a fourth
    hosted = SelfHosted(option, Overheads(min_replicas=4), owning=None)
    [load, spare] = hosted.lines("rent")
    assert spare.item == "1 more replica for availability (at least 4 replicas)" and spare.usd == 0.0
    assert hosted.rent_usd == load.usd == pytest.approx(8 * 0.9 * 730) and hosted.lines("own") == []
    assert SelfHosted(option, Overheads(min_replicas=5), None).rent_usd == pytest.approx(2 * 8 * 0.9 * 730)


def test_the_cheapest_rental_fills_instances_with_whole_replicas() -> None:
    sizes = _rent(1.0, (1, 2, 8))  # a marketplace: the same rate for 1, 2 or 8 GPUs in one host
    assert cheapest_rental([sizes], 4, 1) == Rental(sizes, 8, 1)  # 4 GPUs: only the 8-GPU host holds them
    assert cheapest_rental([sizes], 4, 3) == Rental(sizes, 8, 2)  # three replicas of 4: two hosts of 8
    assert cheapest_rental([sizes], 2, 3) == Rental(sizes, 2, 3)  # three 2-GPU hosts ($6) beat one 8 ($8)
    assert cheapest_rental([sizes], 3, 1) is None  # no size is a multiple of 3
    assert cheapest_rental([], 1, 1) is None
    assert Rental(sizes, 8, 2).label == "2 x 8-GPU instance (acme)" and Rental(sizes, 8, 2).usd_per_hour == 16.0


def test_an_unpriced_option_and_a_calibrated_one_in_json() -> None:
    cal = calibration_at(SMOL, CPU, 1, 4, 64, 32, 0.070, 1.3, "run.json")
    w = TargetLoad(0.2, 64, 32)
    sizing = size("smollm2-135m", SMOL, w, [CPU, gpu("l4")], PRICES, calibration=cal)
    assert [o.hardware.name for o in sizing.options] == ["l4", "cpu"]  # priced first, the unpriced last
    cpu = sizing.options[1].to_json(w)
    assert cpu["source"] == "calibrated" and cpu["band"] == CALIBRATED_BAND
    assert cpu["usd_per_hour"] is None and cpu["usd_per_month"] is None and cpu["usd_per_mtok"] is None
    assert cpu["price"] is None
    assert sizing.to_json()["calibration"] == cal.__dict__


# what is refused


@pytest.mark.parametrize(
    ("load", "utilization", "refused"),
    [
        ((1.0, 1, 1), 1.0, None),
        ((0.0, 512, 256), 0.8, "The load needs a positive rate"),
        ((1.0, 0, 256), 0.8, "The load needs a positive rate"),
        ((1.0, 512, 0), 0.8, "The load needs a positive rate"),
        ((1.0, 512, 256), 0.0, "--max-utilization 0.0 is not in (0, 1]."),
        ((1.0, 512, 256), 1.5, "--max-utilization 1.5 is not in (0, 1]."),
    ],
)
def test_the_load_and_utilization_bounds(load: tuple[float, int, int], utilization: float, refused: str | None) -> None:
    def run() -> object:
        return size("smollm2-135m", SMOL, TargetLoad(*load), [gpu("l4")], PRICES, max_utilization=utilization)

    if refused is None:
        assert run()
    else:
        with pytest.raises(UsageError, match=refused.replace("(", r"\(").replace("]", r"\]")):
            run()


def test_a_cpu_is_sized_as_one_device() -> None:
    w = TargetLoad(0.1, 64, 32, tuple(parse_slos("tpot_p95=0.01ms")))  # nothing meets it
    sizing = size("smollm2-135m", SMOL, w, [CPU], PRICES)
    assert [(i.hardware, i.tp) for i in sizing.infeasible] == [("cpu", 1)] and sizing.options == []


def test_a_provider_picks_its_own_rate() -> None:
    # a GPU that two providers rent one at a time, at different rates (SmolLM2 needs one GPU)
    singles = {g: [p for p in PRICES.prices_for(g, "rent") if 1 in p.gpus] for g in PRICES.gpus}
    name, offers = next((g, o) for g, o in singles.items() if len({p.provider for p in o}) > 1)
    other = offers[-1]
    assert other.usd > offers[0].usd and other.provider != offers[0].provider
    sizing = size("smollm2-135m", SMOL, TargetLoad(0.2, 64, 32), [gpu(name)], PRICES, provider=other.provider)
    assert sizing.options[0].price == other
    cheapest = size("smollm2-135m", SMOL, TargetLoad(0.2, 64, 32), [gpu(name)], PRICES)
    assert cheapest.options[0].price == offers[0]


def test_the_hint_for_a_load_nothing_serves_names_the_three_closest() -> None:
    w = TargetLoad(1.0, 512, 256, tuple(parse_slos("tpot_p95=0.1ms")))
    sizing = size("llama-3.1-8b-instruct", LLAMA8, w, [gpu(n) for n in ("l4", "a100-80gb", "h100-sxm")], PRICES)
    assert len(sizing.infeasible) > 3
    closest = sorted(sizing.infeasible, key=lambda i: i.shortfall)[:3]
    reasons = "; ".join(f"{i.hardware} x{i.tp} {i.reason}" for i in closest)
    assert (
        nearest_feasible_hint(sizing)
        == f"Closest: {reasons}. Relax the SLO, shorten the requests, or pick a smaller model."
    )


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0125, "12.5 ms"), (9.99, "9.99e+03 ms"), (10.0, "10 s"), (10.6, "11 s")]
)
def test_latencies_in_reasons_switch_to_seconds_at_ten(seconds: float, text: str) -> None:
    assert ranking._ms(seconds) == text


# a calibration's warnings


@pytest.fixture
def engine_here(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(ranking, "installed_engine_version", lambda: "0.32.0")
    return "0.32.0"


def test_the_engine_warning_compares_the_measured_engine_with_this_one(engine_here: str) -> None:
    cal = calibration_at(SMOL, CPU, 1, 4, 64, 32, 0.070, 1.3, "run.json")
    w = TargetLoad(0.2, 64, 32, tuple(parse_slos("tpot_p95=200ms")))  # 8 streams, near the 4 measured
    assert (
        size("smollm2-135m", SMOL, w, [CPU], PRICES, calibration=replace(cal, engine_version=engine_here)).warnings
        == []
    )
    [other] = size("smollm2-135m", SMOL, w, [CPU], PRICES, calibration=replace(cal, engine_version="9.9")).warnings
    assert "measured vLLM 9.9; this machine has 0.32.0" in other


@pytest.mark.parametrize(
    ("tokens", "warned"), [((128, 32), False), ((32, 16), False), ((160, 32), True), ((64, 80), True)]
)
def test_the_length_warning_holds_within_twice_the_measured_lengths(
    engine_here: str, tokens: tuple[int, int], warned: bool
) -> None:
    cal = replace(calibration_at(SMOL, CPU, 1, 4, 64, 32, 0.070, 1.3, "run.json"), engine_version=engine_here)
    sizing = size("smollm2-135m", SMOL, TargetLoad(0.05, *tokens), [CPU], PRICES, calibration=cal)
    assert any("tokens in/out" in line for line in sizing.warnings) is warned


@pytest.mark.parametrize(
    ("slo", "measured", "warned"),
    [("200ms", 8, False), ("200ms", 2, False), ("200ms", 32, False), ("500ms", 6, True), ("200ms", 40, True)],
)
def test_the_concurrency_warning_holds_within_four_times_the_measured_streams(
    engine_here: str, slo: str, measured: int, warned: bool
) -> None:
    """The CPU runs 8 streams under a 200 ms TPOT SLO and 26 under 500 ms; the load test's concurrency is
    set after the fit, to put their ratio at 1, 4, 1/4 (within the band), 4.3 and 1/5 (outside)."""
    cal = replace(calibration_at(SMOL, CPU, 1, 4, 64, 32, 0.070, 1.3, "run.json"), engine_version=engine_here)
    cal = replace(cal, concurrency=measured)
    w = TargetLoad(0.05, 64, 32, tuple(parse_slos(f"tpot_p95={slo}")))
    sizing = size("smollm2-135m", SMOL, w, [CPU, gpu("l4")], PRICES, calibration=cal)
    cpu = next(o for o in sizing.options if o.hardware.name == "cpu")
    assert cpu.max_concurrency == {"200ms": 8, "500ms": 26}[slo]
    flagged = [line.split(" ")[0] for line in sizing.warnings if "streams per replica" in line]
    assert flagged == (["cpu"] if warned else [])  # never the uncalibrated l4


# size_model: the steps done by hand


def _report(tmp_path: Path, hardware: str, **config: object) -> Path:
    path = tmp_path / "run.json"
    report = {
        "config": {
            "model": "smollm2-135m",
            "concurrency": 4,
            "input_tokens": "64",
            "output_tokens": "32",
            "hardware": hardware,
            **config,
        },
        "summary": {"tpot": {"p50": 0.004}, "ttft": {"p50": 0.02}},
    }
    path.write_text(json.dumps(report))
    return path


def test_size_model_is_calibrate_then_size_then_the_price_warnings(tmp_path: Path, engine_here: str) -> None:
    path = _report(tmp_path, "l4", engine_version=engine_here)
    load = TargetLoad(3.0, 256, 32, tuple(parse_slos("tpot_p95=40ms")))  # 4x the measured prompt: a warning
    provider = PRICES.prices_for("a100-80gb", "rent")[-1].provider  # not the cheapest
    later = TODAY.replace(year=TODAY.year + 3)  # every price is stale by then
    got = size_model(
        "smollm2-135m", SMOL, load, PRICES, hardware=["a100-80gb"], from_loadtest=path, measured_on="l4",
        provider=provider, max_utilization=0.5, today=later,
    )  # fmt: skip
    cal = calibrate(path, "smollm2-135m", SMOL, HardwareByName(PRICES), "l4")
    assert cal.tp == 1 and cal.source == str(path) and got.calibration == cal
    assert calibrate(path, "smollm2-135m", SMOL, HardwareByName(PRICES), "l4:2").tp == 2
    by_hand = size(
        "smollm2-135m", SMOL, load, [gpu("a100-80gb"), gpu("l4")], PRICES, max_utilization=0.5, calibration=cal,
        provider=provider,
    )  # fmt: skip
    assert got.model == "smollm2-135m" and got.options == by_hand.options and got.infeasible == by_hand.infeasible
    # the calibrated hardware joins the options, calibrated; the other is priced at the provider's rate
    assert {o.hardware.name: o.calibrated for o in got.options} == {"a100-80gb": False, "l4": True}
    [a100] = [o for o in got.options if o.hardware.name == "a100-80gb"]
    assert a100.price == PRICES.prices_for("a100-80gb", "rent")[-1] and a100.price.provider == provider
    used = [o.price for o in got.options if o.price is not None]
    assert used and got.warnings == [*by_hand.warnings, *stale_summary(used, later)]
    assert len(by_hand.warnings) == 2 and len(stale_summary(used, later)) == 1  # lengths, streams; prices


def test_size_model_without_a_load_test_is_uncalibrated(tmp_path: Path) -> None:
    got = size_model("smollm2-135m", SMOL, TargetLoad(1.0, 64, 32), PRICES, hardware=["l4"], today=TODAY)
    assert got.calibration is None and [o.hardware.name for o in got.options] == ["l4"]


# calibration errors: what a user reads to fix the command


def _broken(tmp_path: Path, change: str) -> Path:
    path = _report(tmp_path, "l4")
    report = json.loads(path.read_text())
    match change:
        case "missing":
            path.unlink()
        case "not json":
            path.write_text("not json")
        case "other model":
            report["config"]["model"] = "gemma3-270m"
        case "no hardware":
            del report["config"]["hardware"]
        case "unknown hardware":
            report["config"]["hardware"] = "x9:2"
        case "open loop":
            report["config"]["concurrency"] = None
        case "no ttft":
            del report["summary"]["ttft"]
        case "no tpot":
            report["summary"]["tpot"] = {"p50": 0}
    if path.exists() and change != "not json":
        path.write_text(json.dumps(report))
    return path


@pytest.mark.parametrize(
    ("change", "error", "message", "hint"),
    [
        ("missing", NotFoundError, "No load-test report at {path}.", "Write one with deploykit loadtest --out."),
        ("not json", UsageError, "{path} is not a deploykit loadtest report.", "Use the JSON from --out."),
        (
            "other model",
            UsageError,
            "The load test in {path} ran model 'gemma3-270m', not 'smollm2-135m'.",
            "Calibrate with a load test of the same model.",
        ),
        (
            "no hardware",
            UsageError,
            "{path} does not say what hardware the server ran on.",
            "Pass --measured-on (e.g. cpu, l4, h100-sxm:2), or run the load test with --hardware.",
        ),
        ("unknown hardware", NotFoundError, "No hardware named 'x9' to calibrate.", "Known: l4, cpu."),
        ("open loop", UsageError, "{path} is an open-loop run.", "Calibrate with a closed-loop run (--concurrency)."),
        ("no ttft", UsageError, "{path} has no TPOT or TTFT to calibrate with.", "Use a streaming load test."),
        ("no tpot", UsageError, "{path} has no TPOT or TTFT to calibrate with.", "Use a streaming load test."),
    ],
)
def test_each_calibration_error_says_what_to_do(
    tmp_path: Path, change: str, error: type[DeploykitError], message: str, hint: str
) -> None:
    path = _broken(tmp_path, change)
    with pytest.raises(error) as raised:
        calibrate(path, "smollm2-135m", SMOL, {"l4": gpu("l4"), "cpu": CPU})
    assert type(raised.value) is error
    assert (raised.value.message, raised.value.hint) == (message.format(path=path), hint)


def test_a_calibration_keeps_what_it_measured_and_clamps_its_efficiency() -> None:
    cal = calibration_at(SMOL, CPU, 1, 4, 64, 32, 0.070, 1.3, "run.json")
    analytic = closed_loop_point(SMOL, CPU, 1, 4, 64, 32)
    assert (cal.hardware, cal.tp, cal.source, cal.concurrency, cal.input_tokens, cal.output_tokens) == (
        "cpu", 1, "run.json", 4, 64, 32,
    )  # fmt: skip
    assert (cal.measured_tpot_s, cal.measured_ttft_s) == (0.070, 1.3)
    assert (cal.predicted_tpot_s, cal.predicted_ttft_s) == (analytic.tpot_s, analytic.ttft_s)
    # a prefill measured 1,000 times slower or faster than the analytic one is taken as at most 20 times
    slow = calibration_at(SMOL, CPU, 1, 4, 64, 32, 0.070, 0.070 + 4 * 347.19, "run.json")
    fast = calibration_at(SMOL, CPU, 1, 4, 64, 32, 0.070, 0.070 + 4 * 0.000347, "run.json")
    assert slow.compute_eff == CPU.compute_eff / 20 and fast.compute_eff == CPU.compute_eff * 20


# cost: which option each way, the lines of the verdict, the edges of the figures

L40S_AND_T4 = ("l40s", "t4")  # for the 8B at 0.5 req/s: the L40S is cheapest to rent, two T4s to own


def _costed(
    offers: list[str], w: TargetLoad = TargetLoad(0.5, 512, 256), provider: str | None = None, gpus=L40S_AND_T4
) -> tuple[CostReport, list[ServicePrice | Provisioned]]:
    sizing = size(
        "llama-3.1-8b-instruct", LLAMA8, w, [gpu(n) for n in gpus], PRICES, max_utilization=1.0, provider=provider
    )
    chosen = [PRICES.offer(n) for n in offers]
    return compare(sizing, PRICES, chosen, 1.0, w), chosen


def test_each_way_has_its_own_cheapest_option() -> None:
    report, offers = _costed(["llama-3.1-8b@together"])
    # by the cheaper of the two ways: the L40S rents for $635; two T4s (tp 2) own for $684.92 (cards $83.33,
    # spares $5.21, one PCIe server $289.56, 2 x 70 W + 800 W of power $133.81 and colocation $173.02)
    assert [s.label for s in report.self_hosted] == ["1 x l40s", "2 x t4 (tp 2)"]
    assert cheapest(report.self_hosted, "rent").label == "1 x l40s"  # type: ignore[union-attr]
    assert cheapest(report.self_hosted, "own").label == "2 x t4 (tp 2)"  # type: ignore[union-attr]
    rent, own = report.managed[0].break_even
    assert (rent.way, rent.option, own.way, own.option) == ("rent", "1 x l40s", "own", "2 x t4 (tp 2)")
    assert (
        report.verdict.startswith("Renting 1 x l40s costs $635/month")
        and "Owning 2 x t4 (tp 2) costs $685" in report.verdict
    )
    rent_line, own_line = plot_series(report, offers)[:2]
    assert (
        rent_line.label == "rent 1 x l40s (whole replicas)" and own_line.label == "own 2 x t4 (tp 2) (whole replicas)"
    )


def test_a_rival_that_self_hosting_never_beats_and_one_it_beats() -> None:
    cheap = ServicePrice(
        name="cheap", provider="acme", input_per_mtok=0.0001, output_per_mtok=0.0001, as_of=TODAY, source="t",
        confidence="user",
    )  # fmt: skip
    sizing = size(
        "llama-3.1-8b-instruct", LLAMA8, TargetLoad(0.5, 512, 256), [gpu("l40s")], PRICES, max_utilization=1.0
    )
    report = compare(sizing, PRICES, [cheap], 1.0, TargetLoad(0.5, 512, 256))
    assert report.managed[0].break_even == (
        BreakEven("rent", "1 x l40s", None, None),
        BreakEven("own", "1 x l40s", None, None),
    )
    assert report.verdict.count("self-hosting does not pay at any volume; fully busy replicas cost more per token") == 2
    assert break_even_cells(report.to_json()["managed"][0]) == ["never", "never"]  # type: ignore[index]
    # at 5 req/s gpt-4o costs more than renting or owning: both lines say so
    pays, _ = _costed(["gpt-4o"], TargetLoad(5.0, 512, 256), gpus=("l40s",))
    assert pays.verdict == (
        "Renting 1 x l40s costs $635/month against $50,458 for gpt-4o: self-hosting pays at 10.1 B tokens a month "
        "(it does above 127 M, with its replica busy 1% of the time). Owning 1 x l40s costs $916/month "
        "against $50,458 for gpt-4o: self-hosting pays at 10.1 B tokens a month (it does above 183 M, with its "
        "replica busy 1% of the time)."
    )


def test_a_provisioned_rival_has_no_break_even_volume() -> None:
    report, _ = _costed(["gpt-4o@azure-ptu"], gpus=("l40s",))
    assert report.managed[0].break_even == ()
    assert "$635/month against" in report.verdict and "pays at" in report.verdict


def test_a_provisioned_rival_cheaper_than_self_hosting_has_no_volume_to_name() -> None:
    tiny = Provisioned(
        name="tiny-ptu", provider="acme", usd_per_unit_hour=0.01, min_units=1, input_tpm_per_unit=1e9,
        output_weight=1.0, as_of=TODAY, source="t", confidence="user",
    )  # fmt: skip
    sizing = size(
        "llama-3.1-8b-instruct", LLAMA8, TargetLoad(0.5, 512, 256), [gpu("l40s")], PRICES, max_utilization=1.0
    )
    report = compare(sizing, PRICES, [tiny], 1.0, TargetLoad(0.5, 512, 256))
    assert report.managed[0].monthly_usd == pytest.approx(7.3)  # one unit, 730 h at $0.01
    assert report.verdict.count("for tiny-ptu: self-hosting does not pay at any volume") == 2


def test_without_rentals_the_owning_line_stands_alone() -> None:
    report, _ = _costed(["llama-3.1-8b@together"], provider="nobody", gpus=("l40s", "a10g"))
    [hosted] = report.self_hosted  # the A10G can be neither rented from nobody nor bought
    # $8,500 / 36 = $236.11 for the card, $14.76 of spares, a PCIe server $10,424 / 36 = $289.56, and 350 W + 800 W:
    # 1.15 kW x 1.5 x 730 h x $0.13 = $163.70 of power and 1.15 x $184.06 = $211.67 of colocation
    assert hosted.rent_usd is None and hosted.lines("rent") == [] and hosted.own_usd == pytest.approx(915.80, abs=0.01)
    assert report.verdict.startswith("Owning 1 x l40s costs $916/month") and "Renting" not in report.verdict
    assert [b.way for b in report.managed[0].break_even] == ["own"]
    page = report_html(replace(report, warnings=["Prices <old>"]).to_json())
    assert "<tr><td>1 x l40s</td><td>-</td><td>-</td><td>$916</td><td>estimated</td></tr>" in page
    assert "<p>Prices &lt;old&gt;</p>" in page


def test_with_no_offer_to_compare_each_way_gets_its_cost() -> None:
    report, _ = _costed([])
    assert report.verdict == "Renting 1 x l40s costs $635/month. Owning 2 x t4 (tp 2) costs $685/month."


def test_several_replicas_are_priced_one_by_one() -> None:
    report, _ = _costed(["gpt-4o-mini"], TargetLoad(40.0, 512, 256), gpus=("l40s",))
    [hosted] = report.self_hosted
    replicas = hosted.option.replicas
    one = hosted.gpus_usd("rent", 1)
    assert replicas > 1 and one == pytest.approx(hosted.rent_usd / replicas)  # type: ignore[operator]
    # at half the utilization the same volume needs twice the replicas' capacity
    volume = monthly_tokens_capacity(hosted, report.load) * 3
    assert self_host_cost_at(hosted, "rent", report.load, volume, 0.5) == pytest.approx(6 * one)  # type: ignore[operator]


def test_a_calibrated_option_says_so_in_the_cost_report() -> None:
    cal = calibration_at(SMOL, CPU, 1, 4, 64, 32, 0.070, 1.3, "run.json")
    w = TargetLoad(0.2, 64, 32, tuple(parse_slos("tpot_p95=200ms")))
    sizing = size(
        "smollm2-135m",
        SMOL,
        w,
        [gpu("l4"), replace(CPU, name="l40s")],
        PRICES,
        calibration=replace(cal, hardware="l40s"),
    )
    report = compare(sizing, PRICES, [], 1.0, w)
    sources = {row["hardware"]: row["source"] for row in report.to_json()["self_hosted"]}  # type: ignore[index, union-attr]
    assert sources == {"l4": "estimated", "l40s": "calibrated"}
    assert "<td>calibrated</td>" in report_html(report.to_json())


@pytest.mark.parametrize("power_w", [0.0, 1.0])
def test_owning_needs_a_purchase_price_and_a_power_draw(power_w: float) -> None:
    w = TargetLoad(1.0, 512, 256, ())
    l4 = size_option(LLAMA8, replace(gpu("l4"), power_w=power_w), 1, w, 0.8, None)
    assert isinstance(l4, Option)
    assert (owning(PRICES, l4) is None) is (power_w == 0)
    a10g = size_option(LLAMA8, gpu("a10g"), 1, w, 0.8, None)
    assert isinstance(a10g, Option) and owning(PRICES, a10g) is None  # nobody sells it in the data
    sxm = size_option(LLAMA8, gpu("h100-sxm"), 1, w, 0.8, None)
    assert isinstance(sxm, Option) and owning(PRICES, sxm).server == "baseboard"  # type: ignore[union-attr]
    no_hosting = replace(PRICES, hosting=None)
    with pytest.raises(UsageError, match="no \\[power\\] or \\[hosting\\] table"):
        owning(no_hosting, sxm)


@pytest.mark.parametrize(
    ("n", "text"), [(1e12, "1 T"), (1e9, "1 B"), (1e6, "1 M"), (1e3, "1 k"), (999.0, "999"), (2.5e9, "2.5 B")]
)
def test_token_volumes_in_words(n: float, text: str) -> None:
    assert tokens_text(n) == text


def test_a_blended_price_per_token_by_hand() -> None:
    # gpt-4o-mini: $0.15 in, $0.60 out per M; 512 in and 256 out: (76.8 + 153.6) / 768 = $0.30 per M
    assert blended_price_per_token(PRICES.find("gpt-4o-mini"), TargetLoad(1.0, 512, 256)) == pytest.approx(
        0.3e-6, rel=1e-9
    )


@pytest.mark.parametrize(("utilization", "ok"), [(0.0, False), (1.0, True), (1.5, False)])
def test_the_utilization_bounds_of_cost(utilization: float, ok: bool) -> None:
    load = TargetLoad(1.0, 512, 256)
    sizing = size("llama-3.1-8b-instruct", LLAMA8, load, [gpu("l40s")], PRICES)
    message = rf"--utilization {utilization} is not in \(0, 1\]\."
    for run in (
        lambda: cost_model("llama-3.1-8b-instruct", LLAMA8, load, PRICES, [], utilization, hardware=["l40s"]),
        lambda: compare(sizing, PRICES, [], utilization, load),
    ):
        if ok:
            run()
        else:
            with pytest.raises(UsageError, match=message) as refused:
                run()
            assert refused.value.hint == "For example --utilization 0.5."


def test_cost_model_is_size_model_at_the_peak_then_compare(engine_here: str) -> None:
    load = TargetLoad(1.0, 512, 256, tuple(parse_slos("tpot_p95=60ms")))
    later = TODAY.replace(year=TODAY.year + 3)
    report, offers = cost_model(
        "llama-3.1-8b-instruct", LLAMA8, load, PRICES, ["gpt-4o-mini"], 0.25, hardware=["l40s", "a100-80gb"],
        provider="hyperscaler", today=later,
    )  # fmt: skip
    peak = size_model(
        "llama-3.1-8b-instruct", LLAMA8, replace(load, rps=4.0), PRICES, hardware=["l40s", "a100-80gb"],
        provider="hyperscaler", max_utilization=1.0, today=later,
    )  # fmt: skip
    # by default: two replicas at least, the data's operations hours at its rate, and its rental extras
    ops, extras = PRICES.operations, PRICES.rental_extras
    assert ops is not None and extras is not None
    overheads = Overheads(2, ops.hours_per_month, ops.usd_per_hour, extras.share)
    by_hand = compare(peak, PRICES, offers, 0.25, load, overheads)
    assert report.self_hosted == by_hand.self_hosted and report.managed == by_hand.managed
    assert report.model == "llama-3.1-8b-instruct" and report.verdict == by_hand.verdict
    assert report.overheads == overheads == Overheads(2, 8.0, 43.52, 0.3)
    [stale] = report.warnings
    assert stale.startswith("8 prices used are older than 90 days (the oldest: operations of 2022-05-31);")
    named = {p["price"] for p in report.stale_prices}
    assert {
        "power",
        "hosting",
        "gpt-4o-mini (openai)",
        "a100-80gb (hyperscaler)",
        "operations",
        "rental extras",
    } <= named
    assert len(named) == 8


def test_the_overheads_come_from_the_flags_and_the_data_and_are_checked() -> None:
    later = TODAY.replace(year=TODAY.year + 3)  # every price is old: the stale list shows which were used
    load, mini = TargetLoad(0.5, 512, 256), ["gpt-4o-mini"]

    def costed(prices: Prices = PRICES, **overheads: object) -> CostReport:
        report, _ = cost_model("llama-3.1-8b-instruct", LLAMA8, load, prices, mini, 1.0, hardware=["l40s"],
                               today=later, **overheads)  # type: ignore[arg-type]  # fmt: skip
        return report

    lean = costed(min_replicas=1, ops_hours=0)  # the least either flag allows
    assert lean.overheads == Overheads(1, 0.0, 43.52, 0.3) and lean.basis == ""
    assert lean.to_json()["default_offers"] is None  # the offers were named
    names = {p["price"] for p in lean.stale_prices}
    assert "operations" not in names and "rental extras" in names  # no operations line: its rate unused
    # the data without [operations] and [rental_extras], or with a share of 0: those lines are gone
    bare = load_prices()
    bare.operations, bare.rental_extras = None, None
    assert costed(bare, min_replicas=3).overheads == Overheads(3, 0.0, 0.0, 0.0)
    bare.rental_extras = RentalExtras(share=0, as_of=TODAY, source="t", confidence="user")
    assert "rental extras" not in {p["price"] for p in costed(bare).stale_prices}
    [hosted] = costed(min_replicas=3, ops_hours=0).self_hosted  # one replica carries the load
    assert hosted.lines("own")[1].item == "2 more replicas for availability (at least 3 replicas)"
    for flags, message, hint in (
        ({"min_replicas": 0}, "--min-replicas 0 is below 1.", "Use 2 to survive a replica's failure, or 1."),
        ({"ops_hours": -1.0}, "--ops-hours-per-month -1 is negative.", "Use 0 to leave operations out."),
    ):
        with pytest.raises(UsageError) as refused:
            costed(**flags)
        assert (refused.value.message, refused.value.hint) == (message, hint)


def test_a_break_even_past_the_sized_replicas_counts_the_replicas_it_needs() -> None:
    """The A100 case of test_sizing.py against $0.10 per M tokens, with $5,000 of operations a month: one
    replica ($949) pays at (949 n + 5,000) / 0.1e-6 tokens, which n fully busy replicas (25.2 B tokens each)
    carry from n = 4: 88.0 B tokens a month, the four 87% busy."""
    w = TargetLoad(0.5, 512, 256)
    sizing = size("llama-3.1-8b-instruct", LLAMA8, w, [gpu("a100-80gb")], PRICES, max_utilization=1.0)
    cheap = ServicePrice(
        name="cheap", provider="acme", input_per_mtok=0.1, output_per_mtok=0.1, as_of=TODAY, source="t",
        confidence="user",
    )  # fmt: skip
    report = compare(sizing, PRICES, [cheap], 1.0, w, Overheads(ops_hours=100, ops_usd_per_hour=50))
    rent, _ = report.managed[0].break_even
    [hosted] = report.self_hosted
    capacity = monthly_tokens_capacity(hosted, w)
    assert hosted.option.replicas == 1 and rent.replicas == 4
    assert rent.tokens == pytest.approx((4 * 949 + 5000) / 0.1e-6)
    assert rent.utilization == pytest.approx(rent.tokens / (4 * capacity))  # type: ignore[operator]
    assert 3 * capacity < rent.tokens <= 4 * capacity  # type: ignore[operator]


def test_with_no_offer_named_cost_picks_the_same_model_managed_and_the_nearest_general_api() -> None:
    names, why = default_offers("llama-3.1-8b-instruct", LLAMA8, PRICES)
    same = ["llama-3.1-8b@azure", "llama-3.1-8b@bedrock", "llama-3.1-8b@fireworks", "llama-3.1-8b@groq"]
    assert names == [*same, "llama-3.1-8b@together", "gpt-4o-mini"]
    assert why == (
        f"No --compare given. Compared with {', '.join(same)}, llama-3.1-8b@together: the same model, managed; "
        "gpt-4o-mini: the general-purpose API deploykit weighs a model of 8.03 B parameters against (under 30 B: "
        "OpenAI's small model)."
    )
    big = replace(LLAMA8, params=SMALL_API_BELOW_PARAMS)
    assert default_offers("acme-30b-chat", big, PRICES) == (
        ["gpt-4o"],
        "No --compare given. Compared with no managed offer of acme-30b-chat in the price data; gpt-4o: the "
        "general-purpose API deploykit weighs a model of 30 B parameters against (30 B or more: OpenAI's flagship).",
    )
    report, offers = cost_model("smollm2-135m", SMOL, TargetLoad(0.2, 64, 32), PRICES, [], 0.5, hardware=["l4"])
    assert [o.name for o in offers] == ["gpt-4o-mini"] and report.basis.startswith("No --compare given.")
    assert report.to_json()["default_offers"] == report.basis and "gpt-4o-mini" in report.verdict


def test_nothing_priced_and_no_power_table() -> None:
    w = TargetLoad(0.5, 512, 256)
    sizing = size("llama-3.1-8b-instruct", LLAMA8, w, [gpu("a10g")], PRICES, provider="nobody")
    report = compare(sizing, PRICES, [PRICES.offer("gpt-4o-mini")], 1.0, w)
    assert report.self_hosted == [] and report.managed[0].break_even == ()
    assert report.verdict == "No priced hardware can serve this load; self-hosting cannot be compared."
    without = load_prices()
    without.power = None
    bought = size("llama-3.1-8b-instruct", LLAMA8, w, [gpu("l40s")], PRICES)  # a GPU the data sells
    with pytest.raises(UsageError) as refused:
        compare(bought, without, [], 1.0, w)
    assert (refused.value.message, refused.value.hint) == (
        "The price data has no [power] or [hosting] table.",
        "Restore the shipped prices.toml.",
    )


@pytest.mark.parametrize(
    ("slo", "reason"),
    [
        ("ttft_p95=1ms", "misses the SLO even with one request in flight: ttft "),
        ("e2e_p95=10ms", "misses the SLO even with one request in flight: e2e "),
        ("tpot_p95=1ms", "misses the SLO even with one request in flight: tpot "),
    ],
)
def test_an_option_missing_each_slo_names_the_metric(slo: str, reason: str) -> None:
    refused = size_option(LLAMA8, gpu("l4"), 1, TargetLoad(1.0, 512, 256, tuple(parse_slos(slo))), 0.8, None)
    assert isinstance(refused, Infeasible) and refused.reason.startswith(reason)
    assert refused.reason.endswith(f"(+25%) > {slo.split('=')[1].replace('ms', ' ms')}")


def test_the_load_refusal_in_full() -> None:
    with pytest.raises(UsageError) as refused:
        size("smollm2-135m", SMOL, TargetLoad(0.0, 1, 1), [gpu("l4")], PRICES)
    assert refused.value.message == "The load needs a positive rate and at least one input and one output token."


def test_the_cost_chart_is_readable() -> None:
    """What `cost --plot` draws: a legend naming every line, managed offers dashed and self-hosting as steps,
    axes with their units, a grid, the report's volume marked, at 880 x 550 pixels."""
    report, offers = _costed(["llama-3.1-8b@together"])
    figure = cost_figure(report.to_json())
    [ax] = figure.axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["rent 1 x l40s (whole replicas)", "own 2 x t4 (tp 2) (whole replicas)", "llama-3.1-8b@together"]
    rent, own, together, marker = ax.get_lines()
    assert (rent.get_drawstyle(), own.get_drawstyle(), together.get_linestyle()) == ("steps-post", "steps-post", "--")
    assert list(together.get_xdata()) == plot_series(report, offers)[2].tokens
    assert list(marker.get_xdata()) == [report.tokens_per_month] * 2 and marker.get_color() == "grey"
    assert ax.get_xlabel() == "tokens per month (prompt + completion)" and ax.get_ylabel() == "USD per month"
    assert ax.get_title() == "llama-3.1-8b-instruct: 512 in / 256 out per request, utilization 100%"
    assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
    assert all(line.get_visible() for line in ax.get_xgridlines())
    png = plot_png(report.to_json())
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (int.from_bytes(png[16:20]), int.from_bytes(png[20:24])) == (880, 550)


def test_a_cost_report_keeps_the_sizing_s_warnings_and_one_price_line(tmp_path: Path, engine_here: str) -> None:
    path = _report(tmp_path, "l4", engine_version=engine_here)  # measured at 64/32 tokens
    later = TODAY.replace(year=TODAY.year + 3)
    report, _ = cost_model(
        "smollm2-135m", SMOL, TargetLoad(1.0, 256, 32), PRICES, ["gpt-4o-mini"], 0.5, hardware=["l4"],
        from_loadtest=path, measured_on="l4", today=later,
    )  # fmt: skip
    lengths, *_, prices = report.warnings
    assert lengths.startswith("The load test ran 64/32 tokens in/out, this load 256/32")
    assert re.match(r"\d+ prices used are older than 90 days \(the oldest: ", prices)
    named = [p["price"] for p in report.stale_prices]  # --json lists each
    assert {"gpt-4o-mini (openai)", "power", "l4 (purchase)"} <= set(named)  # the purchase price owning uses
    assert prices.startswith(f"{len(named)} prices") and report.to_json()["stale_prices"] == report.stale_prices
    assert sum("older than 90 days" in w for w in report.warnings) == 1
