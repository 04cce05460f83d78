"""LoRA adapters registered at run time (`deploykit lora add`): the gateway loads each into the engines of
its base model through vLLM's runtime LoRA API, and serves it under its own name (serve/gateway/lora.py).
The table's columns are RegisteredAdapter's fields, by name."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from deploykit.core.errors import NotFoundError, UsageError
from deploykit.serve.accounting.database import Database, Row
from deploykit.serve.accounting.keys import check_name


@dataclass(frozen=True)
class RegisteredAdapter:
    name: str  # what clients ask for in `model`, and what API keys' --models name
    model: str  # the served model it adapts
    path: str  # the adapter directory, as the engines' hosts see it
    rank: int
    created_at: float = 0.0


def add_adapter(
    db: Database, name: str, model: str, path: str, rank: int, *, now: float | None = None
) -> RegisteredAdapter:
    check_name(name, "adapter")
    if name == model:
        raise UsageError(f"The adapter cannot be named '{model}', as its base model is.", "Choose another NAME.")
    if db.query("SELECT 1 FROM adapters WHERE name = ?", (name,)):
        raise UsageError(f"An adapter named '{name}' is registered already.", f"`deploykit lora remove {name}` first.")
    adapter = RegisteredAdapter(name, model, path, rank, time.time() if now is None else now)
    db.execute(
        f"INSERT INTO adapters ({_SELECT}) VALUES ({', '.join('?' * len(_FIELDS))})", dataclasses.astuple(adapter)
    )
    return adapter


def list_adapters(db: Database) -> list[RegisteredAdapter]:
    return [_adapter(row) for row in db.query(f"SELECT {_SELECT} FROM adapters ORDER BY name")]


def remove_adapter(db: Database, name: str) -> RegisteredAdapter:
    found = db.query(f"SELECT {_SELECT} FROM adapters WHERE name = ?", (name,))
    if not found:
        known = ", ".join(a.name for a in list_adapters(db)) or "none"
        raise NotFoundError(
            f"No adapter named '{name}' is registered.", f"Registered: {known} (`deploykit lora list`)."
        )
    db.execute("DELETE FROM adapters WHERE name = ?", (name,))
    return _adapter(found[0])


_FIELDS = tuple(f.name for f in dataclasses.fields(RegisteredAdapter))
_SELECT = ", ".join(_FIELDS)


def _adapter(row: Row) -> RegisteredAdapter:
    return RegisteredAdapter(**dict(zip(_FIELDS, row, strict=True)))
