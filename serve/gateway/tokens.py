"""How many tokens a request may use, read the way the engine will read it, before it is admitted.

vLLM's chat route generates `max_completion_tokens` when it is set (not null), else `max_tokens`, else
up to the end of the context; its completions route reads only `max_tokens` (null or absent: 16). Every
choice (`n`, `best_of`) generates its own tokens. So the gateway checks both fields against its limit,
takes the one the route will use, writes its own limit into a request that sets none, and reserves
prompt + choices x that many tokens against the key's quota (never more than the context allows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deploykit.serve.gateway.errors import GatewayError

_FIELDS = ("max_completion_tokens", "max_tokens")
# What vLLM's (and OpenAI's) completions route generates when the request names no max_tokens.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class TokenBudget:
    max_tokens: int | None  # what the engine will generate at most per choice; None: unknown (no context given)
    reserve: int | None  # prompt estimate + every choice's tokens, for the key's tokens-per-minute; None: unbounded
    inject: int | None = None  # a max_tokens the gateway writes into the request (it set none)


def budget_tokens(
    body: dict[str, object], path: str, body_bytes: int, *, limit: int | None, context: int | None
) -> TokenBudget:
    """The request's token budget on `path`, or the 400 that says which field is wrong."""
    values = {name: _positive(body, name) for name in (*_FIELDS, "n", "best_of")}
    for name in _FIELDS:
        value = values[name]
        if limit is not None and value is not None and value > limit:
            raise GatewayError(
                400,
                f"{name} is {value}; this gateway allows at most {limit}.",
                "invalid_request_error",
                "max_tokens_too_large",
                name,
            )
    prompt = estimate_prompt_tokens(body_bytes)
    if path == "/v1/embeddings":
        return TokenBudget(0, prompt)
    choices = max(values["n"] or 1, values["best_of"] or 1)
    inject = None
    if path == "/v1/completions":
        max_tokens = values["max_tokens"]
        if max_tokens is None:
            max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
            if limit is not None and limit < max_tokens:
                max_tokens = inject = limit
    else:
        max_tokens = values["max_completion_tokens"] or values["max_tokens"]
        if max_tokens is None:
            if limit is not None:
                max_tokens = inject = min(limit, context) if context is not None else limit
            else:
                max_tokens = context  # the engine's own default: to the end of the context
    if max_tokens is None:
        return TokenBudget(None, None)
    reserve = prompt + choices * max_tokens
    if context is not None:
        reserve = min(reserve, choices * context)  # prompt and answer together never pass the context
    return TokenBudget(max_tokens, reserve, inject)


def estimate_prompt_tokens(body_bytes: int) -> int:
    """A deliberately high guess from the body's size (about 4 bytes a token, JSON included), settled later."""
    return math.ceil(body_bytes / 4)


def _positive(body: dict[str, object], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GatewayError(
            400, f"{name} must be a positive integer (got {value!r}).", "invalid_request_error", "invalid_value", name
        )
    return value
