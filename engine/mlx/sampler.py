"""The official sampling pipeline in MLX, batched over rows (see `engine.sampling`).

The processors and warpers are `engine.torch.sampler`'s, op for op. Each row draws from its own
random key (`RowRng`), split once per draw, so a stream samples the same values whether it runs
alone or in a batch, and a key is a value: a snapshot is the key itself and restoring it replays
the same draws. Draws are Gumbel-max (what `mx.random.categorical` does), so the whole pipeline
stays lazy: a code-predictor frame's 15 draws need no host sync between them.
"""

from __future__ import annotations

import mlx.core as mx

from engine.sampling import SamplingParams


class RowRng:
    """One stream's random state: an MLX PRNG key, split on every draw."""

    def __init__(self, seed: int):
        self.key = mx.random.key(seed)  # the full 64-bit seed: [hi, lo] uint32
        # Made in the caller's thread (a stream opens anywhere), drawn in the worker's: evaluate
        # now, as a lazy array can only be evaluated on the stream of the thread that built it.
        mx.eval(self.key)

    @classmethod
    def from_params(cls, params: SamplingParams) -> RowRng:
        return cls(params.seed_value() % (2**64))

    def next_key(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub

    def snapshot(self) -> mx.array:
        return self.key

    def restore(self, snapshot: mx.array) -> None:
        self.key = snapshot


def suppress_mask(vocab_size: int, eos_id: int) -> mx.array:
    """bool [V]: the talker may only emit codebook-0 codes (ids < V-1024) or EOS."""
    ids = mx.arange(vocab_size)
    return (ids >= vocab_size - 1024) & (ids != eos_id)


def talker_processors(
    logits: mx.array, seen: mx.array, penalty: mx.array, block_eos: mx.array, suppress: mx.array, eos_id: int
) -> mx.array:
    """Logits processors of the talker (no warpers), in fp32.

    logits [B, V]; seen bool [B, V] (codebook-0 ids generated in the utterance); penalty [B];
    block_eos bool [B] (fewer than MIN_NEW_TOKENS tokens so far); suppress bool [V].
    """
    s = logits.astype(mx.float32)
    p = penalty[:, None].astype(s.dtype)
    s = mx.where(seen, mx.where(s < 0, s * p, s / p), s)
    neg_inf = mx.array(-float("inf"), dtype=s.dtype)
    s = mx.where(block_eos[:, None] & (mx.arange(s.shape[1]) == eos_id), neg_inf, s)
    return mx.where(suppress, neg_inf, s)


def warp(
    logits: mx.array,
    temperature: mx.array,
    top_k: mx.array,
    top_p: mx.array,
    *,
    use_top_k: bool = True,
    use_top_p: bool = True,
) -> mx.array:
    """Temperature -> top-k -> top-p with per-row parameters [B] (transformers' warpers).

    Rows with top_k == 0 or top_p == 1 skip that warper. `use_top_k` / `use_top_p` False (no row
    uses it, known on the host) skip the work altogether.
    """
    neg_inf = mx.array(-float("inf"), dtype=mx.float32)
    s = logits / temperature[:, None].astype(logits.dtype)
    vocab = s.shape[1]
    if use_top_k:
        k = mx.clip(top_k, 1, vocab)
        k_max = int(mx.max(k).item())
        top = mx.sort(mx.topk(s, k_max, axis=-1), axis=-1)  # the k_max largest, ascending
        kth = mx.take_along_axis(top, (k_max - k)[:, None], axis=1)  # the k-th largest per row
        s = mx.where((s < kth) & (top_k > 0)[:, None], neg_inf, s)
    if not use_top_p:
        return s
    order = mx.argsort(s, axis=-1)  # ascending
    sorted_s = mx.take_along_axis(s, order, axis=-1)
    cum = mx.cumsum(mx.softmax(sorted_s, axis=-1), axis=-1)
    remove_sorted = cum <= (1 - top_p[:, None].astype(cum.dtype))
    keep_last = mx.arange(vocab) == vocab - 1  # keep at least one token
    remove_sorted = remove_sorted & ~keep_last & (top_p < 1.0)[:, None]
    remove = mx.put_along_axis(mx.zeros(s.shape, dtype=mx.bool_), order, remove_sorted, axis=-1)
    return mx.where(remove, neg_inf, s)


def safe_choice(probs: mx.array, sampled: mx.array, fallback: mx.array) -> mx.array:
    """Rows whose distribution is not a distribution (NaN or inf from overflowing logits, or
    every token masked) take the row's argmax, so one bad row cannot fail a batch."""
    bad = ~mx.all(mx.isfinite(probs), axis=-1) | ~(mx.sum(probs, axis=-1) > 0)  # [B]
    return mx.where(bad, fallback, sampled)


class RowSampler:
    """The per-row parameters of one sampling stage for a fixed set of rows.

    `params[i]` = (temperature, top_k, top_p) of row i; `rngs[i]` its random state (only rows
    with temperature > 0 draw, so a greedy row never advances its key).
    """

    def __init__(self, params: list[tuple[float, int, float]], rngs: list[RowRng]):
        self.sample_rows = [i for i, (t, _, _) in enumerate(params) if t > 0]
        self.rngs = [rngs[i] for i in self.sample_rows]
        if self.sample_rows:
            rows = [params[i] for i in self.sample_rows]
            self.index = mx.array(self.sample_rows)
            self.temperature = mx.array([r[0] for r in rows], dtype=mx.float32)
            self.top_k = mx.array([r[1] for r in rows], dtype=mx.int32)
            self.top_p = mx.array([r[2] for r in rows], dtype=mx.float32)
            self.all_rows = len(self.sample_rows) == len(params)
            self.use_top_k = any(r[1] > 0 for r in rows)
            self.use_top_p = any(r[2] < 1.0 for r in rows)

    def keys(self) -> list[mx.array]:
        """The drawing rows' current keys (to evaluate with the phase's outputs)."""
        return [r.key for r in self.rngs]

    def __call__(self, logits: mx.array) -> mx.array:
        """One id per row [B] (uint32): argmax for greedy rows, a warped draw for the others."""
        out = mx.argmax(logits, axis=-1)
        if not self.sample_rows:
            return out
        sub = logits if self.all_rows else logits[self.index]
        warped = warp(
            sub.astype(mx.float32),
            self.temperature,
            self.top_k,
            self.top_p,
            use_top_k=self.use_top_k,
            use_top_p=self.use_top_p,
        )
        vocab = warped.shape[-1]
        # Gumbel-max per row from the row's own key: argmax(logits + G) ~ softmax(logits).
        noise = mx.stack([mx.random.gumbel((vocab,), key=r.next_key()) for r in self.rngs])
        drawn = mx.argmax(warped + noise, axis=-1)
        probs = mx.softmax(warped, axis=-1)
        fallback = out if self.all_rows else out[self.index]
        chosen = safe_choice(probs, drawn, fallback)
        if self.all_rows:
            return chosen
        out[self.index] = chosen
        return out
