"""Qwen3-TTS-12Hz talker and code predictor in MLX (the same math, in the same order, as
`engine.torch.model`).

Parameters are plain `mx.array`s taken from a dict keyed by the checkpoint names (`engine.mlx.weights`
reads it). Linear weights are kept as [in, out] (`x @ w`): q/k/v and gate/up as one concatenated
matrix each (one product instead of several). `contiguous` copies them into that layout (the CPU
build's BLAS reads it 25-35 % faster than the transposed view, measured on the 2-core dev Xeon);
otherwise they stay transposed views of the checkpoint tensors (no copy; Metal reads either).

Shapes: B batch rows, T positions, H talker hidden, C predictor hidden, Hq/Hkv heads, D head dim.

- Talker: a Qwen3 decoder (q/k RMSNorm before RoPE, GQA, SwiGLU), 1-D RoPE (the three M-RoPE
  position rows are always equal, MODEL.md §1.2), a static KV cache with one row per stream slot
  (`TalkerCache`) and per-row positions, so streams at different lengths step together.
- Code predictor: its own decoder stack turning [talker hidden, emb(code0)] into codebooks 1..15,
  one position per codebook, with a fresh 16-position cache per frame (`PredictorCache`).

MLX is lazy: the functions here only build the graph; the runner evaluates each phase once,
together with the cache arrays, so a step's graph never outlives the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.config import TalkerConfig, TransformerConfig
from engine.prompt import Slot

Mask = mx.array | str | None  # bool [B, 1, T, Tk] (True = attend), "causal", or None (all visible)


def rope_inv_freq(head_dim: int, theta: float) -> mx.array:
    """1 / theta^(2i/D) in fp32 from the fp32 exponents torch's `rope_inv_freq` uses. The power is
    taken in float64 and rounded once, which lands within 1 ulp of torch's fp32 power."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    power = (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)
    return mx.array(np.float32(1.0) / power)


def rope_tables(positions: mx.array, inv_freq: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
    """cos/sin [B, 1, T, D] for integer positions [B, T] (rotate-half convention)."""
    freqs = positions[..., None].astype(mx.float32) * inv_freq  # [B, T, D/2]
    emb = mx.concatenate((freqs, freqs), axis=-1)[:, None]  # [B, 1, T, D]
    return mx.cos(emb).astype(dtype), mx.sin(emb).astype(dtype)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    rotated = mx.concatenate((-x[..., half:], x[..., :half]), axis=-1)
    return x * cos + rotated * sin


def linear_weight(parts: list[mx.array], contiguous: bool) -> mx.array:
    """Checkpoint linear weights [out_i, in] -> one [in, Σ out_i] matrix for `linear`."""
    w = (parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)).T
    return mx.contiguous(w) if contiguous else w


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x [..., in] @ weight [in, out] (+ bias)."""
    if bias is None:
        return x @ weight
    return mx.addmm(bias, x, weight)


def silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)


class KVStore:
    """What an attention layer writes its new keys/values to and reads the keys to attend from."""

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, Mask]:
        """Store k/v [B, Hkv, T, D]; return (keys, values, mask) to attend over."""
        raise NotImplementedError


@dataclass
class DecoderLayer:
    qkv: mx.array  # [hidden, Hq·D + 2·Hkv·D]: q_proj ‖ k_proj ‖ v_proj
    o_proj: mx.array  # [Hq·D, hidden]
    q_norm: mx.array  # [D]
    k_norm: mx.array  # [D]
    gate_up: mx.array  # [hidden, 2·I]: gate_proj ‖ up_proj
    down_proj: mx.array  # [I, hidden]
    input_norm: mx.array  # [hidden]
    post_attention_norm: mx.array  # [hidden]


class DecoderStack:
    """Qwen3 decoder layers + final norm; `run` returns the post-norm hidden states."""

    def __init__(self, cfg: TransformerConfig, w: dict[str, mx.array], prefix: str, contiguous: bool):
        self.cfg = cfg
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"{prefix}layers.{i}."
            a, m = p + "self_attn.", p + "mlp."
            layer = DecoderLayer(
                qkv=linear_weight([w.pop(a + f"{n}_proj.weight") for n in "qkv"], contiguous),
                o_proj=linear_weight([w.pop(a + "o_proj.weight")], contiguous),
                q_norm=w.pop(a + "q_norm.weight"),
                k_norm=w.pop(a + "k_norm.weight"),
                gate_up=linear_weight(
                    [w.pop(m + "gate_proj.weight"), w.pop(m + "up_proj.weight")], contiguous
                ),
                down_proj=linear_weight([w.pop(m + "down_proj.weight")], contiguous),
                input_norm=w.pop(p + "input_layernorm.weight"),
                post_attention_norm=w.pop(p + "post_attention_layernorm.weight"),
            )
            # Layer by layer, with the checkpoint's tensors popped: loading holds one copy of
            # the model plus one layer, never two copies.
            mx.eval(list(vars(layer).values()))
            self.layers.append(layer)
        self.norm = w.pop(prefix + "norm.weight")
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim

    def attention(
        self, layer: DecoderLayer, x: mx.array, rope: tuple[mx.array, mx.array], kv: KVStore, li: int
    ) -> mx.array:
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = linear(x, layer.qkv)
        q = qkv[..., : self.q_size].reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = qkv[..., self.q_size : self.q_size + self.kv_size].reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[..., self.q_size + self.kv_size :].reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q = mx.fast.rms_norm(q, layer.q_norm, cfg.rms_norm_eps).transpose(0, 2, 1, 3)
        k = mx.fast.rms_norm(k, layer.k_norm, cfg.rms_norm_eps).transpose(0, 2, 1, 3)
        v = v.transpose(0, 2, 1, 3)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H*, T, D]
        keys, values, mask = kv.update(li, k, v)
        # GQA natively: K/V keep their Hkv heads (no repeat).
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=cfg.head_dim**-0.5, mask=mask)
        return linear(out.transpose(0, 2, 1, 3).reshape(b, t, -1), layer.o_proj)

    def mlp(self, layer: DecoderLayer, x: mx.array) -> mx.array:
        gate, up = mx.split(linear(x, layer.gate_up), 2, axis=-1)
        return linear(silu(gate) * up, layer.down_proj)

    def run(
        self, x: mx.array, positions: mx.array, kv: KVStore, rope: tuple[mx.array, mx.array] | None = None
    ) -> mx.array:
        """x [B, T, hidden] at integer positions [B, T] -> post-norm hidden [B, T, hidden]."""
        if rope is None:
            rope = rope_tables(positions, self.inv_freq, x.dtype)
        eps = self.cfg.rms_norm_eps
        for i, layer in enumerate(self.layers):
            x = x + self.attention(layer, mx.fast.rms_norm(x, layer.input_norm, eps), rope, kv, i)
            x = x + self.mlp(layer, mx.fast.rms_norm(x, layer.post_attention_norm, eps))
        return mx.fast.rms_norm(x, self.norm, eps)


class CodePredictor:
    """Codebooks 1..15 of a frame from the talker hidden and codebook 0 (MODEL.md §1.3)."""

    def __init__(self, cfg: TalkerConfig, w: dict[str, mx.array], contiguous: bool):
        cp = cfg.code_predictor
        self.cfg = cp.transformer
        self.num_groups = cp.num_code_groups
        self.model = DecoderStack(cp.transformer, w, "code_predictor.model.", contiguous)
        groups = range(cp.num_code_groups - 1)
        # Width of the *talker*: these embeddings also form the talker's next input.
        self.codec_embedding = [w.pop(f"code_predictor.model.codec_embedding.{g}.weight") for g in groups]
        self.lm_head = [
            linear_weight([w.pop(f"code_predictor.lm_head.{g}.weight")], contiguous) for g in groups
        ]
        # 1.7B: the talker is wider (2048) than the predictor (1024); same width: identity.
        self.projection: tuple[mx.array, mx.array] | None = None
        if "code_predictor.small_to_mtp_projection.weight" in w:
            self.projection = (
                linear_weight([w.pop("code_predictor.small_to_mtp_projection.weight")], contiguous),
                w.pop("code_predictor.small_to_mtp_projection.bias"),
            )
        all_pos = mx.arange(self.num_groups)[None]  # every frame uses positions 0..15
        self.all_pos = all_pos
        self.rope = rope_tables(all_pos, self.model.inv_freq, self.codec_embedding[0].dtype)  # [1,1,16,D]

    def project(self, x: mx.array) -> mx.array:
        return x if self.projection is None else linear(x, *self.projection)

    def predict(
        self, talker_hidden: mx.array, code0_embedding: mx.array, choose: Callable[[int, mx.array], mx.array]
    ) -> tuple[mx.array, mx.array]:
        """Codebooks 1..15 of one frame for B rows.

        talker_hidden [B, H]: the talker's post-norm hidden at the position that produced code0.
        code0_embedding [B, H]: the talker's codec embedding of code0.
        choose(g, logits [B, V]) -> codes [B]: picks codebook g+1 (sampling lives outside).
        Returns (codes [B, 15], their codebook embeddings [B, 15, H]).
        """
        cache = PredictorCache()
        x = mx.stack((talker_hidden, code0_embedding), axis=1)  # [B, 2, H]
        cos, sin = self.rope
        codes: list[mx.array] = []
        embs: list[mx.array] = []
        for g in range(self.num_groups - 1):
            p0, p1 = cache.length, cache.length + x.shape[1]
            rope = (cos[:, :, p0:p1], sin[:, :, p0:p1])
            h = self.model.run(self.project(x), self.all_pos[:, p0:p1], cache, rope)
            cache.length = p1
            code = choose(g, linear(h[:, -1], self.lm_head[g]))  # [B]
            codes.append(code)
            e = self.codec_embedding[g][code]  # [B, H]
            embs.append(e)
            x = e[:, None]
        return mx.stack(codes, axis=1), mx.stack(embs, axis=1)


class Talker:
    """Text/codec embeddings, the talker stack, its codebook-0 head and the code predictor."""

    def __init__(self, cfg: TalkerConfig, w: dict[str, mx.array], *, contiguous: bool):
        """Takes (pops) its tensors from `w`, keyed as in the checkpoint without `talker.`."""
        self.cfg = cfg
        self.model = DecoderStack(cfg.transformer, w, "model.", contiguous)
        self.codec_embedding = w.pop("model.codec_embedding.weight")  # [V, H]
        self.text_embedding = w.pop("model.text_embedding.weight")  # [text V, text H]
        self.fc1, self.fc2 = (
            (
                linear_weight([w.pop(f"text_projection.{n}.weight")], contiguous),
                w.pop(f"text_projection.{n}.bias"),
            )
            for n in ("linear_fc1", "linear_fc2")
        )
        self.codec_head_weight = linear_weight([w.pop("codec_head.weight")], contiguous)  # [H, V]
        self.code_predictor = CodePredictor(cfg, w, contiguous)
        self.dtype = self.codec_embedding.dtype

    def embed_text(self, ids: mx.array) -> mx.array:
        """text_projection(text_embedding(ids)) = fc2(silu(fc1(x))): [...] -> [..., H]."""
        return linear(silu(linear(self.text_embedding[ids], *self.fc1)), *self.fc2)

    def embed_codec(self, ids: mx.array) -> mx.array:
        return self.codec_embedding[ids]

    def embed_frames(self, codes: mx.array) -> mx.array:
        """Σ_q E_q(codes[..., q]) for codes [..., 16]: the codec-track input of a frame."""
        parts = [self.codec_embedding[codes[..., 0]]]
        parts += [emb[codes[..., q + 1]] for q, emb in enumerate(self.code_predictor.codec_embedding)]
        return mx.stack(parts, axis=-2).sum(-2)  # one stacked sum, as the official code adds

    def codec_head(self, hidden: mx.array) -> mx.array:
        return linear(hidden, self.codec_head_weight)

    def embed_slots(
        self, slots: list[Slot], xvector: np.ndarray | None = None, ref_codes: np.ndarray | None = None
    ) -> mx.array:
        """Prefill input [P, H]: per slot, text part + codec part + x-vector + reference frame.

        Absent parts are exact zeros, so the left-to-right sum adds in torch's order."""
        n, hidden = len(slots), self.codec_embedding.shape[1]

        def part(positions: list[int], values: Callable[[], mx.array]) -> mx.array | None:
            if not positions:
                return None
            out = mx.zeros((n, hidden), dtype=self.dtype)
            out[mx.array(positions)] = values()
            return out

        text_pos = [i for i, s in enumerate(slots) if s.text is not None]
        codec_pos = [i for i, s in enumerate(slots) if s.codec is not None]
        spk_pos = [i for i, s in enumerate(slots) if s.speaker]
        ref_pos = [i for i, s in enumerate(slots) if s.ref_frame is not None]
        if spk_pos and xvector is None:
            raise ValueError("the prompt has a speaker slot but the voice has no x-vector")
        if ref_pos and ref_codes is None:
            raise ValueError("the prompt has reference frames but the voice has no reference codes")
        parts = [
            part(text_pos, lambda: self.embed_text(mx.array([slots[i].text for i in text_pos]))),
            part(codec_pos, lambda: self.embed_codec(mx.array([slots[i].codec for i in codec_pos]))),
            part(
                spk_pos, lambda: mx.broadcast_to(mx.array(xvector).astype(self.dtype), (len(spk_pos), hidden))
            ),
            part(
                ref_pos,
                lambda: self.embed_frames(
                    mx.array(np.stack([ref_codes[slots[i].ref_frame] for i in ref_pos]))
                ),  # type: ignore[index]
            ),
        ]
        x = mx.zeros((n, hidden), dtype=self.dtype)
        for p in parts:
            if p is not None:
                x = x + p
        return x

    def forward_hidden(self, x: mx.array, positions: mx.array, kv: KVStore) -> mx.array:
        """x [B, T, H] at positions [B, T] -> post-norm hidden [B, T, H]."""
        return self.model.run(x, positions, kv)


# ---- KV caches --------------------------------------------------------------------------------


class TalkerCache:
    """Static per-slot KV cache: layer -> [slots, Hkv, capacity, D], one row per stream.

    A step runs on a contiguous range of rows [r0, r1); each row has its own position. Rows in the
    range that sit the step out may be computed, but their writes land at their own next free
    position and are overwritten when they really run. Writes are slice/scatter assignments that
    rebind `k[layer]`/`v[layer]`; MLX reuses the old buffer when nothing else holds it, so a
    step costs its new tokens, not a copy of the cache.
    """

    def __init__(self, cfg: TransformerConfig, slots: int, capacity: int, dtype: mx.Dtype):
        shape = (slots, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = [mx.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [mx.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]
        self.capacity = capacity
        mx.eval(self.k, self.v)

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    def arrays(self) -> list[mx.array]:
        """Every layer's keys and values (to evaluate with a phase's outputs)."""
        return [*self.k, *self.v]

    def bind(self, r0: int, r1: int, positions: np.ndarray) -> RowSpanStore:
        """Target the next forward at rows [r0, r1), whose new tokens sit at positions [B, T]."""
        return RowSpanStore(self, r0, r1, positions)

    def prefill(self, rows: list[int]) -> PrefillStore:
        """Target a prefill of new prompts at any rows (positions 0..T-1 each)."""
        return PrefillStore(self, rows)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy a stream's first `length` cached positions to another row (slot compaction)."""
        for cache in (self.k, self.v):
            for i, c in enumerate(cache):
                c[dst, :, :length] = c[src, :, :length]
                cache[i] = c
        mx.eval(self.arrays())

    def grow(self, capacity: int) -> None:
        """Reallocate every layer with a larger position capacity, keeping the contents."""
        if capacity <= self.capacity:
            return
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                s, h, _, d = old.shape
                cache[i] = mx.concatenate(
                    (old, mx.zeros((s, h, capacity - self.capacity, d), old.dtype)), axis=2
                )
                mx.eval(cache[i])  # one layer at a time: never two copies of the whole cache
        self.capacity = capacity


class RowSpanStore(KVStore):
    """A forward over rows [r0, r1) of a TalkerCache at per-row positions [B, T]."""

    def __init__(self, cache: TalkerCache, r0: int, r1: int, positions: np.ndarray):
        self.cache, self.r0, self.r1 = cache, r0, r1
        self.pos = np.asarray(positions, dtype=np.int64)  # [B, T]
        self.span = int(self.pos.max()) + 1
        if self.span > cache.capacity or not 0 <= r0 < r1 <= cache.slots:
            # MLX does not bounds-check scatters: refuse here instead of corrupting another row.
            raise ValueError(f"rows [{r0}, {r1}) at positions < {self.span} do not fit the cache")
        keys = np.arange(self.span)
        # A query at position p sees keys 0..p of its own row.
        self.mask = mx.array(keys[None, None, None, :] <= self.pos[:, None, :, None])  # [B, 1, T, span]
        self.rows = mx.arange(r0, r1)
        self.pos0 = mx.array(self.pos[:, 0])

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, Mask]:
        c = self.cache
        t = k.shape[2]
        kc, vc = c.k[layer], c.v[layer]
        if t == 1:
            kc[self.rows, :, self.pos0] = k[:, :, 0]
            vc[self.rows, :, self.pos0] = v[:, :, 0]
        else:  # one contiguous run of positions per row
            for i in range(k.shape[0]):
                p0 = int(self.pos[i, 0])
                kc[self.r0 + i, :, p0 : p0 + t] = k[i]
                vc[self.r0 + i, :, p0 : p0 + t] = v[i]
        c.k[layer], c.v[layer] = kc, vc
        return kc[self.r0 : self.r1, :, : self.span], vc[self.r0 : self.r1, :, : self.span], self.mask


class PrefillStore(KVStore):
    """Prefill of new prompts: attention over the new tokens only (causal), keys/values written
    to the streams' cache rows at positions 0..T-1. Any rows, no gathering of old cache."""

    def __init__(self, cache: TalkerCache, rows: list[int]):
        self.cache, self.rows = cache, mx.array(rows)
        self.bad_rows = [r for r in rows if not 0 <= r < cache.slots]

    def _check(self, t: int) -> None:
        if t > self.cache.capacity or self.bad_rows:  # MLX does not bounds-check scatters
            raise ValueError(
                f"a {t}-position prefill into rows {self.bad_rows or '...'} does not fit the cache"
            )

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, Mask]:
        t = k.shape[2]
        self._check(t)
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[self.rows, :, :t] = k
        vc[self.rows, :, :t] = v
        self.cache.k[layer], self.cache.v[layer] = kc, vc
        return k, v, "causal"  # T queries over the same T keys: plain causal


class PredictorCache(KVStore):
    """Fresh per frame: every row is at the same position, 16 positions at most."""

    def __init__(self) -> None:
        self.k: dict[int, mx.array] = {}
        self.v: dict[int, mx.array] = {}
        self.length = 0

    def update(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, Mask]:
        if self.length:
            k = mx.concatenate((self.k[layer], k), axis=2)
            v = mx.concatenate((self.v[layer], v), axis=2)
        self.k[layer], self.v[layer] = k, v
        # Only the first (2-position) pass has more than one query: causal over those two.
        return k, v, ("causal" if self.length == 0 and k.shape[2] > 1 else None)
