"""Hardware detection: nvidia-smi's CSV, and this machine's CPU and RAM."""

from __future__ import annotations

from deploykit.serve.hardware import detect_hardware, parse_nvidia_smi


def test_parse_nvidia_smi_csv() -> None:
    out = "0, NVIDIA H100 80GB HBM3, 81559, 81000, 9.0\n1, Tesla T4, 15360, 15000, [N/A]\n"
    h100, t4 = parse_nvidia_smi(out)
    assert (h100.index, h100.name, h100.memory_bytes) == (0, "NVIDIA H100 80GB HBM3", 81559 * 1024**2)
    assert h100.supports_bfloat16
    assert t4.compute_capability == 0.0 and not t4.supports_bfloat16


def test_parse_nvidia_smi_nothing() -> None:
    assert parse_nvidia_smi("") == []


def test_this_machine() -> None:
    hw = detect_hardware()
    assert hw.cpu_cores >= 1
    assert 0 < hw.ram_available_bytes <= hw.ram_total_bytes


def test_cpu_engines_get_cores_of_their_own_where_there_are_enough() -> None:
    from deploykit.serve.hardware import Hardware

    eight = Hardware(cpu_ids=tuple(range(8)), ram_total_bytes=64 << 30, ram_available_bytes=60 << 30)
    assert [s.cpu_ids for s in eight.split(3)] == [(0, 1, 7), (2, 3, 7), (4, 5, 7)]  # core 6 idle, 7 the gateway's
    assert {s.ram_available_bytes for s in eight.split(3)} == {20 << 30}
    two = Hardware(cpu_ids=(0, 1), ram_total_bytes=24 << 30, ram_available_bytes=22 << 30)
    assert [s.cpu_ids for s in two.split(2)] == [(0, 1), (0, 1)]  # no core to spare: the plan binds core 0 each
    assert all(s.shares_cores for s in two.split(2)) and not any(s.shares_cores for s in eight.split(3))
    assert two.split(1) == [two]
