"""Helpers shared by the gateway's unit tests."""

from __future__ import annotations

import httpx
from fastapi import FastAPI


def client_of(app: FastAPI, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway", headers=headers)


def chat(**extra: object) -> dict[str, object]:
    return {"model": "m1", "messages": [{"role": "user", "content": "Capital of France?"}], **extra}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error
