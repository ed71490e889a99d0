"""A reproducible synthetic workload: prompt and output lengths drawn from seeded distributions.

Prompts are sent as token ids, not text, so a prompt of N tokens is exactly N tokens whatever
the tokenizer, and two requests that share a prefix share it token for token (which is what
the prefix cache matches on). Request i is a pure function of (spec, i): every sweep point and
every rerun sees the same requests in the same order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class LengthDistribution:
    """fixed:N | uniform:LO:HI | normal:MEAN:STDDEV (clipped to >= 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str, what: str) -> "LengthDistribution":
        parts = text.split(":")
        try:
            numbers = [float(p) for p in parts[1:]]
        except ValueError:
            raise UsageError(f"{what}: {text!r} is not KIND:NUMBERS") from None
        kind = parts[0]
        if kind == "fixed" and len(numbers) == 1 and numbers[0] >= 1:
            return cls("fixed", numbers[0])
        if kind == "uniform" and len(numbers) == 2 and 1 <= numbers[0] <= numbers[1]:
            return cls("uniform", numbers[0], numbers[1])
        if kind == "normal" and len(numbers) == 2 and numbers[0] >= 1 and numbers[1] >= 0:
            return cls("normal", numbers[0], numbers[1])
        raise UsageError(f"{what}: {text!r} must be fixed:N, uniform:LO:HI (1 <= LO <= HI) "
                         "or normal:MEAN:STDDEV (MEAN >= 1)")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.a
        elif self.kind == "uniform":
            value = rng.uniform(self.a, self.b)
        else:
            value = rng.gauss(self.a, self.b)
        return max(1, round(value))

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.a:g}"
        return f"{self.kind}:{self.a:g}:{self.b:g}"


@dataclass(frozen=True)
class WorkloadSpec:
    prompt_len: LengthDistribution = LengthDistribution("fixed", 128)
    output_len: LengthDistribution = LengthDistribution("fixed", 64)
    # Tokens every prompt starts with (counted in prompt_len); 0 disables.
    shared_prefix_len: int = 0
    seed: int = 0
    # Token ids are drawn from [low, high): small ids exist in every vocabulary.
    token_id_low: int = 16
    token_id_high: int = 500

    def __post_init__(self) -> None:
        if self.shared_prefix_len < 0:
            raise UsageError(f"--shared-prefix must be >= 0, got {self.shared_prefix_len}")
        if not 0 <= self.token_id_low < self.token_id_high:
            raise UsageError("--token-ids must be LOW:HIGH with 0 <= LOW < HIGH")

    def describe(self) -> dict:
        return {"prompt_len": self.prompt_len.describe(), "output_len": self.output_len.describe(),
                "shared_prefix_len": self.shared_prefix_len, "seed": self.seed,
                "token_ids": [self.token_id_low, self.token_id_high]}


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt_token_ids: list[int]
    max_tokens: int


class Workload:
    def __init__(self, spec: WorkloadSpec):
        self.spec = spec
        prefix_rng = random.Random(f"prefix-{spec.seed}")
        self.prefix = [self._token(prefix_rng) for _ in range(spec.shared_prefix_len)]

    def _token(self, rng: random.Random) -> int:
        return rng.randrange(self.spec.token_id_low, self.spec.token_id_high)

    def request(self, index: int) -> RequestSpec:
        rng = random.Random(f"request-{self.spec.seed}-{index}")
        prompt_len = max(self.spec.prompt_len.sample(rng), len(self.prefix) + 1)
        max_tokens = self.spec.output_len.sample(rng)
        own = [self._token(rng) for _ in range(prompt_len - len(self.prefix))]
        return RequestSpec(index, self.prefix + own, max_tokens)
