"""The curated model catalog: aliases for hub repos, the facts users choose by, and architecture numbers
that size memory before any download. Any hub repo id works too, catalogued or not."""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from deploykit.core.errors import DeploykitError, UnknownModelError, UsageError
from deploykit.models.config import ModelConfig

Task = Literal["text-generation", "embeddings", "speech-recognition", "image-generation", "multimodal"]
Architecture = Literal["decoder-only", "encoder-only", "encoder-decoder"]


class CatalogEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    alias: str
    repo: str = ""
    revision: str = "main"
    task: Task
    architecture: Architecture
    license: str
    gated: bool = False
    open_weights: bool = True
    provider: str = ""
    params: int = 0
    context: int
    layers: int = 0
    hidden: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    intermediate: int = 0
    vocab: int = 0
    experts: int = 1
    tied_embeddings: bool = False
    # what the model card recommends (temperature, top_p) where the repo's generation_config.json does not
    # say it: the engine uses it for requests that set none
    sampling: dict[str, float] = {}

    @property
    def servable(self) -> bool:
        """Open weights on the hub: deploykit can pull and serve it (a service can only be compared)."""
        return self.open_weights and bool(self.repo)

    def config(self) -> ModelConfig:
        """The architecture numbers as a ModelConfig, for fit and launch arithmetic before download."""
        if not self.servable:
            raise DeploykitError(f"{self.alias} is a service ({self.provider}); it has no weights to size.")
        return ModelConfig(
            architecture=self.architecture,
            layers=self.layers,
            hidden_size=self.hidden,
            attention_heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_context=self.context,
            dtype="bfloat16",
            params=self.params,
            intermediate_size=self.intermediate,
            vocab_size=self.vocab or 32_000,
        )


class CatalogFile(BaseModel):
    version: int
    updated: str
    model: list[CatalogEntry]


class Catalog:
    def __init__(self, entries: Iterable[CatalogEntry], updated: str = "") -> None:
        self.entries = list(entries)
        self.updated = updated
        self._by_alias = {e.alias: e for e in self.entries}

    def aliases(self) -> list[str]:
        return list(self._by_alias)

    def find(self, name: str) -> CatalogEntry | None:
        """By alias, or by hub repo id (case-insensitive, as the hub treats them)."""
        if name in self._by_alias:
            return self._by_alias[name]
        return next((e for e in self.entries if e.repo and e.repo.lower() == name.lower()), None)

    def get(self, name: str) -> CatalogEntry:
        entry = self.find(name)
        if entry is None:
            raise UnknownModelError(name, self.aliases())
        return entry

    def search(
        self,
        text: str = "",
        *,
        task: str | None = None,
        license: str | None = None,
        max_params: int | None = None,
        keep: Callable[[CatalogEntry], bool] | None = None,
    ) -> list[CatalogEntry]:
        """Entries matching every filter given; `text` matches alias, repo or licence, case-insensitively."""
        text = text.lower()
        return [
            e
            for e in self.entries
            if (not text or text in e.alias.lower() or text in e.repo.lower() or text in e.license.lower())
            and (task is None or e.task == task)
            and (license is None or e.license.lower() == license.lower())
            and (max_params is None or (e.servable and e.params <= max_params))
            and (keep is None or keep(e))
        ]


def load_catalog(text: str | None = None) -> Catalog:
    """The catalog shipped with deploykit (or one given as TOML text)."""
    if text is None:
        text = resources.files("deploykit.models").joinpath("catalog.toml").read_text()
    try:
        data = CatalogFile.model_validate(tomllib.loads(text))
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise DeploykitError(f"The model catalog is invalid: {e}") from e
    return Catalog(data.model, data.updated)


def parse_params(value: str) -> int:
    """'7b', '500M', '1.5B', '135000000' -> a parameter count."""
    v = value.strip().lower()
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}.get(v[-1:], 1)
    try:
        return int(float(v.rstrip("kmbt")) * scale)
    except ValueError as e:
        raise UsageError(f"'{value}' is not a parameter count.", "Write it as 7b, 500m or 135000000.") from e
