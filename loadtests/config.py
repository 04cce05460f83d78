"""One typed description of a load test: the target, the requests, the load shape, the SLOs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deploykit.loadtests.workload import Lengths, Workload, load_prompts


class LoadTestConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str  # base URL of an OpenAI-compatible server (with or without /v1), or an Azure OpenAI resource
    model: str
    api: Literal["chat", "completions"] = "chat"
    stream: bool = True
    api_key: str | None = None
    azure_deployment: str | None = None  # Azure OpenAI: deployment name; the api-key header carries the key
    azure_api_version: str = "2024-10-21"
    vllm: bool = True  # the server is vLLM (deploykit, vLLM): ask for ignore_eos and per-chunk usage
    input_tokens: str = "128"  # fixed, or "64:256" for a uniform draw per request
    output_tokens: str = "64"
    # sent with every request: 0 is greedy, as vLLM's own benchmarks run; None leaves the server's default
    # (which a deployment may set, e.g. from the model card) and so makes the run depend on it
    temperature: float | None = Field(0.0, ge=0)
    shared_prefix_tokens: int = Field(0, ge=0)  # a prefix every synthetic prompt shares
    prompts: str | None = None  # a JSONL prompt file, or "bundled"; replaces the synthetic prompts
    tokenizer: str | None = None  # tokenizer.json (or its folder) to count tokens a server does not report
    concurrency: int | None = Field(None, ge=1)  # closed loop: this many users, each one request at a time
    # chat conversations of this many turns: each turn sends the whole conversation so far (its answers
    # included) plus a new prompt, so the context grows and a server's prefix cache can show
    turns: int = Field(1, ge=1)
    rate: float | None = Field(None, gt=0)  # open loop: arrivals per second (Poisson, or gamma: burstiness)
    # the gamma shape of the gaps between arrivals at `rate` (vLLM's benchmark convention): 1 is Poisson,
    # below 1 burstier (arrivals bunch up, then pause), above 1 more even
    burstiness: float = Field(1.0, gt=0)
    trace: str | None = None  # open loop: replay a trace file's arrivals and lengths (loadtests/traces.py)
    trace_speed: float = Field(1.0, gt=0)  # replay the trace this many times faster
    trace_part: tuple[int, int] = (0, 1)  # (k, n): this process replays the trace's requests i with i % n == k
    max_in_flight: int = Field(256, ge=1)  # open loop: the users that carry the arrivals
    duration_s: float = Field(30.0, gt=0)
    max_requests: int | None = Field(None, ge=1)
    warmup_s: float = Field(0.0, ge=0)
    cooldown_s: float = Field(0.0, ge=0)
    timeout_s: float = Field(600.0, gt=0)
    slos: str = ""  # e.g. "ttft_p95=1s,tpot_p95=50ms"
    max_schedule_lag_s: float = 0.010  # a generator later than this at p99 makes the run invalid
    processes: int = Field(1, ge=1)  # load-generator processes; their records are merged into one report
    # the processes run elsewhere (`deploykit loadtest worker HOST:PORT`, e.g. pods) and connect to this master
    # on every interface at this port, instead of being started here
    master_port: int | None = Field(None, ge=1, le=65535)
    seed: int = 0
    hardware: str | None = None  # what the server runs on ("cpu", "l4", "h100-sxm:2"), for sizing calibration
    engine_version: str | None = None  # the server's engine version, as its /version said before the run

    @field_validator("input_tokens", "output_tokens", mode="before")
    @classmethod
    def _lengths(cls, value: object) -> str:
        Lengths.parse(str(value))  # a usage error now, not in the load generator
        return str(value)

    @model_validator(mode="after")
    def _one_shape(self) -> LoadTestConfig:
        if sum(x is not None for x in (self.concurrency, self.rate, self.trace)) != 1:
            raise ValueError("give exactly one of concurrency (closed loop), rate or trace (open loop)")
        if self.turns > 1 and (self.api != "chat" or self.concurrency is None):
            raise ValueError("conversations (turns > 1) need the chat API and a closed loop (concurrency)")
        if self.concurrency is not None and self.concurrency < self.processes:
            raise ValueError(f"{self.processes} processes need a concurrency of at least {self.processes}")
        return self

    def split(self) -> list[LoadTestConfig]:
        """One config per load-generator process, together giving this config's load."""
        n = self.processes
        parts = []
        for i in range(n):
            update: dict[str, object] = {"processes": 1, "seed": self.seed * 1000 + i}
            if self.concurrency is not None:
                update["concurrency"] = self.concurrency // n + (1 if i < self.concurrency % n else 0)
            else:
                if self.rate is not None:
                    update["rate"] = self.rate / n
                else:
                    update["trace_part"] = (i, n)
                update["max_in_flight"] = max(1, self.max_in_flight // n)
            if self.max_requests is not None:
                update["max_requests"] = max(1, self.max_requests // n + (1 if i < self.max_requests % n else 0))
            parts.append(self.model_copy(update=update))
        return parts

    def workload(self) -> Workload:
        output = Lengths.parse(self.output_tokens)
        prompts = load_prompts(self.prompts, output.high) if self.prompts else None
        return Workload(Lengths.parse(self.input_tokens), output, self.shared_prefix_tokens, prompts, self.seed)

    @property
    def users(self) -> int:
        return self.concurrency if self.concurrency is not None else self.max_in_flight

    def path(self) -> str:
        kind = "chat/completions" if self.api == "chat" else "completions"
        if self.azure_deployment:
            return f"/openai/deployments/{self.azure_deployment}/{kind}?api-version={self.azure_api_version}"
        return ("" if self.url.rstrip("/").endswith("/v1") else "/v1") + f"/{kind}"

    def headers(self) -> dict[str, str]:
        if not self.api_key:
            return {}
        return {"api-key": self.api_key} if self.azure_deployment else {"Authorization": f"Bearer {self.api_key}"}
