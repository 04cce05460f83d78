"""The load generator's own process: `python -m deploykit.loadtests CONFIG_JSON OUT_JSON [OUT_CSV]`.

locust monkey-patches the process for gevent, which must happen before ssl, requests or urllib3 are
imported; `deploykit loadtest` therefore runs the load here, in a process of its own, never in the
CLI's (which has imported them) nor in the gateway's.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402

from deploykit.loadtests.config import LoadTestConfig  # noqa: E402
from deploykit.loadtests.runner import Progress as RunProgress  # noqa: E402
from deploykit.loadtests.runner import run_load  # noqa: E402


def main() -> None:
    config = LoadTestConfig.model_validate_json(sys.argv[1])
    out, csv = Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        auto_refresh=False,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=config.duration_s)

        def show(p: RunProgress) -> None:
            bar.update(task, completed=p.elapsed_s, description=f"{p.done} done, {p.errors} errors")
            bar.refresh()

        report = run_load(config, show)
    report.write(out, csv)


if __name__ == "__main__":
    main()
