"""`deploykit report FILE --html OUT`: any page the kit writes, rebuilt from the JSON it was drawn from."""

from __future__ import annotations

from pathlib import Path

import typer

from deploykit.cli.console import err
from deploykit.core.errors import UsageError


def report(
    source: Path = typer.Argument(
        ..., help="A report: `deploykit loadtest run --out` (a run, a sweep or a search), or `deploykit cost --json`."
    ),
    html_path: Path = typer.Option(..., "--html", help="Where to write the page."),
) -> None:
    """Rebuild the HTML page of a load test, a sweep, a search or a cost comparison from its JSON (the JSON
    is the source of truth; the page is drawn from it alone).

    Examples:

      deploykit report run.json --html run.html

      deploykit cost llama-3.1-8b-instruct --rps 2 --json > cost.json && deploykit report cost.json --html cost.html
    """
    from deploykit.core.html import read_report, write_page
    from deploykit.loadtests.html import report_page
    from deploykit.sizing.cost import report_html

    data, written = read_report(source)
    page = report_html(data) if "self_hosted" in data and "verdict" in data else report_page(data, written)
    if page is None:
        raise UsageError(
            f"{source} is not a report deploykit writes.",
            "Pass a JSON file written by `deploykit loadtest run --out` or `deploykit cost --json`.",
        )
    write_page(html_path, page)
    err.print(f"HTML report: {html_path}", markup=False)
