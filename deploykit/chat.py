"""A chat client for any OpenAI-compatible endpoint, streaming the answer token by token."""

from __future__ import annotations

from collections.abc import Iterator

import openai

from deploykit.core.errors import DeploykitError, EndpointError, NotFoundError


def connect(url: str, api_key: str | None, timeout: float = 600.0) -> openai.OpenAI:
    base = url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return openai.OpenAI(base_url=base, api_key=api_key or "none", timeout=timeout, max_retries=0)


def pick_model(client: openai.OpenAI, model: str | None) -> str:
    """The model asked for, or the endpoint's only (first) model."""
    if model:
        return model
    try:
        models = [m.id for m in client.models.list()]
    except openai.OpenAIError as e:
        raise _wrap(e, str(client.base_url)) from e
    if not models:
        raise NotFoundError(f"{client.base_url} serves no models.", "Pass --model.")
    return models[0]


def stream_chat(client: openai.OpenAI, model: str, messages: list[dict[str, str]], **params: object) -> Iterator[str]:
    """Yield the assistant's answer as it streams in."""
    try:
        stream = client.chat.completions.create(model=model, messages=messages, stream=True, **params)  # type: ignore[call-overload]
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
    except openai.OpenAIError as e:
        raise _wrap(e, str(client.base_url)) from e


def _wrap(e: openai.OpenAIError, url: str) -> DeploykitError:
    if isinstance(e, openai.APIConnectionError):
        return EndpointError(f"Cannot reach {url}.", "Is `deploykit serve` running? Check --url.")
    if isinstance(e, openai.AuthenticationError):
        return EndpointError(f"{url} refused the API key.", "Pass --api-key or set OPENAI_API_KEY.")
    if isinstance(e, openai.APIStatusError):
        body = e.body.get("message") if isinstance(e.body, dict) else None
        message = f"{url} answered {e.status_code}: {body or e.message}"
        if isinstance(e, openai.NotFoundError):
            return NotFoundError(message, "`deploykit chat` without --model uses the endpoint's model.")
        return EndpointError(message)
    return EndpointError(f"{url}: {e}")
