"""API keys: created once and shown once, stored as a SHA-256 of their secret, checked in constant time.

A key reads `dk-<id>-<secret>`: the id finds the row, the secret's hash is compared with
`hmac.compare_digest`. Keys are random (192 bits), so a plain SHA-256 is as strong as a slow hash here.
The gateway keeps keys in memory for a few seconds: a revocation takes effect within `ttl_s`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from deploykit.errors import NotFoundError, UsageError
from deploykit.serve.gateway.database import Database, Row
from deploykit.serve.gateway.errors import GatewayError

_PREFIX = "dk-"
# Key names appear in metrics labels, logs and tables: plain, short, printable.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}")
_COLUMNS = "id, name, secret_sha256, models, rpm, tpm, max_concurrent, created_at, expires_at, revoked_at"


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
    now: float | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key; returns it with its full secret token, which is never stored and cannot be shown again."""
    now = time.time() if now is None else now
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"'{name[:80]}' is not a valid key name.",
            "Use 1 to 64 letters, digits and . _ @ : - (starting with a letter or digit), e.g. team-a.",
        )
    if models is not None and not models:
        raise UsageError("--models names no model.", "Name at least one, or leave --models out for every model.")
    for label, value in (("--rpm", rpm), ("--tpm", tpm), ("--max-concurrent", max_concurrent)):
        if value is not None and value < 1:
            raise UsageError(f"{label} must be at least 1 (got {value}).", "Leave it out for no limit.")
    if expires_at is not None and expires_at <= now:
        raise UsageError("The expiry date is in the past.", "Give a future date, e.g. --expires 2027-01-31.")
    if db.query("SELECT 1 FROM api_keys WHERE name = ?", (name,)):
        raise UsageError(f"A key named '{name}' exists already.", "Choose another --name, or revoke that key first.")
    key_id, secret = secrets.token_hex(6), secrets.token_hex(24)
    key = ApiKey(
        id=key_id,
        name=name,
        secret_sha256=_sha256(secret),
        models=tuple(models) if models is not None else None,
        rpm=rpm,
        tpm=tpm,
        max_concurrent=max_concurrent,
        created_at=now,
        expires_at=expires_at,
    )
    db.execute(
        f"INSERT INTO api_keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            key.id,
            key.name,
            key.secret_sha256,
            json.dumps(list(key.models)) if key.models is not None else None,
            rpm,
            tpm,
            max_concurrent,
            now,
            expires_at,
            None,
        ),
    )
    return key, f"{_PREFIX}{key_id}-{secret}"


def list_keys(db: Database) -> list[ApiKey]:
    return [_key(row) for row in db.query(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at")]


def revoke_key(db: Database, name_or_id: str, *, now: float | None = None) -> ApiKey:
    """Revoke the key with this name or id; revoking twice is not an error."""
    rows = db.query(f"SELECT {_COLUMNS} FROM api_keys WHERE name = ? OR id = ?", (name_or_id, name_or_id))
    if not rows:
        names = ", ".join(k.name for k in list_keys(db)) or "none yet"
        raise NotFoundError(f"No API key named '{name_or_id}'.", f"Known keys: {names} (`deploykit keys list`).")
    key = _key(rows[0])
    if key.revoked_at is None:
        db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time() if now is None else now, key.id))
    return _key(db.query(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key.id,))[0])


class KeyVerifier:
    """Turns a request's credentials into its ApiKey, or the 401 an OpenAI client expects."""

    def __init__(self, db: Database, *, ttl_s: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}

    def any_keys(self) -> bool:
        return bool(self._db.query("SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1"))

    def verify(self, authorization: str | None, api_key_header: str | None) -> ApiKey:
        token = api_key_header or _bearer(authorization)
        if not token:
            raise _unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' or an 'api-key' header "
                "(`deploykit keys create` makes one).",
                "missing_api_key",
            )
        key_id, _, secret = token.removeprefix(_PREFIX).partition("-")
        key = self._lookup(key_id) if token.startswith(_PREFIX) and secret else None
        # compare even when the id is unknown, so that timing does not tell which ids exist
        expected = key.secret_sha256 if key is not None else _sha256("")
        if not hmac.compare_digest(_sha256(secret), expected) or key is None:
            raise _unauthorized("Incorrect API key provided.", "invalid_api_key")
        status = key.status(self._clock())
        if status != "active":
            raise _unauthorized(f"The API key '{key.name}' has been {status}.", f"{status}_api_key")
        return key

    def _lookup(self, key_id: str) -> ApiKey | None:
        now = self._clock()
        cached = self._cache.get(key_id)
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        rows = self._db.query(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        key = _key(rows[0]) if rows else None
        if len(self._cache) > 10_000:  # unknown ids are cached too; do not let guessing grow memory
            self._cache.clear()
        self._cache[key_id] = (now, key)
        return key


def require_model_access(key: ApiKey, model: str) -> None:
    if not key.allows(model):
        allowed = ", ".join(key.models or ())
        raise GatewayError(
            403,
            f"The API key '{key.name}' may not use the model '{model}'; it may use: {allowed}.",
            "permission_error",
            "model_not_allowed",
            "model",
        )


def _bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _unauthorized(message: str, code: str) -> GatewayError:
    return GatewayError(401, message, "invalid_request_error", code, headers={"WWW-Authenticate": "Bearer"})


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _key(row: Row) -> ApiKey:
    key_id, name, digest, models, rpm, tpm, max_concurrent, created_at, expires_at, revoked_at = row
    return ApiKey(
        id=key_id,
        name=name,
        secret_sha256=digest,
        models=tuple(json.loads(models)) if models else None,
        rpm=rpm,
        tpm=tpm,
        max_concurrent=max_concurrent,
        created_at=created_at,
        expires_at=expires_at,
        revoked_at=revoked_at,
    )
