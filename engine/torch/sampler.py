"""The official sampling pipeline in torch, batched over rows (see `engine.sampling`).

Each row has its own parameters and its own `torch.Generator`, so a stream samples the same
values whether it runs alone or in a batch (the per-row multinomial call consumes the generator
exactly like the official batch-1 call consumes the global one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.sampling import SamplingParams


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(params.seed_value() % (2**63))
    return g


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
