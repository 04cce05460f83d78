"""The load generator's own process: `python -m deploykit.loadtests CONFIG_JSON OUT_JSON [OUT_CSV]` (CONFIG_JSON `-`:
on standard input, which keeps an API key off the command line), or one of
its locust workers: `python -m deploykit.loadtests --worker MASTER_HOST MASTER_PORT` (the config comes from the
master, the API key from OPENAI_API_KEY).

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

from deploykit.core.errors import DeploykitError  # noqa: E402
from deploykit.core.quiet import quiet_gc  # noqa: E402
from deploykit.loadtests.config import LoadTestConfig  # noqa: E402
from deploykit.loadtests.distributed import run_distributed, serve_worker  # noqa: E402
from deploykit.loadtests.runner import Progress as RunProgress  # noqa: E402
from deploykit.loadtests.runner import run_load  # noqa: E402


def main() -> None:
    quiet_gc()  # a collector pause stalls every stream's timestamps at once
    if sys.argv[1] == "--worker":
        serve_worker(sys.argv[2], int(sys.argv[3]))
        return
    config = LoadTestConfig.model_validate_json(sys.stdin.read() if sys.argv[1] == "-" else sys.argv[1])
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

        try:
            distributed = config.processes > 1 or config.master_port is not None
            report = run_distributed(config, show) if distributed else run_load(config, show)
        except DeploykitError as e:
            bar.stop()
            _print_error(e)
            sys.exit(e.exit_code)
    report.write(out, csv)


def _print_error(e: DeploykitError) -> None:
    """The load generator's own process reports its failure as the CLI would (it does not import the CLI)."""
    for line in e.details:
        print(f"  {line}", file=sys.stderr)
    print(f"Error: {e.message}", file=sys.stderr)
    if e.hint:
        print(f"Hint: {e.hint}", file=sys.stderr)


if __name__ == "__main__":
    main()
