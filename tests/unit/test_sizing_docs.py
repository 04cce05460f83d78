"""docs/SIZING.md's table of the shipped data counts the entries of the files, by confidence."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from deploykit.models.prices import Sourced, load_prices

SIZING_MD = Path(__file__).resolve().parents[2] / "docs" / "SIZING.md"


def test_the_data_table_counts_what_the_files_hold() -> None:
    prices = load_prices()
    kinds: dict[str, list[Sourced]] = {
        "GPUs": list(prices.gpus.values()),
        "GPU prices": list(prices.gpu_prices.values()),
        "managed pay-as-you-go prices": list(prices.services.values()),
        "provisioned offer": list(prices.provisioned.values()),
        "operations rate": [prices.operations] if prices.operations else [],
        "hosting": [prices.hosting] if prices.hosting else [],
        "rental extras share": [prices.rental_extras] if prices.rental_extras else [],
        "published measurements": list(prices.measurements),
    }
    row = re.compile(rf"\| (\d+) ({'|'.join(kinds)})\b")
    rows = {}
    for line in SIZING_MD.read_text().splitlines():
        if m := row.match(line):
            official, third, derived = (int(cell.split()[0]) for cell in line.strip("|").split("|")[1:4])
            rows[m.group(2)] = (int(m.group(1)), official, third, derived)
    assert set(rows) == set(kinds)
    for kind, entries in kinds.items():
        by = Counter(e.confidence for e in entries)
        assert rows[kind] == (len(entries), by["official"], by["third_party"], by["derived"]), kind
