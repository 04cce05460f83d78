"""Speech to text through the gateway: OpenAI's /v1/audio/transcriptions and /v1/audio/translations, whose
bodies are multipart forms (the audio file, the model's name, options), relayed as they came to the engine
that serves the named model (vLLM serves Whisper-class models on these routes).

The gateway reads the form only for what it needs: `model`, to route and to check the key's scope, and the
file's length in seconds, which the key's audio quota (`keys create --audio-spm`) reserves. A WAV file's
header says its length exactly; for other formats the reservation assumes 32 kbit/s (most speech codecs at
usual settings use more bits a second, so the guess is long), and when the engine answers with its own
count (vLLM's usage {"type": "duration", "seconds": N}), the quota and the ledger are settled to it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import Message

from deploykit.serve.gateway.errors import GatewayError

AUDIO_PATHS = ("/v1/audio/transcriptions", "/v1/audio/translations")
_GUESS_BYTES_PER_S = 4000  # 32 kbit/s


@dataclass(frozen=True)
class AudioForm:
    model: str
    seconds: float  # the file's length: exact for WAV, else a generous guess from its size
    exact: bool


async def read_form(raw: bytes, content_type: str | None) -> AudioForm:
    """The model and the audio's length from a multipart body, or the 400 that says what is missing."""
    if not (content_type or "").startswith("multipart/form-data"):
        raise _bad("An audio request is a multipart/form-data body with the file and the model.", None)

    async def receive() -> Message:
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", (content_type or "").encode())]}
    try:
        form = await Request(scope, receive).form(max_files=1, max_fields=32)
    except Exception as e:  # the multipart parser's own errors: a body that does not parse
        raise _bad(f"The multipart body does not parse: {e}.", None) from e
    model, upload = form.get("model"), form.get("file")
    if not isinstance(model, str) or not model:
        raise _bad("The form needs a 'model' field.", "model")
    if not isinstance(upload, UploadFile):
        raise _bad("The form needs the audio as a 'file' field.", "file")
    data = await upload.read()
    await form.close()
    seconds = wav_seconds(data)
    return AudioForm(model, seconds if seconds is not None else len(data) / _GUESS_BYTES_PER_S, seconds is not None)


def wav_seconds(data: bytes) -> float | None:
    """The length of a RIFF/WAVE file from its header (data chunk bytes / byte rate), or None if it is not one."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset, byte_rate = 12, None
    while offset + 8 <= len(data):
        chunk, size = data[offset : offset + 4], struct.unpack_from("<I", data, offset + 4)[0]
        if chunk == b"fmt " and size >= 16 and offset + 24 <= len(data):
            byte_rate = struct.unpack_from("<I", data, offset + 16)[0]
        elif chunk == b"data":
            if not byte_rate:
                return None
            return float(min(size, len(data) - offset - 8) / byte_rate)  # a streamed WAV may declare more than it has
        offset += 8 + size + (size & 1)  # chunks are padded to an even length
    return None


def _bad(message: str, param: str | None) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", "invalid_audio_request", param)
