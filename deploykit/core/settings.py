"""Settings read from the environment (prefix DEPLOYKIT_), built once at the edge and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where deploykit keeps its files, and the secrets it reads from the environment rather than from flags
    (flags show in `ps`). The gateway's address has flags with their own DEPLOYKIT_HOST / DEPLOYKIT_PORT."""

    model_config = SettingsConfigDict(env_prefix="DEPLOYKIT_", frozen=True)

    home: Path = Field(default_factory=lambda: Path.home() / ".deploykit")
    debug: bool = False  # DEPLOYKIT_DEBUG=1: tracebacks instead of one message
    # API keys and the usage ledger; default sqlite:///<home>/deploykit.db, or postgresql://... to share
    database_url: str | None = None
    # With API keys on, the Bearer token that Prometheus (or an operator) sends for /metrics, /docs and
    # /ready's details; unset, those answer only on loopback.
    metrics_token: str | None = Field(default=None, repr=False)
    # The managed API's key for `serve --spill`; sent only to that endpoint.
    spill_api_key: str | None = Field(default=None, repr=False)

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'deploykit.db'}"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def lock_path(self) -> Path:
        """deploykit.lock when no --lock-file names another (DEPLOYKIT_LOCK sets that flag too)."""
        return self.home / "deploykit.lock"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"
