"""API keys: created once and shown once, stored as a SHA-256 of their secret (never the secret itself).

A key reads `dk-<id>-<secret>`: the id finds the row, the secret's hash is compared (serve/gateway/auth.py
checks them, in constant time). Keys are random (192 bits), so a plain SHA-256 is as strong as a slow hash
here. The table's columns are the ApiKey fields, by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from deploykit.core.errors import NotFoundError, UsageError
from deploykit.serve.accounting.database import Database, Row

PREFIX = "dk-"
# A key's priority tier, best first: the order the gateway's queue serves them in, and vLLM's request
# `priority` (lower runs earlier) where the engines schedule by priority.
PRIORITIES = {"high": -1, "normal": 0, "batch": 1}
# Key names appear in metrics labels, logs and tables: plain, short, printable.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}")


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    secret_sha256: str = field(repr=False)
    models: tuple[str, ...] | None = None  # None: every model
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    created_at: float = 0.0
    expires_at: float | None = None
    revoked_at: float | None = None
    budget: str | None = None  # the spend budget it counts against (budgets.py), shared or its own
    priority: str = "normal"  # its tier: high | normal | batch
    audio_spm: int | None = None  # seconds of audio a minute it may have transcribed or translated

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def public(self, now: float) -> dict[str, object]:
        """Everything about the key but its secret (for `keys list --json`)."""
        return {
            "id": self.id,
            "name": self.name,
            "models": list(self.models) if self.models is not None else None,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_concurrent": self.max_concurrent,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "budget": self.budget,
            "priority": self.priority,
            "audio_spm": self.audio_spm,
            "status": self.status(now),
        }


def create_key(
    db: Database,
    name: str,
    *,
    models: Sequence[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrent: int | None = None,
    expires_at: float | None = None,
    budget: str | None = None,
    priority: str = "normal",
    audio_spm: int | None = None,
    now: float | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key; returns it with its full secret token, which is never stored and cannot be shown again."""
    now = time.time() if now is None else now
    check_name(name, "key")
    if models is not None and not models:
        raise UsageError("--models names no model.", "Name at least one, or leave --models out for every model.")
    limits = (("--rpm", rpm), ("--tpm", tpm), ("--max-concurrent", max_concurrent), ("--audio-spm", audio_spm))
    for label, value in limits:
        if value is not None and value < 1:
            raise UsageError(f"{label} must be at least 1 (got {value}).", "Leave it out for no limit.")
    if expires_at is not None and expires_at <= now:
        raise UsageError("The expiry date is in the past.", "Give a future date, e.g. --expires 2027-01-31.")
    if priority not in PRIORITIES:
        raise UsageError(f"--priority '{priority}' is not one of high, normal, batch.", "E.g. --priority batch.")
    if budget is not None and not db.query("SELECT 1 FROM budgets WHERE name = ?", (budget,)):
        raise NotFoundError(
            f"No budget named '{budget}'.", f"Create it first: deploykit keys budget {budget} --monthly USD."
        )
    if db.query("SELECT 1 FROM api_keys WHERE name = ?", (name,)):
        raise UsageError(f"A key named '{name}' exists already.", "Choose another --name, or revoke that key first.")
    key_id, secret = secrets.token_hex(6), secrets.token_hex(24)
    key = ApiKey(
        id=key_id,
        name=name,
        secret_sha256=sha256(secret),
        models=tuple(models) if models is not None else None,
        rpm=rpm,
        tpm=tpm,
        max_concurrent=max_concurrent,
        created_at=now,
        expires_at=expires_at,
        budget=budget,
        priority=priority,
        audio_spm=audio_spm,
    )
    db.execute(f"INSERT INTO api_keys ({_SELECT}) VALUES ({', '.join('?' * len(_FIELDS))})", _row(key))
    return key, f"{PREFIX}{key_id}-{secret}"


def check_name(name: str, what: str) -> None:
    """Key and budget names appear in metrics labels, logs and tables: plain, short, printable."""
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"'{name[:80]}' is not a valid {what} name.",
            "Use 1 to 64 letters, digits and . _ @ : - (starting with a letter or digit), e.g. team-a.",
        )


def list_keys(db: Database) -> list[ApiKey]:
    return [_key(row) for row in db.query(f"SELECT {_SELECT} FROM api_keys ORDER BY created_at")]


def revoke_key(db: Database, name_or_id: str, *, now: float | None = None) -> ApiKey:
    """Revoke the key with this name or id; revoking twice is not an error."""
    rows = db.query(f"SELECT {_SELECT} FROM api_keys WHERE name = ? OR id = ?", (name_or_id, name_or_id))
    if not rows:
        names = ", ".join(k.name for k in list_keys(db)) or "none yet"
        raise NotFoundError(f"No API key named '{name_or_id}'.", f"Known keys: {names} (`deploykit keys list`).")
    key = _key(rows[0])
    if key.revoked_at is None:
        db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time() if now is None else now, key.id))
    return _key(db.query(f"SELECT {_SELECT} FROM api_keys WHERE id = ?", (key.id,))[0])


def find_key(db: Database, key_id: str) -> ApiKey | None:
    rows = db.query(f"SELECT {_SELECT} FROM api_keys WHERE id = ?", (key_id,))
    return _key(rows[0]) if rows else None


def any_tiered_keys(db: Database) -> bool:
    """Does an active key have a tier other than normal (so the engines should schedule by priority)?"""
    rows = db.query("SELECT 1 FROM api_keys WHERE revoked_at IS NULL AND priority IN ('high', 'batch') LIMIT 1")
    return bool(rows)


def any_active_keys(db: Database) -> bool:
    return bool(db.query("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1"))


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


_FIELDS = tuple(f.name for f in dataclasses.fields(ApiKey))
_SELECT = ", ".join(_FIELDS)


def _row(key: ApiKey) -> tuple[object, ...]:
    """The key's column values in _FIELDS order (its model list as JSON)."""
    values = dataclasses.asdict(key)
    values["models"] = json.dumps(list(key.models)) if key.models is not None else None
    return tuple(values[name] for name in _FIELDS)


def _key(row: Row) -> ApiKey:
    values = dict(zip(_FIELDS, row, strict=True))
    values["models"] = tuple(json.loads(values["models"])) if values["models"] else None
    values["priority"] = values["priority"] or "normal"  # keys made before tiers existed
    return ApiKey(**values)
