"""What each request asks: synthetic prompts of fixed or uniformly drawn lengths, an optional shared
prefix (as RAG and system prompts share one), or prompts from a JSONL file or the bundled set."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from deploykit.core.errors import UsageError

# A word that most tokenizers count as one token, so that a prompt of N words is about N tokens.
_WORD = " hello"
_PREFIX_WORD = " context"


@dataclass(frozen=True)
class Lengths:
    """A token count: fixed (low == high) or drawn uniformly from [low, high]."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str | int) -> Lengths:
        """'128' -> fixed; '64:256' -> uniform between the two."""
        try:
            low, _, high = str(text).partition(":")
            lengths = cls(int(low), int(high or low))
        except ValueError as e:
            raise UsageError(f"'{text}' is not a token length.", "Write 128, or 64:256 for a uniform range.") from e
        if not 1 <= lengths.low <= lengths.high:
            raise UsageError(f"'{text}' is not a token length.", "Lengths are at least 1, low before high.")
        return lengths

    def draw(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)


@dataclass(frozen=True)
class Prompt:
    text: str
    max_tokens: int


class Workload:
    def __init__(
        self,
        input_tokens: Lengths,
        output_tokens: Lengths,
        shared_prefix_tokens: int = 0,
        prompts: list[Prompt] | None = None,
        seed: int = 0,
    ) -> None:
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.prefix = (
            ("Shared context:" + _PREFIX_WORD * (shared_prefix_tokens - 1) + "\n") if shared_prefix_tokens else ""
        )
        self.prompts = prompts
        self.rng = random.Random(seed)

    def next(self) -> Prompt:
        if self.prompts:
            return self.prompts[self.rng.randrange(len(self.prompts))]
        return self.sized(self.input_tokens.draw(self.rng), self.output_tokens.draw(self.rng))

    def sized(self, input_tokens: int, output_tokens: int) -> Prompt:
        """A synthetic prompt of about `input_tokens` tokens (with the shared prefix, if any)."""
        return Prompt(self.prefix + "Count:" + _WORD * max(input_tokens - 1, 0), output_tokens)


def load_prompts(source: str, default_max_tokens: int) -> list[Prompt]:
    """Prompts from a JSONL file ({"prompt": ..., "max_tokens": ...} per line), or `bundled`."""
    if source == "bundled":
        text = resources.files("deploykit.loadtests").joinpath("prompts.jsonl").read_text()
        where = "the bundled prompt set"
    else:
        try:
            text = Path(source).read_text()
        except OSError as e:
            raise UsageError(f"Cannot read the prompt file {source}: {e.strerror}.") from e
        where = source
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompts.append(Prompt(str(item["prompt"]), int(item.get("max_tokens", default_max_tokens))))
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(
                f"Line {number} of {where} is not a prompt: {e}.", 'Each line is {"prompt": "...", "max_tokens": 64}.'
            ) from e
    if not prompts:
        raise UsageError(f"{where} holds no prompts.")
    return prompts
