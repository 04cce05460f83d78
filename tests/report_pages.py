"""Every kind of HTML page the kit writes, made by the CLI from real runs, and looked at in a real browser.

`make_pages` runs `deploykit loadtest` against the synthetic SSE server (tests/fakes/sse_server.py: a known
schedule, and a model with 4 slots that saturates) for a run, a sweep, a find-max search and a comparison,
and `deploykit cost` for a cost page. `look` opens a page in headless Chromium (Debian's, driven by
Playwright) and reports what a person would get: console errors, every request the page made, its text,
the tick labels of its charts, and a screenshot.

    python -m tests.report_pages docs/reports    # the screenshots in docs/reports, regenerated
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KINDS = ("run", "sweep", "search", "compare", "cost")
CHROMIUM = "chromium"  # Debian's package; `make test` installs it


@contextmanager
def synthetic_server() -> Iterator[str]:
    """The synthetic SSE server in a process of its own; its URL."""
    server = subprocess.Popen(  # its tracebacks of clients that left at the end of a run are not news
        [sys.executable, "-m", "tests.fakes.sse_server"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert server.stdout is not None
        yield f"http://127.0.0.1:{int(server.stdout.readline())}"
    finally:
        server.terminate()
        server.wait()


def deploykit(*args: str, cwd: Path | None = None) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploykit", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    if result.returncode:
        raise RuntimeError(f"deploykit {' '.join(args)} failed ({result.returncode}): {result.stderr}")


def make_pages(folder: Path, url: str) -> dict[str, Path]:
    """Each kind of page (KINDS), with the JSON it was made from beside it, written by the CLI into `folder`."""
    run = ("loadtest", "run", url, "--output-tokens", "20", "--hardware", "cpu")
    deploykit(*run, "--model", "synth", "-c", "4", "--duration", "4", "--out", str(folder / "run.json"),
              "--html", str(folder / "run.html"))  # fmt: skip
    deploykit(*run, "--model", "queue", "-c", "1", "--sweep", "1,2,4,8,16", "--duration", "2.5",
              "--out", str(folder / "sweep.json"), "--html", str(folder / "sweep.html"))  # fmt: skip
    deploykit(*run, "--model", "queue", "-c", "1", "--find-max", "--slo", "ttft_p95=150ms", "--duration", "2.5",
              "--out", str(folder / "search.json"), "--html", str(folder / "search.html"))  # fmt: skip
    deploykit("loadtest", "compare", "sweep-c1.json", "sweep-c8.json", "--html", "compare.html", cwd=folder)
    deploykit("cost", "llama-3.1-8b-instruct", "--tokens-per-day", "5e7", "--gpus", "l40s,h100-sxm",
              "--compare", "llama-3.1-8b@together,gpt-4o-mini", "--html", str(folder / "cost.html"))  # fmt: skip
    return {kind: folder / f"{kind}.html" for kind in KINDS}


@dataclass(frozen=True)
class Look:
    """A page as the browser showed it."""

    console_errors: list[str]
    requests: list[str]  # every URL the page asked for, itself included
    text: str  # what a reader sees (innerText)
    tick_labels: list[int]  # per chart: how many axis tick labels carry text
    hovers: list[int]  # per chart: how many of its points and bars name their values on hover
    screenshot: Path


def chromium() -> str | None:
    return shutil.which(CHROMIUM)


def look(page: Path, screenshot: Path, width: int = 1100) -> Look:
    """Open `page` in headless Chromium, wait for it to load, and take a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    if executable is None:
        raise RuntimeError("Chromium is not installed: `make test` installs Debian's chromium package.")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            tab = browser.new_page(viewport={"width": width, "height": 800})
            errors: list[str] = []
            requests: list[str] = []
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.on("request", lambda r: requests.append(r.url))
            tab.goto(page.resolve().as_uri(), wait_until="load")
            ticks = tab.eval_on_selector_all(
                "svg",
                "charts => charts.map(c => [...c.querySelectorAll('g[id^=xtick_] text, g[id^=ytick_] text')]"
                ".filter(t => t.textContent.trim()).length)",
            )
            hovers = tab.eval_on_selector_all("svg", "charts => charts.map(c => c.querySelectorAll('title').length)")
            text = tab.inner_text("body")
            tab.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return Look(errors, requests, text, ticks, hovers, screenshot)


def main(folder: Path) -> None:
    """Make every page from fresh runs and keep a screenshot of each in `folder` (docs/reports)."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, synthetic_server() as url:
        for kind, page in make_pages(Path(tmp), url).items():
            seen = look(page, folder / f"{kind}.png")
            if seen.console_errors or len(seen.requests) != 1:
                raise SystemExit(f"{kind}: console errors {seen.console_errors}, requests {seen.requests}")
            print(f"{seen.screenshot}: {len(seen.tick_labels)} charts")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/reports"))
