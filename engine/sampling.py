"""Sampling: per-stream parameters and the official logits pipeline, batched over rows.

Talker (codebook 0), in the order of transformers' `generate` (MODEL.md §4.2), in fp32:
repetition penalty over the codebook-0 ids generated so far in the utterance -> EOS masked for
the first 2 tokens -> ids 2048..3071 except EOS suppressed -> [sampling only] temperature ->
top-k -> top-p -> softmax -> multinomial. Greedy (`temperature == 0`) takes the argmax after the
first three steps, as `do_sample=False` does. The code predictor uses the same warpers with its
own parameters and no penalty, suppression or EOS rule.

This module holds the parameters and their bounds (no tensor library); each backend implements
the pipeline (`engine/torch/sampler.py`, `engine/mlx/sampler.py`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

from engine.config import GenerationConfig

MIN_NEW_TOKENS = 2  # EOS is blocked for the first two codebook-0 tokens of an utterance

# Documented bounds of the user-facing sampling knobs (docs/PROTOCOL.md). Every transport checks
# them at parse time with `check_sampling`, so a value that would overflow the sampler (a
# temperature of 1e-300 turns logits into inf, a top_k of 2**63 overflows int64) is refused
# before a stream exists, never discovered inside a batched step that other streams share.
TEMPERATURE_MIN = 0.01  # besides exactly 0 (greedy)
TEMPERATURE_MAX = 10.0
TOP_K_MAX = 65536  # 0 disables top-k; values above the vocabulary keep every token
REPETITION_PENALTY_MIN = 0.1
REPETITION_PENALTY_MAX = 10.0
SEED_MAX = 2**64  # exclusive


class SamplingError(ValueError):
    """A sampling parameter is out of range."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-stream sampling. `temperature == 0` is greedy for the talker and the code predictor."""

    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    subtalker_temperature: float = 0.9
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def from_generation_config(cls, gc: GenerationConfig) -> SamplingParams:
        return cls(
            temperature=gc.temperature if gc.do_sample else 0.0,
            top_k=gc.top_k,
            top_p=gc.top_p,
            repetition_penalty=gc.repetition_penalty,
            subtalker_temperature=gc.subtalker_temperature if gc.subtalker_dosample else 0.0,
            subtalker_top_k=gc.subtalker_top_k,
            subtalker_top_p=gc.subtalker_top_p,
        )

    def with_overrides(self, **kw: Any) -> SamplingParams:
        """Apply user overrides. temperature/top_k/top_p set both stages unless the
        subtalker_* field is given too: a user who asks for greedy means the whole frame."""
        kw = {k: v for k, v in kw.items() if v is not None}
        for name in ("temperature", "top_k", "top_p"):
            if name in kw and f"subtalker_{name}" not in kw:
                kw[f"subtalker_{name}"] = kw[name]
        out = replace(self, **kw)
        out.validate()
        return out

    def validate(self) -> None:
        for prefix in ("", "subtalker_"):
            check_sampling(
                temperature=getattr(self, f"{prefix}temperature"),
                top_k=getattr(self, f"{prefix}top_k"),
                top_p=getattr(self, f"{prefix}top_p"),
                prefix=prefix,
            )
        check_sampling(repetition_penalty=self.repetition_penalty, seed=self.seed)

    def seed_value(self) -> int:
        """The seed of the stream's generator: `seed`, or a fresh random one when None."""
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_sampling(
    *,
    temperature: Any = None,
    top_k: Any = None,
    top_p: Any = None,
    repetition_penalty: Any = None,
    seed: Any = None,
    prefix: str = "",
) -> None:
    """Refuse a sampling value outside its documented bounds (None = not given).

    Raises SamplingError naming the field and its range; the message is safe to show a client.
    """
    t = temperature
    if t is not None and not (_is_number(t) and (t == 0 or TEMPERATURE_MIN <= t <= TEMPERATURE_MAX)):
        raise SamplingError(
            f"{prefix}temperature must be 0 (greedy) or a number in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}]"
        )
    k = top_k
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= TOP_K_MAX):
        raise SamplingError(f"{prefix}top_k must be an integer in [0, {TOP_K_MAX}] (0 disables it)")
    p = top_p
    if p is not None and not (_is_number(p) and 0.0 < p <= 1.0):
        raise SamplingError(f"{prefix}top_p must be a number in (0, 1]")
    r = repetition_penalty
    if r is not None and not (_is_number(r) and REPETITION_PENALTY_MIN <= r <= REPETITION_PENALTY_MAX):
        raise SamplingError(
            f"repetition_penalty must be a number in [{REPETITION_PENALTY_MIN}, {REPETITION_PENALTY_MAX}]"
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_MAX):
        raise SamplingError("seed must be an integer in [0, 2**64)")
