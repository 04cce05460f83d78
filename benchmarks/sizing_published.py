"""The sizing model against the published measurements in models/gpus.toml: predicted, published, error.

    .venv/bin/python -m benchmarks.sizing_published

A row counts as reproduced when the prediction is within the analytic model's stated band (25%). Rows the
efficiency factors were fitted on are marked and counted apart: they check the fit, not the model. Where
a source does not state the prompt and answer lengths, 128 and 128 are assumed and a batch-1 tokens/s is
read as the decode rate. The output is the table in docs/SIZING.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploykit.models.catalog import load_catalog
from deploykit.models.prices import load_prices
from deploykit.sizing.hardware import Accelerator
from deploykit.sizing.performance import predict_measurement
from deploykit.sizing.ranking import ANALYTIC_BAND


def rows() -> list[tuple[str, str, int, str, float, float, float, str, bool]]:
    prices = load_prices()
    catalog = load_catalog()
    assert prices.efficiency is not None
    out = []
    for m in prices.measurements:
        dev = Accelerator.from_spec(prices.gpu(m.gpu), prices.efficiency)
        predicted = predict_measurement(catalog.get(m.model).config(), dev, m)
        lengths = f"{m.input_tokens}/{m.output_tokens}" if m.input_tokens else "not stated"
        error = predicted / m.value - 1
        out.append((m.gpu, m.model, m.concurrency, lengths, m.value, predicted, error, m.metric, m.fitted))
    return out


def main() -> None:
    table = rows()
    print("| GPU | model | streams | in/out tokens | metric | published | predicted | error | reproduced |")
    print("|---|---|---|---|---|---|---|---|---|")
    for gpu, model, c, lengths, value, predicted, error, metric, fitted in table:
        ok = "fitted" if fitted else "yes" if abs(error) <= ANALYTIC_BAND else "no"
        print(f"| {gpu} | {model} | {c} | {lengths} | {metric} | {value:g} | {predicted:.3g} | {error:+.0%} | {ok} |")
    independent = [r for r in table if not r[8]]
    hits = sum(abs(r[6]) <= ANALYTIC_BAND for r in independent)
    print(
        f"\n{hits} of {len(independent)} independent published measurements reproduced within "
        f"±{ANALYTIC_BAND:.0%}; {len(table) - len(independent)} more set the efficiency factors."
    )


if __name__ == "__main__":
    main()
