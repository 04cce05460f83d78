"""`deploykit serve`: start the vLLM engine for a model and serve the OpenAI-compatible gateway in front."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import typer
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from deploykit.cli.console import err, out, print_json
from deploykit.cli.options import DEFAULT_MODEL, HostOpt, JsonOpt, LockedOpt, LockFileOpt, PortOpt
from deploykit.core.errors import UsageError
from deploykit.core.settings import Settings
from deploykit.models.catalog import load_catalog
from deploykit.models.hub import pull
from deploykit.models.lock import Lock, check_models
from deploykit.models.prices import load_prices
from deploykit.models.resolve import resolve
from deploykit.models.store import ModelStore
from deploykit.serve.accounting.budgets import parse_price
from deploykit.serve.engine import EngineProgress
from deploykit.serve.gateway.server import ConnectionLimits
from deploykit.serve.gateway.spill import parse_spill
from deploykit.serve.plan import LaunchPlan, read_adapter
from deploykit.serve.remote import RemoteEngine, parse_engine
from deploykit.serve.runner import (
    ServeOptions,
    ServeReporter,
    prepare,
    require_served,
    run,
    run_remote,
    with_database,
)
from deploykit.serve.supervisor import Ready


def serve(
    ctx: typer.Context,
    models: list[str] = typer.Argument(
        None, help=f"Model aliases from `deploykit models list` (default: {DEFAULT_MODEL}).", show_default=False
    ),
    replicas: int = typer.Option(1, help="Engine processes per model (one GPU group each on GPU machines)."),
    lora_on_demand: bool = typer.Option(
        False,
        "--lora-on-demand",
        help="Start the first model's engines ready for LoRA adapters registered while they run (`deploykit lora "
        "add`); the engines of a model with adapters registered already are started so anyway.",
    ),
    lora: list[str] = typer.Option(
        [], help="NAME=PATH: a LoRA adapter (a peft directory) for the first model, served as model NAME."
    ),
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    engine_port: int = typer.Option(0, help="Loopback port for the engine (0: pick a free one)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the launch plan and why, start nothing."),
    start_timeout: float = typer.Option(900, help="Seconds the engine may take to become ready."),
    drain_timeout: float = typer.Option(30, help="Seconds in-flight requests get to finish on shutdown."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Pull the model first without asking, if it is missing."),
    auth: bool | None = typer.Option(
        None, "--auth/--no-auth", help="Require API keys (default: only when listening beyond loopback)."
    ),
    max_body: int = typer.Option(
        4 * 1024 * 1024, help="Largest request body in bytes (413 above).", rich_help_panel="Limits"
    ),
    max_tokens: int | None = typer.Option(
        None,
        help="Largest max_tokens a request may ask for (400 above); written into requests that set none.",
        rich_help_panel="Limits",
    ),
    max_concurrent_streams: int | None = typer.Option(
        None,
        help="Requests in flight to the engines at once, streamed or not; more wait, and a freed slot goes to "
        "the waiting key with the fewest in flight (default: no cap).",
        rich_help_panel="Limits",
    ),
    queue_timeout: float = typer.Option(
        30, help="Seconds a request may wait under --max-concurrent-streams (503 after).", rich_help_panel="Limits"
    ),
    max_connections: int = typer.Option(
        ConnectionLimits.max_connections, help="Open client connections (503 above).", rich_help_panel="Limits"
    ),
    max_header_bytes: int = typer.Option(
        ConnectionLimits.max_header_bytes, help="Request line and headers (431 above).", rich_help_panel="Limits"
    ),
    header_timeout: float = typer.Option(
        ConnectionLimits.header_timeout_s, help="Seconds to send the headers (408 after).", rich_help_panel="Limits"
    ),
    body_timeout: float = typer.Option(
        ConnectionLimits.body_timeout_s, help="Seconds to send the body (408 after).", rich_help_panel="Limits"
    ),
    idle_timeout: float = typer.Option(
        ConnectionLimits.idle_timeout_s, help="Seconds a kept-alive connection may idle.", rich_help_panel="Limits"
    ),
    spill: list[str] = typer.Option(
        [],
        help="MODEL=REMOTE_MODEL@URL: a managed OpenAI-compatible or Azure OpenAI endpoint that takes MODEL's "
        "requests when no local replica is ready (or past --spill-queue / --spill-ttft). Key in "
        "DEPLOYKIT_SPILL_API_KEY.",
    ),
    spill_queue: int | None = typer.Option(None, help="Spill when ready replicas average this many requests."),
    spill_ttft: float | None = typer.Option(None, help="Spill when the model's recent TTFT exceeds this (s)."),
    token_price: list[str] = typer.Option(
        [],
        help="MODEL=IN/OUT: what a million prompt / completion tokens of MODEL cost on this deployment, in USD "
        "(e.g. `deploykit size`'s $/Mtok). The ledger records each request's cost at it, and keys' spend budgets "
        "(`deploykit keys budget`) are held to it.",
    ),
    routing: str = typer.Option(
        "least-outstanding",
        help="How a model's replicas share requests: least-outstanding (the least busy), or prefix (requests whose "
        "prompts start alike, such as a conversation's turns, go to the replica that has them in KV cache, "
        "within a load bound).",
    ),
    workers: int = typer.Option(
        1,
        min=1,
        max=64,
        help="Gateway processes answering on the one port (one per core the gateway may use); keys' quotas, "
        "the ledger, --max-concurrent-streams and /metrics stay the deployment's.",
    ),
    engine: list[str] = typer.Option(
        [],
        help="NAME=URL: front an engine that runs elsewhere (a container, a pod) instead of starting one; once "
        "per replica. Takes no MODELS.",
    ),
    locked: LockedOpt = False,
    lock_file: LockFileOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Serve MODELS with vLLM behind one gateway on http://HOST:PORT (Ctrl-C or SIGTERM stops all).

    Requests go to the model their `model` field names, and to its least busy ready replica; a replica
    that dies is restarted while the others serve. Arguments after `--` go to every engine and win over
    the plan's own values.

    Examples:

      deploykit serve                              # the default model, smollm2-135m

      deploykit serve smollm2-135m --port 9000

      deploykit serve smollm2-135m --dry-run       # show the engine command and why

      deploykit serve smollm2-135m -- --enforce-eager --max-num-seqs 64

      deploykit serve smollm2-135m all-minilm-l6-v2     # chat and embeddings, one gateway

      deploykit serve llama-3.1-8b-instruct --replicas 4   # 4 engines, balanced, restarted on failure

      deploykit serve smollm2-135m --lora support=./adapters/support   # the adapter answers as "support"

      deploykit serve qwen2.5-7b-instruct --yes    # pull from the hub first

      deploykit serve smollm2-135m --locked        # only the exact files deploykit.lock names

      deploykit serve --host 0.0.0.0               # API keys required (`deploykit keys create`)

      deploykit serve --spill smollm2-135m=gpt-4o-mini@https://api.openai.com/v1 --spill-queue 8

      deploykit serve --engine llama=http://engine-0:8000 --engine llama=http://engine-1:8000   # gateway only

      deploykit serve llama-3.1-8b-instruct --workers 4    # the gateway on 4 cores

      deploykit serve smollm2-135m --token-price smollm2-135m=0.02/0.08   # price requests for budgets
    """
    models, engine_args = _split_engine_args(models or [], [*ctx.args])
    settings = Settings()
    prices = load_prices(settings.home / "prices.toml")
    spills = tuple(
        parse_spill(s, prices, settings.spill_api_key, max_queue=spill_queue, max_ttft_s=spill_ttft) for s in spill
    )
    options = ServeOptions(
        host=host,
        port=port,
        start_timeout_s=start_timeout,
        drain_timeout_s=drain_timeout,
        auth=auth,
        max_body_bytes=max_body,
        max_tokens=max_tokens,
        spills=spills,
        metrics_token=settings.metrics_token,
        limits=ConnectionLimits(max_header_bytes, header_timeout, idle_timeout, max_connections, body_timeout),
        max_concurrent=max_concurrent_streams,
        queue_timeout_s=queue_timeout,
        workers=workers,
        token_prices=dict(parse_price(p) for p in token_price),
        lora_on_demand=lora_on_demand,
        routing=_routing(routing),
    )
    if engine:
        if models or engine_args or lora or lora_on_demand or replicas != 1 or engine_port or locked:
            raise UsageError(
                "--engine fronts engines that run elsewhere: it takes no MODELS, --replicas, --lora, --lora-on-demand, "
                "--engine-port, --locked or engine arguments.",
                "Give each replica its own --engine NAME=URL, and set the engine's flags where it runs (for "
                "registered adapters: VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora).",
            )
        remotes = [parse_engine(e) for e in engine]
        require_served(options, {e.model for e in remotes})
        if dry_run:
            _show_dry_run(lambda: _show_remotes(remotes, json_), options, json_)
            return
        run_remote(settings, remotes, options, ConsoleReporter())
        return
    models = models or [DEFAULT_MODEL]
    if any(m.startswith("-") for m in models):
        raise UsageError("Name the models before `--`.", "For example: deploykit serve smollm2-135m -- --enforce-eager")
    store = ModelStore(settings.models_dir)
    lock = Lock.read(lock_file or settings.lock_path)
    if not dry_run:
        models = [m if store.find(m) is not None else _pull_first(store, m, yes, lock, locked) for m in models]
        if locked:
            with err.status("Checking the models against the lock"):
                check_models([store.get(m) for m in models], lock)
    adapters = [read_adapter(spec) for spec in lora]
    plans = prepare(
        settings, models, replicas=replicas, adapters=adapters, engine_args=engine_args, engine_port=engine_port or None
    )
    require_served(options, {p.served_name for p in plans})
    plans, options = with_database(settings, plans, options)
    if dry_run:
        _show_dry_run(lambda: _show_plans(plans, json_), options, json_)
        return
    run(settings, plans, options, ConsoleReporter())


def _routing(value: str) -> str:
    if value not in ("least-outstanding", "prefix"):
        raise UsageError(f"--routing '{value}' is not one of least-outstanding, prefix.", "E.g. --routing prefix.")
    return value


def _split_engine_args(positional: list[str], extra: list[str]) -> tuple[list[str], list[str]]:
    """MODELS and the engine's arguments: click hands everything after `--` to the MODELS argument, so the
    split is read back from the command line."""
    argv = sys.argv
    if "--" not in argv:
        return positional, extra
    after = argv[argv.index("--") + 1 :]
    if after and positional[-len(after) :] == after:
        return positional[: -len(after)], after + extra
    return positional, extra


def _pull_first(store: ModelStore, model: str, yes: bool, lock: Lock, locked: bool) -> str:
    catalog = load_catalog()
    resolved = resolve(model, store, catalog)  # an unknown name fails here, with close matches
    repo, revision = resolved.hub_repo(), resolved.revision
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(
                f"{model} is not downloaded yet.", f"Pass --yes to pull it first, or `deploykit pull {model}`."
            )
        typer.confirm(f"{model} is not here yet. Download {repo}@{revision} from the hub?", abort=True)
    local = pull(
        model,
        store=store,
        catalog=catalog,
        progress=lambda m: err.print(f"{model}: {m}", highlight=False, markup=False),
        lock=lock,
        locked=locked,
    )
    return local.alias


def _show_plans(plans: list[LaunchPlan], as_json: bool) -> None:
    if as_json:
        data = [{**asdict(plan), "env": dict(plan.env)} for plan in plans]
        print_json(data[0] if len(data) == 1 else data)
        return
    for plan in plans:
        _show_plan(plan)


def _show_dry_run(show_engines: Callable[[], None], options: ServeOptions, as_json: bool) -> None:
    """What `serve --dry-run` prints: the engines, then (for people) the gateway's limits."""
    show_engines()
    if not as_json:
        _show_gateway(options)


def _show_remotes(remotes: list[RemoteEngine], as_json: bool) -> None:
    if as_json:
        print_json([asdict(r) for r in remotes])
        return
    for r in remotes:
        out.print(f"Engine for {r.model}: {r.url} (runs elsewhere; watched through /health)", highlight=False)


def _show_plan(plan: LaunchPlan) -> None:
    table = Table(title=f"Launch plan for {plan.served_name} on {plan.device.upper()}")
    for column in ("setting", "value", "why"):
        table.add_column(column)
    for c in plan.choices:
        table.add_row(c.setting, c.value, c.why)
    out.print(table)
    out.print(f"Predicted KV cache: {plan.kv_cache_tokens:,} tokens")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in plan.env.items())
    out.print("Command:", highlight=False)
    out.print(f"  {env} {shlex.join(plan.argv)}".strip(), highlight=False, markup=False, soft_wrap=True)


def _show_gateway(o: ServeOptions) -> None:
    """What the gateway in front will enforce, as the flags and defaults make it."""
    limits = o.limits
    lines = [
        f"Gateway on http://{o.host}:{o.port}"
        + (f" ({o.workers} processes)" if o.workers > 1 else "")
        + f": API keys {'required' if o.auth_required else 'not required'}",
        f"  request body at most {o.max_body_bytes:,} B in {limits.body_timeout_s:g} s; "
        f"headers at most {limits.max_header_bytes:,} B in {limits.header_timeout_s:g} s",
        f"  max_tokens at most {o.max_tokens if o.max_tokens is not None else 'the engine allows'}; "
        f"requests in flight "
        + (
            f"at most {o.max_concurrent} (fair between keys, {o.queue_timeout_s:g} s queue)"
            if o.max_concurrent
            else "uncapped"
        ),
        f"  connections at most {limits.max_connections:,}, idle {limits.idle_timeout_s:g} s; "
        f"drain {o.drain_timeout_s:g} s on shutdown",
        *(
            f"  spill {t.model} -> {t.remote_model} at {t.url}"
            + (f" past {t.max_queue} queued" if t.max_queue else "")
            + (f" or TTFT over {t.max_ttft_s:g} s" if t.max_ttft_s else "")
            for t in o.spills
        ),
        *(
            f"  {model} priced at ${p.input_per_mtok:g} / ${p.output_per_mtok:g} per million prompt / completion tokens"
            for model, p in o.token_prices.items()
        ),
        *(
            [f"  keys' priority tiers go to the engines of {', '.join(o.priority_models)} (vLLM priority scheduling)"]
            if o.priority_models
            else []
        ),
    ]
    for line in lines:
        out.print(line, markup=False, highlight=False)


class ConsoleReporter(ServeReporter):
    """A live status line on a terminal; one line per start-up phase in a log or CI."""

    def __init__(self) -> None:
        self._status: Status | None = None
        self._phases: dict[str, str] = {}
        self._url = ""
        self._waiting = 0

    def starting(self, url: str, engines: Sequence[tuple[LaunchPlan, Path]]) -> None:
        self._url, self._waiting = url, len(engines)
        err.print(f"Gateway on [bold]{url}[/bold] (/health now, /ready once the engines are up)")
        for plan, log_path in engines:
            err.print(f"Engine log for {plan.served_name}: {log_path}", highlight=False, markup=False)
        if err.is_terminal:
            self._status = err.status("Starting the engine")
            self._status.start()

    def warn(self, message: str) -> None:
        err.print(f"[yellow]Warning:[/yellow] {escape(message)}", highlight=False)

    def progress(self, name: str, progress: EngineProgress) -> None:
        if self._status is not None:
            last = escape(progress.last_line[-100:])
            self._status.update(
                f"Starting {name}: {progress.phase} ({progress.elapsed_s:.0f} s)\n  [dim]{last}[/dim]",
            )
        elif self._phases.get(name) != progress.phase:
            err.print(f"Starting {name}: {progress.phase} ({progress.elapsed_s:.0f} s)", highlight=False, markup=False)
        self._phases[name] = progress.phase

    def ready(self, ready: Ready) -> None:
        self._stop_status()
        kv = f"; KV cache {ready.logged_kv_tokens:,} tokens" if ready.logged_kv_tokens else ""
        replica = f" (replica {ready.replica + 1})" if ready.replica else ""
        err.print(
            f"[green]Ready[/green] in {ready.startup.seconds:.0f} s: {ready.model}{replica}{kv}.", highlight=False
        )
        err.print(f"  {ready.startup.describe()}", highlight=False, markup=False)
        self._waiting -= 1
        if self._waiting == 0:
            err.print(f"Serving on {self._url}/v1. Ctrl-C stops.", highlight=False, markup=False)

    def stopping(self, reason: str) -> None:
        self._stop_status()
        err.print(f"Shutting down: {reason}")

    def _stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
