"""Sampling: per-stream parameters and the official logits pipeline, batched over rows.

Talker (codebook 0), in the order of transformers' `generate` (MODEL.md §4.2), in fp32:
repetition penalty over the codebook-0 ids generated so far in the utterance -> EOS masked for
the first 2 tokens -> ids 2048..3071 except EOS suppressed -> [sampling only] temperature ->
top-k -> top-p -> softmax -> multinomial. Greedy (`temperature == 0`) takes the argmax after the
first three steps, as `do_sample=False` does. The code predictor uses the same warpers with its
own parameters and no penalty, suppression or EOS rule.

Each row has its own parameters and its own `torch.Generator`, so a stream samples the same
values whether it runs alone or in a batch (the per-row multinomial call consumes the generator
exactly like the official batch-1 call consumes the global one).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

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

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        g = torch.Generator(device=device)
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        g.manual_seed(seed % (2**63))
        return g


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


def suppress_mask(vocab_size: int, eos_id: int, device: torch.device | str) -> Tensor:
    """bool [V]: the talker may only emit codebook-0 codes (ids < V-1024) or EOS."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[vocab_size - 1024 :] = True
    mask[eos_id] = False
    return mask


def talker_processors(
    logits: Tensor, seen: Tensor, penalty: Tensor, block_eos: Tensor, suppress: Tensor, eos_id: int
) -> Tensor:
    """Logits processors of the talker (no warpers).

    logits [B, V]; seen bool [B, V] (codebook-0 ids generated in the utterance); penalty [B];
    block_eos bool [B] (fewer than MIN_NEW_TOKENS tokens so far); suppress bool [V].
    """
    s = logits.float()
    p = penalty[:, None].to(s.dtype)
    s = torch.where(seen, torch.where(s < 0, s * p, s / p), s)
    s = s.masked_fill(
        block_eos[:, None] & (torch.arange(s.shape[1], device=s.device) == eos_id), -float("inf")
    )
    return s.masked_fill(suppress, -float("inf"))


def warp(
    logits: Tensor,
    temperature: Tensor,
    top_k: Tensor,
    top_p: Tensor,
    *,
    use_top_k: bool = True,
    use_top_p: bool = True,
) -> Tensor:
    """Temperature -> top-k -> top-p with per-row parameters [B] (transformers' warpers).

    Rows with top_k == 0 or top_p == 1 skip that warper, as transformers does. `use_top_k` /
    `use_top_p` False (known on the host: no row uses it) skip the work altogether.
    """
    s = logits / temperature[:, None].to(logits.dtype)
    if use_top_k:
        k = top_k.clamp(min=1, max=s.shape[1])
        kth = torch.topk(s, int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        s = s.masked_fill((s < kth) & (top_k > 0)[:, None], -float("inf"))
    if not use_top_p:
        return s
    sorted_s, order = torch.sort(s, descending=False)
    cum = sorted_s.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p[:, None].to(cum.dtype))
    remove_sorted[:, -1] = False  # keep at least one token
    remove_sorted &= (top_p < 1.0)[:, None]
    return s.masked_fill(remove_sorted.scatter(1, order, remove_sorted), -float("inf"))


def _safe_probs(probs: Tensor, fallback: Tensor) -> Tensor:
    """Rows whose distribution is not a distribution (NaN or inf from overflowing logits, or
    every token masked) become one-hot at the row's argmax, so `multinomial` never raises and
    one bad row cannot fail a batch. Pure tensor ops: no host sync."""
    bad = ~torch.isfinite(probs).all(dim=-1) | ~(probs.sum(dim=-1) > 0)  # [B]
    one_hot = torch.nn.functional.one_hot(fallback, probs.shape[-1]).to(probs.dtype)
    return torch.where(bad[:, None], one_hot, probs)


class RowSampler:
    """The per-row parameters of one sampling stage for a fixed set of rows.

    Built on the host once per batch composition, so choosing ids needs no device->host sync
    beyond what the caller asks for.
    """

    def __init__(self, params: list[tuple[float, int, float]], generators: list[torch.Generator], device):
        self.sample_rows = [i for i, (t, _, _) in enumerate(params) if t > 0]
        self.generators = generators
        if self.sample_rows:
            rows = [params[i] for i in self.sample_rows]
            self.index = torch.tensor(self.sample_rows, device=device)
            self.temperature = torch.tensor([r[0] for r in rows], dtype=torch.float32, device=device)
            self.top_k = torch.tensor([r[1] for r in rows], dtype=torch.long, device=device)
            self.top_p = torch.tensor([r[2] for r in rows], dtype=torch.float32, device=device)
            self.all_rows = len(self.sample_rows) == len(params)
            self.use_top_k = any(r[1] > 0 for r in rows)
            self.use_top_p = any(r[2] < 1.0 for r in rows)

    def __call__(self, logits: Tensor) -> Tensor:
        """One id per row: argmax for greedy rows, a warped multinomial draw for the others."""
        out = logits.argmax(dim=-1)
        if not self.sample_rows:
            return out
        sub = logits if self.all_rows else logits[self.index]
        warped = warp(
            sub.float(),
            self.temperature,
            self.top_k,
            self.top_p,
            use_top_k=self.use_top_k,
            use_top_p=self.use_top_p,
        )
        probs = _safe_probs(warped.softmax(dim=-1), out if self.all_rows else out[self.index])
        for j, row in enumerate(self.sample_rows):
            out[row] = torch.multinomial(probs[j : j + 1], 1, generator=self.generators[row])[0, 0]
        return out
