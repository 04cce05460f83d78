"""Speech to text on real processes: `deploykit serve --engine whisper=...` in front of a fake engine process
(a Whisper-class engine's answers without the model), a key made with `keys create --audio-spm`, the
official openai client sending a WAV file, and `deploykit usage` reading the seconds from the ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from deploykit.core.ports import free_port
from tests.fakes.engine import SPEECH
from tests.unit.test_audio import tone
from tests.waiting import ready, until

REPO = Path(__file__).resolve().parents[2]


def test_transcriptions_through_the_gateway_with_the_official_client(tmp_path: Path) -> None:
    env = {**os.environ, "DEPLOYKIT_HOME": str(tmp_path)}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "deploykit", *args], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    token = json.loads(cli("keys", "create", "--name", "captions", "--audio-spm", "5", "--json"))["key"]
    engine_port, port = free_port(), free_port()
    fake = [sys.executable, "-m", "tests.fakes.engine", "--model", "whisper", "--port", str(engine_port)]
    engine = subprocess.Popen(fake, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    serve = [sys.executable, "-m", "deploykit", "serve", "--auth", "--port", str(port)]
    gateway = subprocess.Popen([*serve, f"--engine=whisper=http://127.0.0.1:{engine_port}"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    audio = tmp_path / "hello.wav"
    audio.write_bytes(tone(3.0))
    try:
        until(lambda: ready(f"http://127.0.0.1:{port}"), "never ready")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0)
        with audio.open("rb") as f:
            assert client.audio.transcriptions.create(model="whisper", file=f).text == SPEECH
        with audio.open("rb") as f, pytest.raises(openai.RateLimitError) as limited:
            client.audio.translations.create(model="whisper", file=f)  # 3 + 3 > 5 s a minute
        assert "5 audio_seconds per minute" in str(limited.value)
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)
        engine.kill()
        engine.wait()
    usage = json.loads(cli("usage", "--by", "key", "--json"))
    assert usage["total"]["audio_seconds"] == 3.0 and usage["total"]["requests"] == 2
