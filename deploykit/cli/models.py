"""`deploykit models`: the models this machine can serve."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import typer
from rich.markdown import Markdown
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from deploykit.card import ModelCard, fits_here, show_model
from deploykit.cli.console import err, human_bytes, out, print_json
from deploykit.cli.options import JsonOpt, LockedOpt, LockFileOpt
from deploykit.core.errors import UsageError
from deploykit.core.settings import Settings
from deploykit.models.bundle import export_bundle, import_bundle, is_bundle
from deploykit.models.catalog import load_catalog, parse_params
from deploykit.models.hub import HubCard, delete_model, lock_model, pull, read_card
from deploykit.models.importer import import_model
from deploykit.models.lock import Lock
from deploykit.models.mirror import mirror_repos, serve_mirror
from deploykit.models.resolve import resolve
from deploykit.models.store import ModelStore
from deploykit.serve.hardware import detect_hardware

app = typer.Typer(
    help="Find models in the catalog; list, import and remove local ones.", no_args_is_help=True, add_completion=False
)


def _store() -> ModelStore:
    return ModelStore(Settings().models_dir)


@app.command("import")
def import_(
    path: Path = typer.Argument(..., help="A bundle (.tar from `models export`), a .gguf file or a model directory."),
    alias: str = typer.Option(None, "--alias", help="The name to serve it under (a bundle names its models)."),
    force: bool = typer.Option(False, "--force", help="Replace a model already stored under that name."),
    lock_file: LockFileOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Import a bundle, a GGUF file or a model directory into the local store.

    The model becomes a Hugging Face directory the engine can load.
    A bundle is checked file by file against the sha256 its lock entries carry, and imported whole or not
    at all; its entries go into the lock file, so `serve --locked` serves exactly those bytes. A GGUF file
    is converted once (dequantized to bfloat16 safetensors, tokenizer and chat template kept). Importing
    the same file under the same alias again does nothing.

    Examples:

      deploykit models import smollm2.tar                  # a bundle, on a machine without the hub

      deploykit models import ./SmolLM2-135M-Instruct.Q4_1.gguf --alias smollm2-135m

      deploykit models import ~/models/my-finetune --alias my-finetune
    """
    settings = Settings()
    if is_bundle(path):
        if alias is not None:
            raise UsageError("A bundle names its own models; leave out --alias.")
        with _bytes_progress(f"Importing {path.name}") as step:
            models = import_bundle(
                path, _store(), lock=Lock.read(lock_file or settings.lock_path), force=force, progress=step
            )
        if json_:
            print_json([m.to_json() for m in models])
        for m in models if not json_ else ():
            err.print(f"Imported {m.alias} ({human_bytes(m.size_bytes)}), every file as locked.", markup=False)
        return
    if alias is None:
        raise UsageError("Name the model: --alias NAME.", "For example: --alias my-finetune")
    with err.status(f"Importing {path.name}") as status:
        model, written = import_model(
            path, alias, _store(), force=force, progress=lambda m: status.update(f"Importing {path.name}: {m}")
        )
    if json_:
        print_json({**model.to_json(), "written": written})
    elif written:
        err.print(f"Imported [bold]{alias}[/bold] ({human_bytes(model.size_bytes)}) into {escape(str(model.path))}")
    else:
        err.print(f"[bold]{alias}[/bold] is already imported from this source; nothing to do.")


@app.command("export")
def export(
    models: list[str] = typer.Argument(..., help="Stored models to put in the bundle."),
    output: Path = typer.Option(..., "--output", "-o", help="The bundle to write, e.g. models.tar."),
    lock_file: LockFileOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Write stored models into one tar file for a machine that cannot reach the hub.

    Each model goes with its lock entry (the lock file's, which its files must match, or one made from its
    files now). Carry the file over and run `deploykit models import BUNDLE` there.

    Examples:

      deploykit models export smollm2-135m --output smollm2.tar
    """
    settings = Settings()
    store = ModelStore(settings.models_dir)
    catalog = load_catalog()
    local = [resolve(name, store, catalog).stored() for name in models]
    with _bytes_progress(f"Writing {output.name}") as step:
        done = export_bundle(local, output, lock=Lock.read(lock_file or settings.lock_path), progress=step)
    if json_:
        print_json({"path": str(done.path), "size_bytes": done.size_bytes, "models": [e.alias for e in done.models]})
    else:
        names = ", ".join(e.alias for e in done.models)
        err.print(f"Wrote {done.path} ({human_bytes(done.size_bytes)}): {names}.", markup=False)


@app.command("lock")
def lock(
    models: list[str] = typer.Argument(..., help="Catalog aliases, hub repo ids (@revision) or stored models."),
    token: str = typer.Option(None, envvar="HF_TOKEN", help="Hub token, for gated models (default: HF_TOKEN)."),
    lock_file: LockFileOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Record in the lock file each model's commit and the sha256 of its files, without downloading weights.

    For a stored model, its files as they are here (hashed now); for one not here, the commit the hub
    resolves it to now, with the sha256 the hub lists for the weights (the small files are fetched to hash).

    `pull --locked` and `serve --locked` then refuse anything else: commit the lock with the deployment.

    Examples:

      deploykit models lock smollm2-135m qwen2.5-7b-instruct --lock-file ./deploykit.lock
    """
    settings = Settings()
    store, catalog = ModelStore(settings.models_dir), load_catalog()
    lock_ = Lock.read(lock_file or settings.lock_path)
    entries = []
    with err.status("Locking") as status:
        for name in models:
            status.update(f"Locking {name}")
            entries.append(lock_model(name, store=store, catalog=catalog, lock=lock_, token=token))
    if json_:
        print_json([{**asdict(e), "size_bytes": e.size} for e in entries])
        return
    for e in entries:
        what = f"commit {e.commit[:12]}" if e.commit else e.source
        err.print(f"Locked {e.alias}: {what}, {len(e.files)} files, {human_bytes(e.size)}.", markup=False)
    err.print(f"Lock file: {lock_.path}", markup=False)


@contextlib.contextmanager
def _bytes_progress(what: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar in bytes, on stderr; yields the callback that moves it."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@app.command("list")
def list_(json_: JsonOpt = False) -> None:
    """List the models in the local store."""
    models = _store().models()
    if json_:
        print_json([m.to_json() for m in models])
        return
    if not models:
        err.print("No models yet. Add one with `deploykit models import PATH --alias NAME`.")
        return
    table = Table()
    for column in ("alias", "size", "source", "revision", "verified", "added"):
        table.add_column(column)
    for m in models:
        # pulled models are recorded only after their sizes and sha256 matched the hub's
        verified = "sha256" if m.format == "hub" else f"local {m.format}"
        revision = m.fingerprint[:12] if m.format == "hub" else "-"
        table.add_row(m.alias, human_bytes(m.size_bytes), escape(m.source), revision, verified, m.added_at[:19])
    out.print(table)


@app.command("rm")
def rm(alias: str = typer.Argument(..., help="The model to delete."), json_: JsonOpt = False) -> None:
    """Delete a model and say how much space that freed (a pulled model's blobs in the HF cache included)."""
    freed = delete_model(_store(), alias)
    if json_:
        print_json({"alias": alias, "freed_bytes": freed})
    else:
        err.print(f"Removed {alias}; freed {human_bytes(freed)}.", markup=False)


@app.command("search")
def search(
    text: str = typer.Argument("", help="Part of an alias, hub repo id or licence."),
    task: str = typer.Option(None, help="text-generation, embeddings, speech-recognition, ..."),
    license: str = typer.Option(None, "--license", help="Exact licence, e.g. apache-2.0, llama2, mit."),
    max_params: str = typer.Option(None, help="At most this many parameters: 8b, 500m, ..."),
    fits: bool = typer.Option(False, "--fits", help="Only models that fit this machine's GPUs or RAM."),
    json_: JsonOpt = False,
) -> None:
    """Filter the model catalog (open models and, for comparison, managed services).

    Examples:

      deploykit models search llama --task text-generation

      deploykit models search --license apache-2.0 --max-params 8b --fits
    """
    hardware = detect_hardware() if fits else None
    entries = load_catalog().search(
        text,
        task=task,
        license=license,
        max_params=parse_params(max_params) if max_params else None,
        keep=(lambda e: e.servable and fits_here(e.config(), hardware)) if hardware else None,
    )
    if json_:
        print_json([e.model_dump() | {"servable": e.servable} for e in entries])
        return
    if not entries:
        err.print("No catalog model matches. Any hub repo id works too: deploykit models show ORG/NAME.")
        raise typer.Exit(1)
    cells: dict[str, list[str]] = {name: [] for name in _SEARCH_COLUMNS}
    for e in entries:
        params = f"{e.params / 1e9:.1f}B" if e.params >= 1e9 else (f"{e.params / 1e6:.0f}M" if e.params else "-")
        where = e.repo + (" (gated)" if e.gated else "") if e.servable else f"service: {e.provider}"
        row = (e.alias, e.task, params, e.license, f"{e.context:,}", e.architecture, where)
        for name, value in zip(_SEARCH_COLUMNS, row, strict=True):
            cells[name].append(value)
    shown = fit_columns({name: [name, *values] for name, values in cells.items()}, out.width, wraps="where")
    table = Table()
    for name in shown:
        # the alias is what users type next: never cut (other columns are dropped first)
        table.add_column(
            name, no_wrap=name == "alias", min_width=max(map(len, cells[name])) if name == "alias" else None
        )
    for i in range(len(entries)):
        table.add_row(*(cells[name][i] for name in shown))
    out.print(table)


# search's columns, most important first: on a narrow terminal the last ones go
_SEARCH_COLUMNS = ("alias", "task", "params", "licence", "context", "arch", "where")


def fit_columns(columns: dict[str, list[str]], width: int, wraps: str | None = None) -> list[str]:
    """The columns (given most important first, each with its header and cells) that fit `width` side by side
    in a table, in their given order; the first always. `wraps` may wrap, so it needs only a third of its
    width, or 20 characters."""
    chosen, used = [], 4  # the table's outer borders
    for i, (name, texts) in enumerate(columns.items()):
        need = max(map(len, texts)) + 3  # padding and a border
        if name == wraps:
            need = min(need, max(20, need // 3))
        if i == 0 or used + need <= width:
            chosen.append(name)
            used += need
    return chosen


@app.command("show")
def show(
    name: str = typer.Argument(..., help="A catalog alias, hub repo id, or local model."),
    seq_len: int = typer.Option(2048, help="Sequence length for the concurrency estimate."),
    token: str = typer.Option(None, envvar="HF_TOKEN", help="Hub token, for gated models (default: HF_TOKEN)."),
    offline: bool = typer.Option(False, "--offline", help="Show only what is cached; never ask the hub."),
    json_: JsonOpt = False,
) -> None:
    """The model card: catalog facts, the hub's card and files, memory per dtype, fit on this machine.

    The hub's README card and file listing are cached, so they show offline too.

    Examples:

      deploykit models show llama-3.1-8b-instruct

      deploykit models show smollm2-135m --seq-len 8192 --json
    """
    settings = Settings()

    def read_hub(repo: str, revision: str) -> HubCard | None:
        return read_card(repo, revision, listings=settings.home / "hub", token=token, offline=offline)

    card = show_model(ModelStore(settings.models_dir), load_catalog(), name, detect_hardware(), seq_len, read_hub)
    if json_:
        print_json(card.to_json())
    else:
        _print_card(card)


def _print_card(card: ModelCard) -> None:
    e = card.entry
    out.print(f"[bold]{escape(card.name)}[/bold]")
    if e is not None:
        where = e.repo if e.servable else f"service by {e.provider}, not servable here"
        out.print(
            f"  {e.task}, {e.architecture}; licence {e.license}{' (gated)' if e.gated else ''}; {where}", markup=False
        )
    if card.local is not None:
        out.print(
            f"  local: {card.local.path} ({human_bytes(card.local.size_bytes)}, from {card.local.source})", markup=False
        )
    hub = card.hub
    if hub is not None:
        age = " (cached: the hub was not asked or not reachable)" if hub.from_cache else ""
        total = sum(f.size for f in hub.files)
        out.print(
            f"  hub: {hub.repo}@{hub.revision[:12]}, {len(hub.files)} files, {human_bytes(total)}{age}", markup=False
        )
        for file in sorted(hub.files, key=lambda file: -file.size)[:8]:
            out.print(f"    {human_bytes(file.size):>10}  {file.path}", highlight=False, markup=False)
        if hub.readme:
            out.print(Markdown(_strip_front_matter(hub.readme)[:3000]))
    elif e is not None and e.servable:
        out.print("  hub: no card: the hub is unreachable (or the repo gated without access) and none is cached")
    c = card.config
    if c is None:
        return
    out.print(
        f"  {c.params / 1e9:.2f}B parameters; {c.layers} layers, {c.attention_heads} attention / {c.kv_heads} KV "
        f"heads of {c.head_dim}; context {c.max_context:,}"
    )
    memory = Table(title="Memory")
    for column in ("dtype", "weights", "KV cache per token", f"KV for {card.seq_len:,} tokens"):
        memory.add_column(column)
    for m in card.memory:
        memory.add_row(
            m.dtype,
            human_bytes(m.weight_bytes),
            f"{m.kv_bytes_per_token:,} B",
            human_bytes(m.kv_bytes_per_token * card.seq_len),
        )
    out.print(memory)
    fit = Table(title="Fit on this machine")
    for column in (
        "on",
        "fits",
        "dtype",
        "weights each",
        "KV cache tokens",
        "max context",
        f"seqs of {card.seq_len:,}",
    ):
        fit.add_column(column)
    for row in card.fits:
        f = row.fit
        fit.add_row(
            row.target,
            "yes" if f.fits else "[red]no[/red]",
            f.dtype,
            human_bytes(f.weight_bytes_per_device),
            f"{f.kv_cache_tokens:,}",
            f"{f.max_context:,}",
            f"{f.concurrent_sequences(card.seq_len):,}",
        )
    out.print(fit)


def pull_command(
    model: str = typer.Argument(..., help="Catalog alias or hub repo id, optionally @revision."),
    token: str = typer.Option(None, envvar="HF_TOKEN", help="Hub token, for gated models (default: HF_TOKEN)."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local cache; never ask the hub."),
    locked: LockedOpt = False,
    lock_file: LockFileOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Download a model from the Hugging Face hub for serving, into the standard HF cache (HF_HOME).

    Only what serving needs is fetched (config, tokenizer, chat template, one weight format, safetensors
    first). Free disk is checked first, an interrupted download resumes, and every file is verified against
    the hub's sizes and sha256 before the model counts as present. The commit and each file's sha256 go
    into the lock file; with --locked, the pull instead refuses anything the lock does not name.

    Examples:

      deploykit pull smollm2-135m

      deploykit pull meta-llama/Llama-3.1-8B-Instruct --token hf_...

      deploykit pull Qwen/Qwen2.5-7B-Instruct@main

      deploykit pull smollm2-135m --locked        # exactly what deploykit.lock names, or an error
    """
    settings = Settings()
    with err.status(f"Pulling {model}") as status:
        local = pull(
            model,
            store=_store(),
            catalog=load_catalog(),
            token=token,
            offline=offline,
            progress=lambda m: status.update(f"Pulling {model}: {m}"),
            lock=Lock.read(lock_file or settings.lock_path),
            locked=locked,
        )
    if json_:
        print_json(local.to_json())
    else:
        err.print(
            f"[bold]{local.alias}[/bold] is ready to serve ({human_bytes(local.size_bytes)}, {escape(local.source)})."
        )


def serve_hub(
    home: Path = typer.Argument(
        None, help="The deploykit home whose models to serve (default: $DEPLOYKIT_HOME).", show_default=False
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 for the other machines."),
    port: int = typer.Option(8090, help="Port to listen on."),
    lock_file: LockFileOpt = None,
) -> None:
    """Serve the models this machine holds to other machines, in the Hugging Face hub's protocol.

    Every stored model that came from the hub (pulled, or imported from a bundle) is served as its repo at
    the commit stored here, each file with its sha256, so that the fleet pulls from this machine instead of
    the hub, verified, with `--locked` against the same lock file. Read-only and without accounts: for a
    site's own network.

    Examples:

      deploykit serve-hub --host 0.0.0.0        # on the mirror

      HF_ENDPOINT=http://mirror:8090 deploykit pull smollm2-135m --locked
    """
    settings = Settings(home=home) if home is not None else Settings()
    lock_ = Lock.read(lock_file or settings.lock_path)
    with err.status("Indexing the store") as status:
        repos = mirror_repos(ModelStore(settings.models_dir), lock_, progress=status.update)
    for repo in repos.values():
        size = human_bytes(sum(f.size for f in repo.files.values()))
        err.print(f"  {escape(repo.repo)}@{repo.commit[:12]}  ({repo.alias}, {len(repo.files)} files, {size})")
    err.print(
        f"Hub mirror on [bold]http://{host}:{port}[/bold]: on other machines, "
        f"HF_ENDPOINT=http://{'THIS-HOST' if host == '0.0.0.0' else host}:{port} deploykit pull MODEL. Ctrl-C stops.",
        highlight=False,
    )
    serve_mirror(repos, host, port)


def _strip_front_matter(readme: str) -> str:
    """Model cards start with YAML metadata between --- lines; people read what follows."""
    if readme.startswith("---"):
        end = readme.find("\n---", 3)
        if end != -1:
            return readme[end + 4 :].lstrip()
    return readme
