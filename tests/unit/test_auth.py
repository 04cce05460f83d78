"""The key check itself (KeyVerifier), with a clock the test moves: which header carries the key, every way
a key is refused and the exact error an OpenAI client gets, how long a revocation takes to bite (the cache's
time to live, at its boundary), and a cache that guessing cannot grow. tests/unit/test_gateway_access.py
checks the same through the gateway's routes."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploykit.serve.accounting.database import Database, connect
from deploykit.serve.accounting.keys import create_key, list_keys, revoke_key
from deploykit.serve.gateway.auth import KeyVerifier, require_model_access
from deploykit.serve.gateway.errors import GatewayError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return connect(f"sqlite:///{tmp_path / 'deploykit.db'}")


def _refusal(verifier: KeyVerifier, authorization: str | None, api_key: str | None = None) -> tuple[object, ...]:
    with pytest.raises(GatewayError) as refused:
        verifier.verify(authorization, api_key)
    e = refused.value
    return e.status, e.type, e.code, str(e), dict(e.headers or {})


def test_the_key_comes_from_a_bearer_or_an_api_key_header(db: Database) -> None:
    _, token = create_key(db, "team")
    verifier = KeyVerifier(db)
    assert verifier.verify(f"Bearer {token}", None).name == "team"
    assert verifier.verify(f"bearer  {token} ", None).name == "team"  # the scheme in any case, spaces around
    assert verifier.verify(None, token).name == "team"  # Azure's api-key header
    assert verifier.verify("Bearer wrong", token).name == "team"  # the api-key header wins


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "missing_api_key"),
        ("Basic abc", "missing_api_key"),  # not a bearer: no key at all
        ("Bearer", "missing_api_key"),
        ("Bearer sk-123", "invalid_api_key"),  # not ours
        ("Bearer dk-", "invalid_api_key"),
        ("Bearer dk-abc", "invalid_api_key"),  # an id and no secret
        ("Bearer dk-abc-def", "invalid_api_key"),  # an id nobody has
    ],
)
def test_each_refusal_is_an_openai_401(db: Database, authorization: str | None, code: str) -> None:
    status, kind, got, message, headers = _refusal(KeyVerifier(db), authorization)
    assert (status, kind, got, headers) == (401, "invalid_request_error", code, {"WWW-Authenticate": "Bearer"})
    assert message == (
        "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' or an 'api-key' header "
        "(`deploykit keys create` makes one)."
        if code == "missing_api_key"
        else "Incorrect API key provided."
    )


def test_a_right_id_with_a_wrong_secret_is_refused(db: Database) -> None:
    _, token = create_key(db, "team")
    wrong = token[:-1] + ("0" if token[-1] != "0" else "1")
    assert _refusal(KeyVerifier(db), f"Bearer {wrong}")[2] == "invalid_api_key"


def test_a_revocation_bites_when_the_cache_expires_not_before(db: Database) -> None:
    clock = Clock()
    _, token = create_key(db, "team")
    verifier = KeyVerifier(db, ttl_s=5.0, clock=clock)
    assert verifier.verify(f"Bearer {token}", None).name == "team"
    revoke_key(db, "team", now=clock.now)
    clock.now += 4.999
    assert verifier.verify(f"Bearer {token}", None).name == "team"  # cached
    clock.now += 0.001  # exactly the time to live
    assert _refusal(verifier, f"Bearer {token}")[2:4] == ("revoked_api_key", "The API key 'team' has been revoked.")


def test_an_expired_key_says_so(db: Database) -> None:
    clock = Clock()
    _, token = create_key(db, "team", expires_at=clock.now + 60, now=clock.now)
    verifier = KeyVerifier(db, clock=clock)
    clock.now += 60
    assert _refusal(verifier, f"Bearer {token}")[2:4] == ("expired_api_key", "The API key 'team' has been expired.")


def test_guessed_ids_cannot_grow_the_cache(db: Database) -> None:
    verifier = KeyVerifier(db)
    for i in range(10_050):
        with pytest.raises(GatewayError):
            verifier.verify(f"Bearer dk-{i:012x}-secret", None)
    assert len(verifier._cache) <= 10_001  # cleared when it passed 10,000 entries


def test_a_key_limited_to_other_models_is_a_403_that_lists_them(db: Database) -> None:
    create_key(db, "team", models=["m2", "m3"])
    [key] = list_keys(db)
    require_model_access(key, "m2")
    with pytest.raises(GatewayError) as refused:
        require_model_access(key, "m1")
    e = refused.value
    assert (e.status, e.type, e.code, e.param) == (403, "permission_error", "model_not_allowed", "model")
    assert str(e) == "The API key 'team' may not use the model 'm1'; it may use: m2, m3."
