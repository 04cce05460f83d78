"""Every error a user can hit, each with a hint that says what to do and an exit code scripts can trust.

    DeploykitError                  exit 1
    ├── UsageError                  exit 2   bad flag values or combinations
    ├── NotFoundError               exit 3
    │   ├── UnknownModelError                a model name neither in the store nor in the catalog
    │   └── GatedModelError                  a gated hub repo whose licence was not accepted
    ├── ResourceError               exit 4
    │   ├── PortInUseError
    │   ├── NotEnoughMemoryError
    │   └── NotEnoughDiskError
    ├── MissingDependencyError      exit 5   an optional part (the engine, GGUF support) not installed
    ├── ServiceError                exit 6   something deploykit runs or talks to failed
    │   ├── EngineStartError                 the engine exited or timed out before it was ready
    │   ├── EngineDiedError                  the engine exited while serving
    │   ├── EndpointError                    an OpenAI-compatible endpoint could not be reached or erred
    │   ├── HubUnreachableError              the Hugging Face hub (or HF_ENDPOINT) could not be reached
    │   ├── CorruptDownloadError             a downloaded file does not match the hub's size or sha256
    │   └── LoadTestError                    the load generator or one of its workers failed
    ├── ModelImportError            exit 7
    └── LockError                   exit 8   a model differs from deploykit.lock (or the lock is unusable)

The library raises these; only the CLI entry point prints them. The gateway's errors are for HTTP clients
instead (serve/gateway/errors.py: an OpenAI-shaped body and a status code).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DeploykitError(Exception):
    """Root of every error deploykit reports to a user."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "", details: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = list(details)


class UsageError(DeploykitError):
    exit_code = 2


class NotFoundError(DeploykitError):
    exit_code = 3


class UnknownModelError(NotFoundError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        known = sorted(set(known))
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        if close:
            hint = "Did you mean: " + ", ".join(close) + "?"
        elif known:
            hint = "Known models: " + ", ".join(known) + "."
        else:
            hint = "No models are known yet."
        hint += " `deploykit models search` lists the catalog; `deploykit pull ORG/REPO` takes any hub repo."
        super().__init__(f"Unknown model '{name}'.", hint)
        self.name = name
        self.close_matches = close


class ResourceError(DeploykitError):
    exit_code = 4


class PortInUseError(ResourceError):
    def __init__(
        self, host: str, port: int, hint: str = "Stop the process that holds it, or choose another port with --port."
    ) -> None:
        super().__init__(f"Port {port} on {host} is already in use.", hint)


class NotEnoughMemoryError(ResourceError):
    pass


class MissingDependencyError(DeploykitError):
    exit_code = 5


class NotEnoughDiskError(ResourceError):
    pass


class GatedModelError(NotFoundError):
    pass


class ServiceError(DeploykitError):
    exit_code = 6


class EngineStartError(ServiceError):
    pass


class EngineDiedError(ServiceError):
    pass


class EndpointError(ServiceError):
    pass


class HubUnreachableError(ServiceError):
    pass


class CorruptDownloadError(ServiceError):
    pass


class LoadTestError(ServiceError):
    pass


class ModelImportError(DeploykitError):
    exit_code = 7


class LockError(DeploykitError):
    exit_code = 8
