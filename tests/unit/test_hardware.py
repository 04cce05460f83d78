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
