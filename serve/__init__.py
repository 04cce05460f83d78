"""Serving: hardware detection, the engine launch plan, the engine process, and the gateway."""

from deploykit.serve.hardware import Gpu, Hardware, detect_hardware
from deploykit.serve.plan import Choice, LaunchPlan, plan_launch
from deploykit.serve.runner import ServeOptions, prepare, run

__all__ = [
    "Choice",
    "Gpu",
    "Hardware",
    "LaunchPlan",
    "ServeOptions",
    "detect_hardware",
    "plan_launch",
    "prepare",
    "run",
]
