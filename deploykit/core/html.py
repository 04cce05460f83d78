"""The one style of every HTML page the kit writes (load tests, sweeps, comparisons, cost): a title, tables,
then charts drawn by matplotlib as inline SVG with their text kept as text. A page needs no network and no
JavaScript (on-prem and air-gapped users can open it anywhere), and its text can be searched and tested.
A chart's points and bars carry SVG <title>s: the browser shows each one's values on hover, without script."""

from __future__ import annotations

import html
import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from deploykit.core.errors import UsageError

# matplotlib settings for every chart: text as SVG text, readable size, gridlines, ids stable across runs
CHART_STYLE: dict[Any, Any] = {
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.4,
    "svg.hashsalt": "deploykit",
}


def page(title: str, blocks: list[str]) -> str:
    """A whole page: the title, then each block (a table, a paragraph, a chart) in order."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:1em auto}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "td:first-child{text-align:left}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>" + "".join(f"<div>{b}</div>" for b in blocks) + "</body></html>"
    )


def table(rows: list[list[str]], header: bool = False) -> str:
    """A table of text cells, escaped; `header`: the first row names the columns."""

    def row(cells: list[str], tag: str) -> str:
        return "<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>"

    head = row(rows[0], "th") if header else ""
    body = rows[1:] if header else rows
    return "<table>" + head + "".join(row(r, "td") for r in body) + "</table>"


def write_page(path: Path, text: str) -> None:
    """Write a page; a path that cannot be written is the user's to fix, said in one line."""
    try:
        path.write_text(text)
    except OSError as e:
        raise UsageError(f"Cannot write {path}: {e}.", "Choose a writable path for --html.") from e


def read_report(source: Path) -> tuple[dict[str, Any], datetime]:
    """A report's JSON (the source of truth every page is drawn from) and the time it was written."""
    hint = "Pass a JSON file written by `deploykit loadtest run --out` or `deploykit cost --json`."
    try:
        data = json.loads(source.read_text())
        written = datetime.fromtimestamp(source.stat().st_mtime, UTC)
    except (OSError, ValueError) as e:
        raise UsageError(f"Cannot read the report {source}: {e}.", hint) from e
    if not isinstance(data, dict):
        raise UsageError(f"{source} is not a report: its JSON is not an object.", hint)
    return data, written


def paragraph(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def svg(figure: Figure, hovers: dict[str, str] | None = None) -> str:
    """A figure as inline SVG (no XML prologue, no date: the same data draws the same page). `hovers` maps
    the gid of an artist to the text a browser shows when the pointer rests on it."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buffer.getvalue()
    for gid, hover in (hovers or {}).items():
        opening = f'<g id="{gid}">'
        text = text.replace(opening, f"{opening}<title>{html.escape(hover)}</title>", 1)
    return text[text.index("<svg") :]
