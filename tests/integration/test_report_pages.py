"""Every kind of page the kit writes, made by the CLI from real runs against the synthetic server and opened
in headless Chromium: no console errors, no request but the page itself, the JSON's figures on screen,
charts with tick labels and values on hover, and a screenshot that is not blank."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image

from deploykit.loadtests.curve import knee_load
from tests.report_pages import KINDS, Look, chromium, look, make_pages, synthetic_server


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    if chromium() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: `make test` installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    folder = tmp_path_factory.mktemp("pages")
    with synthetic_server() as url:
        yield make_pages(folder, url)


def seen(pages: dict[str, Path], kind: str) -> Look:
    return look(pages[kind], pages[kind].with_suffix(".png"))


@pytest.mark.parametrize("kind", KINDS)
def test_the_page_shows_in_a_browser_with_no_errors_and_no_network(pages: dict[str, Path], kind: str) -> None:
    view = seen(pages, kind)
    assert view.console_errors == []
    assert view.requests == [pages[kind].resolve().as_uri()]  # nothing fetched: it opens air-gapped
    assert view.tick_labels and all(n >= 6 for n in view.tick_labels)  # both axes of every chart labelled
    assert all(n >= 2 for n in view.hovers)  # every chart names its values on hover
    picture = image.imread(view.screenshot)
    assert picture.shape[0] > 800 and picture.shape[1] == 1100
    assert float(np.std(picture[..., :3])) > 0.05  # not a blank page


def test_a_run_page_shows_the_runs_figures(pages: dict[str, Path]) -> None:
    report = json.loads(pages["run"].with_suffix(".json").read_text())
    s = report["summary"]
    text = seen(pages, "run").text
    for name in ("ttft", "itl", "tpot", "e2e"):
        assert f"{s[name]['p50'] * 1000:.1f}" in text and f"{s[name]['p99'] * 1000:.1f}" in text
    assert f"{s['rps']:.2f} req/s, {s['output_tokens_per_s']:.1f} output tokens/s" in text
    assert "hardware\tcpu" in text and "4 streams" in text


def test_sweep_and_search_pages_show_every_level_and_the_knee(pages: dict[str, Path]) -> None:
    sweep = json.loads(pages["sweep"].with_suffix(".json").read_text())
    text = seen(pages, "sweep").text
    assert knee_load(sweep) == 4  # the server has 4 slots
    assert "Knee at 4 streams" in text and "sweep: 1, 2, 4, 8, 16 streams" in text
    for run in sweep["runs"]:
        assert f"{run['summary']['output_tokens_per_s']:.1f}" in text
    search = json.loads(pages["search"].with_suffix(".json").read_text())
    text = seen(pages, "search").text
    assert f"Highest load that met every SLO: {search['best']:g} streams" in text
    tried = sorted(search["runs"], key=lambda r: r["tried"])
    rows = [line.split("\t")[:2] for line in text.splitlines() if line[:1].isdigit() and "\t" in line]
    assert [[str(r["tried"]), f"{r['load']:g}"] for r in tried] == rows  # in the order tried


def test_compare_and_cost_pages_show_their_figures(pages: dict[str, Path]) -> None:
    text = seen(pages, "compare").text
    one, eight = (json.loads((pages["compare"].parent / f"sweep-c{n}.json").read_text()) for n in (1, 8))
    ratio = eight["summary"]["output_tokens_per_s"] / one["summary"]["output_tokens_per_s"]
    assert "sweep-c1.json" in text and f"{ratio:.2f}" in text
    text = seen(pages, "cost").text
    assert "Self-hosting, per month" in text and "llama-3.1-8b@together" in text and "gpt-4o-mini" in text
