"""The request bodies in the gateway's OpenAPI document (for /docs, client generators and fuzzing).

The gateway passes bodies to the engine untouched, so these models only describe them: they are never
used to parse a request. The `model` field lists the models this gateway serves.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(description="A model this gateway serves (GET /v1/models).")


class _Generation(_Request):
    max_tokens: int | None = Field(None, ge=1, description="The most tokens to generate.")
    stream: bool = Field(False, description="Stream server-sent events.")
    stream_options: dict[str, Any] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    ignore_eos: bool | None = Field(None, description="vLLM: keep generating past the end-of-sequence token.")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Generation):
    prompt: str | list[str]


class EmbeddingRequest(_Request):
    input: str | list[str]


REQUEST_BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}


def _audio_form(models: list[str]) -> dict[str, Any]:
    """OpenAI's audio form, as far as the gateway reads or vLLM takes it."""
    return {
        "type": "object",
        "required": ["file", "model"],
        "properties": {
            "file": {"type": "string", "format": "binary", "description": "The audio (WAV, MP3, FLAC...)."},
            "model": {"type": "string", "enum": models},
            "language": {"type": "string"},
            "prompt": {"type": "string"},
            "response_format": {"type": "string", "enum": ["json", "text", "srt", "verbose_json", "vtt"]},
            "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        },
    }


def install_openapi(app: FastAPI, models: list[str]) -> None:
    """Describe each model route's body in app.openapi(), with `model` limited to what is served."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, body in REQUEST_BODIES.items():
                definition = body.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(definition.pop("$defs", {}))
                definition["properties"]["model"]["enum"] = models
                components[body.__name__] = definition
                schema["paths"][path]["post"]["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}},
                }
            for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
                schema["paths"][path]["post"]["requestBody"] = {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": _audio_form(models)}},
                }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
