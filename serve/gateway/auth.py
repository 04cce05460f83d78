"""Checking a request's API key: its credentials in, its ApiKey or the 401 an OpenAI client expects out.

Digests are compared with `hmac.compare_digest`, and hashed even for an unknown id, so that timing does not
tell which ids exist. Keys are kept in memory for a few seconds: a revocation takes effect within `ttl_s`.
The keys themselves (creation, storage, revocation) are serve/accounting/keys.py.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable

from deploykit.serve.accounting.database import Database
from deploykit.serve.accounting.keys import PREFIX, ApiKey, any_active_keys, find_key, sha256
from deploykit.serve.gateway.errors import GatewayError


class KeyVerifier:
    """Turns a request's credentials into its ApiKey, or the 401 an OpenAI client expects."""

    def __init__(self, db: Database, *, ttl_s: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}

    def any_keys(self) -> bool:
        return any_active_keys(self._db)

    def verify(self, authorization: str | None, api_key_header: str | None) -> ApiKey:
        token = api_key_header or _bearer(authorization)
        if not token:
            raise _unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' or an 'api-key' header "
                "(`deploykit keys create` makes one).",
                "missing_api_key",
            )
        key_id, _, secret = token.removeprefix(PREFIX).partition("-")
        key = self._lookup(key_id) if token.startswith(PREFIX) and secret else None
        # compare even when the id is unknown, so that timing does not tell which ids exist
        expected = key.secret_sha256 if key is not None else sha256("")
        if not hmac.compare_digest(sha256(secret), expected) or key is None:
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
        key = find_key(self._db, key_id)
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
