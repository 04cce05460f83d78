"""Turn a name a user typed into the model it means: a local copy, a catalog entry, a hub repo, or several.

    smollm2-135m            the store's copy if there is one, and the catalog's entry
    qwen2.5-7b-instruct@v2  the catalog's entry at revision v2
    Qwen/Qwen2.5-7B-Instruct[@rev]
                            any hub repo, stored under its lower-cased name

Every command that takes a model name (serve, pull, models show, size, cost) resolves it here, so that
they agree on what a name means.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # a lazy export

from deploykit.core.errors import NotFoundError, UnknownModelError, UsageError
from deploykit.models.catalog import Catalog, CatalogEntry
from deploykit.models.config import ModelConfig, read_model_config
from deploykit.models.store import LocalModel, ModelStore, check_alias


@dataclass(frozen=True)
class ResolvedModel:
    name: str  # as typed, without @revision
    alias: str  # the store's name for it (where a pull puts it)
    revision: str  # the hub revision asked for: @rev, else the catalog's, else "main"
    local: LocalModel | None  # the copy in the store
    entry: CatalogEntry | None  # the catalog's entry
    repo: str | None  # the hub repo id; None for a managed service or a model only imported here

    @property
    def sampling(self) -> dict[str, float] | None:
        """The model card's recommended sampling, where the catalog records it."""
        return self.entry.sampling if self.entry is not None and self.entry.sampling else None

    def config(self) -> ModelConfig:
        """The architecture numbers: the local copy's config.json, else the catalog's (no download)."""
        if self.local is not None:
            return read_model_config(self.local.path)
        if self.entry is not None and self.entry.servable:
            return self.entry.config()
        if self.entry is not None:
            raise UsageError(f"{self.entry.alias} is a managed service ({self.entry.provider}); it has no weights.")
        raise NotFoundError(f"{self.name} is not downloaded yet.", f"Pull it first: deploykit pull {self.name}")

    def stored(self) -> LocalModel:
        """The copy in the store, or the error that says how to get one."""
        if self.local is None:
            raise NotFoundError(f"{self.name} is not in the local store.", f"Pull it first: deploykit pull {self.name}")
        return self.local

    def hub_repo(self) -> str:
        """The repo to pull from, or the error that says why there is none."""
        if self.repo is not None:
            return self.repo
        if self.entry is not None:
            service = f"{self.entry.alias} is a managed service ({self.entry.provider})"
            raise UsageError(f"{service}; it has no weights to pull.")
        raise UsageError(
            f"{self.name} was imported here and has no hub repo to pull from.",
            "Pull a hub repo by its id, e.g. deploykit pull HuggingFaceTB/SmolLM2-135M-Instruct.",
        )


def check_repo_id(repo: str) -> str:
    """`repo`, or a UsageError when it is not an ORG/NAME the hub could hold (a path, say)."""
    try:
        validate_repo_id(repo)
    except hf_errors.HFValidationError as e:
        raise UsageError(
            f"'{repo[:100]}' is not a hub repo id.", "Write it as ORG/NAME, e.g. Qwen/Qwen2.5-7B-Instruct."
        ) from e
    return repo


def resolve(name: str, store: ModelStore, catalog: Catalog) -> ResolvedModel:
    """What `name` ('alias[@rev]' or 'ORG/NAME[@rev]') means here; UnknownModelError (with close matches)
    when it is neither stored, nor in the catalog, nor a hub repo id."""
    base, _, revision = name.partition("@")
    local = store.find(base)
    entry = catalog.find(base)
    if entry is not None:
        repo = entry.repo if entry.servable else None
        return ResolvedModel(base, entry.alias, revision or entry.revision, local, entry, repo)
    if local is not None:
        return ResolvedModel(base, local.alias, revision or "main", local, None, None)
    if "/" not in base:
        raise UnknownModelError(base, [*store.aliases(), *catalog.aliases()])
    check_repo_id(base)
    alias = base.split("/")[-1].lower()
    check_alias(alias)  # before any download: the store would refuse it afterwards
    return ResolvedModel(base, alias, revision or "main", store.find(alias), None, base)
