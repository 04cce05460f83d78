"""Helpers shared by the gateway's unit tests."""

from __future__ import annotations

import httpx
from fastapi import FastAPI


def client_of(app: FastAPI, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=headers)


def chat(**extra: object) -> dict[str, object]:
    return {"model": "m1", "messages": [{"role": "user", "content": "Capital of France?"}], **extra}


# The error type OpenAI's API sends with each status.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


def assert_openai_error(
    response: httpx.Response, status: int, code: str | None = None, message: str | None = None
) -> dict[str, object]:
    """The response is OpenAI's error shape with this status (and code, and message where given: what a
    client shows its user)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] if message is None else error["message"] == message
    if status in _OPENAI_TYPES:  # OpenAI's clients read `type`; a 429 says which limit instead
        assert error["type"] == _OPENAI_TYPES[status], error
    if code is not None:
        assert error["code"] == code
    return error
