"""Spill-over: a managed OpenAI-compatible (or Azure OpenAI) endpoint that takes a model's requests when
the local replicas cannot, or should not: none is ready, their queue is too deep, or their recent TTFT is
too slow. Off unless configured; what spills is recorded in the ledger at the endpoint's real price.

    --spill smollm2-135m=gpt-4o-mini@https://api.openai.com/v1
    --spill smollm2-135m=gpt-4o-mini@https://RES.openai.azure.com/openai/deployments/DEP?api-version=2024-06-01
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from deploykit.core.errors import UsageError
from deploykit.models.prices import Prices
from deploykit.serve.accounting.budgets import Price
from deploykit.serve.gateway.routing import Model

KEY_ENV = "DEPLOYKIT_SPILL_API_KEY"


@dataclass(frozen=True)
class SpillTarget:
    model: str  # the local model it stands in for
    remote_model: str  # the model (or Azure deployment) name to ask for there
    url: str  # base URL, without the /chat/completions part; Azure's api-version stays in `query`
    query: str
    api_key: str
    azure: bool
    input_per_mtok: float
    output_per_mtok: float
    max_queue: int | None = None  # spill when ready replicas have this many requests each on average
    max_ttft_s: float | None = None  # spill when the model's recent TTFT is above this

    def headers(self) -> dict[str, str]:
        return {"api-key": self.api_key} if self.azure else {"authorization": f"Bearer {self.api_key}"}

    def endpoint(self, path: str) -> str:
        """The full URL for an OpenAI path such as /v1/chat/completions."""
        tail = path.removeprefix("/v1")
        return f"{self.url}{tail}" + (f"?{self.query}" if self.query else "")

    def body(self, body: dict[str, object]) -> bytes:
        """The request as the managed API wants it: its model name, no vLLM-only fields."""
        clean = {k: v for k, v in body.items() if k not in ("ignore_eos", "priority")}
        return json.dumps({**clean, "model": self.remote_model}).encode()

    @property
    def price(self) -> Price:
        return Price(self.input_per_mtok, self.output_per_mtok)

    def takes(self, model: Model) -> str | None:
        """Why this request should spill over (None: serve it locally)."""
        ready = [r for r in model.replicas if r.status == "ready"]
        if not ready:
            return "no local replica is ready"
        if self.max_queue is not None and sum(r.outstanding for r in ready) / len(ready) >= self.max_queue:
            return "the local queue is full"
        if self.max_ttft_s is not None and model.recent_ttft_s is not None and model.recent_ttft_s > self.max_ttft_s:
            return "local TTFT is above the limit"
        return None


def parse_spill(
    spec: str,
    prices: Prices,
    api_key: str | None,
    *,
    max_queue: int | None = None,
    max_ttft_s: float | None = None,
) -> SpillTarget:
    """MODEL=REMOTE_MODEL@URL -> a target; `api_key` is the managed API's (Settings.spill_api_key, from
    DEPLOYKIT_SPILL_API_KEY), the price the price data's under REMOTE_MODEL's name."""
    model, sep, rest = spec.partition("=")
    remote, at, url = rest.partition("@")
    if not (sep and at and model and remote and url.startswith(("http://", "https://"))):
        raise UsageError(
            f"--spill '{spec}' is not MODEL=REMOTE_MODEL@URL.",
            "For example: --spill smollm2-135m=gpt-4o-mini@https://api.openai.com/v1",
        )
    key = api_key or ""
    if not key:
        raise UsageError(f"--spill needs the managed API's key in {KEY_ENV}.", f"export {KEY_ENV}=...")
    price = prices.find(remote)
    parts = urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
    return SpillTarget(
        model=model,
        remote_model=remote,
        url=base,
        query=parts.query,
        api_key=key,
        azure="/openai/deployments/" in parts.path,
        input_per_mtok=price.input_per_mtok,
        output_per_mtok=price.output_per_mtok,
        max_queue=max_queue,
        max_ttft_s=max_ttft_s,
    )
