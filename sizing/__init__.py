"""Sizing and cost: which hardware serves a model at a target load, and whether that beats paying a managed
API per token. Reads the model's numbers (models/), market data (models/prices.py) and, to calibrate, a
load-test report as a file; never imports the load tester.

    load.py         TargetLoad: the demand (rate, lengths, SLOs)
    hardware.py     Accelerator: GPUs from the data file, this CPU measured; KV capacity
    performance.py  decode, prefill, Little's law; the model checked against published measurements
    calibration.py  a load test's report -> what the model leaves out on that hardware
    ranking.py      every hardware option that meets the load, ranked by price (size_model)
    cost.py         self-hosted (rented, owned) against managed offers, break-even (cost_model)
"""

from deploykit.sizing.cost import CostReport, cost_model
from deploykit.sizing.load import TargetLoad
from deploykit.sizing.ranking import Sizing, size_model

__all__ = ["CostReport", "Sizing", "TargetLoad", "cost_model", "size_model"]
