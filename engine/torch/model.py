"""Qwen3-TTS-12Hz talker and code predictor in plain PyTorch.

Module and parameter names follow the official checkpoint (`talker.model.layers.0.self_attn.
q_proj.weight`, ...), so `model.safetensors` loads with `load_state_dict(strict=True)`.

Shapes: B batch rows, T positions, H talker hidden, C predictor hidden, Hq/Hkv heads, D head dim.

- Talker: a Qwen3 decoder (q/k RMSNorm before RoPE, GQA, SwiGLU). Its "3-D M-RoPE" is plain 1-D
  RoPE here because the three position rows are always equal (MODEL.md §1.2). It keeps a static
  KV cache with one row per stream slot (`TalkerCache`) and per-row positions, so streams at
  different lengths step together.
- Code predictor: 5 decoder layers that turn [talker hidden, emb(code0)] into codebooks 1..15,
  one position per codebook, with a fresh 16-position cache per frame (`PredictorCache`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import CodePredictorConfig, ModelConfig, TalkerConfig, TransformerConfig
from engine.prompt import Slot
from engine.torch.layers import RMSNorm


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_tables(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin [B, 1, T, D] for integer positions [B, T] (rotate-half convention)."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class KVStore:
    """What an attention layer writes its new keys/values to and reads the keys to attend from."""

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store k/v [B, Hkv, T, D]; return (keys, values, mask) to attend over.

        mask: bool [B, 1, T, Tk] (True = attend), or None when every stored key is visible.
        """
        raise NotImplementedError


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Grouped-query attention. q [B, Hq, T, D], k/v [B, Hkv, Tk, D] -> [B, Hq, T, D]."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    if t == 1:
        # One query per row (decode): fold the query heads of each KV group into the query
        # axis, so K/V are read once per group instead of being repeated for every head.
        out = F.scaled_dot_product_attention(q.view(b, hkv, group, d), k, v, attn_mask=mask)
        return out.view(b, hq, 1, d)
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FusedLinear(nn.Module):
    """Linear layers that read the same input, as one matrix product (inference only).

    On CPU the weight is stored as `groups` column blocks [G, in, out/G] and multiplied with one
    batched GEMM: MKL runs a GEMM with a handful of rows (one row per stream) on a single thread
    at a fraction of memory bandwidth, while the batched form spreads the column blocks over
    all threads. Measured on the 2-core dev CPU for a 28-layer 0.6B talker stack: 1.2x faster
    at 1 row and 1.6-2.5x at 2-8 rows than F.linear; 32 blocks beat 8 and 16 for the whole
    0.6B model (batch 8 step 601 vs 696 ms). On CUDA (groups=1) it is a plain F.linear
    of the concatenated weights: one kernel instead of several.
    """

    def __init__(self, linears: list[nn.Linear], groups: int = 1):
        super().__init__()
        weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)  # [out, in]
        self.out_features, self.in_features = weight.shape
        self.splits = [lin.out_features for lin in linears]
        biases = [lin.bias for lin in linears]
        self.bias: Tensor | None = (
            torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None  # type: ignore[misc]
        )
        self.groups = groups if groups > 1 and self.out_features % groups == 0 else 1
        if self.groups > 1:
            g = self.groups
            self.weight = (
                weight.t().reshape(self.in_features, g, self.out_features // g).permute(1, 0, 2).contiguous()
            )
        else:
            self.weight = weight.contiguous()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.groups > 1:
            m = x2.shape[0]
            y = torch.bmm(x2.expand(self.groups, m, self.in_features), self.weight)  # [G, M, out/G]
            y = y.transpose(0, 1).reshape(m, self.out_features)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x2, self.weight, self.bias)
        return y.view(*lead, self.out_features)

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self(x).split(self.splits, dim=-1))


def fuse_linears(module: nn.Module, groups: int) -> None:
    """Replace every plain nn.Linear below `module` by its FusedLinear form (one weight each)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, FusedLinear([child], groups))
        else:
            fuse_linears(child, groups)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def fuse(self, groups: int) -> None:
        """Inference form: q/k/v as one product (the separate weights are dropped)."""
        self.qkv = FusedLinear([self.q_proj, self.k_proj, self.v_proj], groups)
        del self.q_proj, self.k_proj, self.v_proj
        if self.q_norm.eps != self.k_norm.eps:
            raise ValueError("q_norm and k_norm must share eps to run as one norm")
        # The q and k norm gains per head, [Hq + Hkv, D], for the one-pass norm in forward.
        qk_weight = torch.cat(
            (
                self.q_norm.weight.detach().expand(self.num_heads, -1),
                self.k_norm.weight.detach().expand(self.num_kv_heads, -1),
            )
        )
        self.register_buffer("qk_norm_weight", qk_weight, persistent=False)
        self.o_proj = FusedLinear([self.o_proj], groups)  # type: ignore[assignment]

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], kv: KVStore, layer: int) -> Tensor:
        b, t, _ = x.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = rope
        if hasattr(self, "qkv"):
            # Inference form: q and k heads normalized and rotated in one pass each (half the
            # small ops of a decode step). Per element the same products as below: every head's
            # norm reduces over its own D values and scales by its own weight row.
            heads = self.qkv(x).view(b, t, hq + 2 * hkv, d)
            qk = F.rms_norm(heads[:, :, : hq + hkv].float(), (d,), eps=self.q_norm.eps)
            qk = self.qk_norm_weight * qk.to(x.dtype)  # [B, T, Hq + Hkv, D]
            qk = apply_rope(qk, cos.transpose(1, 2), sin.transpose(1, 2))
            q, k = qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2)
            v = heads[:, :, hq + hkv :].transpose(1, 2)
        else:
            q = self.q_norm(self.q_proj(x).view(b, t, hq, d)).transpose(1, 2)
            k = self.k_norm(self.k_proj(x).view(b, t, hkv, d)).transpose(1, 2)
            v = self.v_proj(x).view(b, t, hkv, d).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H*, T, D]
        keys, values, mask = kv.update(layer, k, v)
        out = attend(q, keys, values, mask)  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def fuse(self, groups: int) -> None:
        """Inference form: gate and up as one product (the separate weights are dropped)."""
        self.gate_up = FusedLinear([self.gate_proj, self.up_proj], groups)
        del self.gate_proj, self.up_proj
        self.down_proj = FusedLinear([self.down_proj], groups)  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_up"):
            gate, up = self.gate_up.split(x)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], kv: KVStore, layer: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """Layers + final norm; `forward` returns the post-norm hidden states."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)
        self.rope = (cfg.head_dim, cfg.rope_theta)

    def rebuild_buffers(self, device: torch.device) -> None:
        """Recompute the RoPE table (not stored in checkpoints; meta after a meta-device build)."""
        self.inv_freq = rope_inv_freq(*self.rope).to(device)

    def run(
        self, x: Tensor, positions: Tensor, kv: KVStore, rope: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        if rope is None:
            rope = rope_tables(positions, self.inv_freq, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, kv, i)
        return self.norm(x)


class TalkerBody(DecoderStack):
    def __init__(self, cfg: TalkerConfig):
        super().__init__(cfg.transformer)
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer.hidden_size)
        self.text_embedding = nn.Embedding(cfg.text_vocab_size, cfg.text_hidden_size)


class TextProjection(nn.Module):
    """Maps a text embedding (2048) to the talker width: fc2(silu(fc1(x)))."""

    def __init__(self, text_hidden: int, hidden: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(text_hidden, text_hidden, bias=True)
        self.linear_fc2 = nn.Linear(text_hidden, hidden, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


class PredictorBody(DecoderStack):
    def __init__(self, cfg: CodePredictorConfig, talker_hidden: int):
        super().__init__(cfg.transformer)
        # Width of the *talker*: these embeddings also form the talker's next input.
        self.codec_embedding = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, talker_hidden) for _ in range(cfg.num_code_groups - 1)
        )


class CodePredictor(nn.Module):
    def __init__(self, cfg: CodePredictorConfig, talker_hidden: int):
        super().__init__()
        self.model = PredictorBody(cfg, talker_hidden)
        hidden = cfg.transformer.hidden_size
        self.lm_head = nn.ModuleList(
            nn.Linear(hidden, cfg.vocab_size, bias=False) for _ in range(cfg.num_code_groups - 1)
        )
        # 1.7B: the talker is wider (2048) than the predictor (1024).
        self.small_to_mtp_projection: nn.Module = (
            nn.Linear(talker_hidden, hidden, bias=True) if hidden != talker_hidden else nn.Identity()
        )
        self.num_groups = cfg.num_code_groups
        self.cfg = cfg.transformer

    def predict(
        self,
        talker_hidden: Tensor,
        code0_embedding: Tensor,
        choose: Callable[[int, Tensor], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """Codebooks 1..15 of one frame for B rows.

        talker_hidden [B, H]: the talker's post-norm hidden at the position that produced code0.
        code0_embedding [B, H]: talker.codec_embedding(code0).
        choose(g, logits [B, V]) -> codes [B]: picks codebook g+1 (sampling lives outside).
        Returns (codes [B, 15], their 15 codebook embeddings [B, 15, H]).
        """
        b = talker_hidden.shape[0]
        cache = PredictorCache(self.cfg, b, self.num_groups, talker_hidden.device, talker_hidden.dtype)
        x = torch.stack((talker_hidden, code0_embedding), dim=1)  # [B, 2, H]
        # Every frame uses positions 0..15: one RoPE table, sliced per pass (broadcast over rows).
        all_pos = torch.arange(self.num_groups, device=x.device)[None]
        cos, sin = rope_tables(all_pos, self.model.inv_freq, x.dtype)  # [1, 1, 16, D]
        codes: list[Tensor] = []
        embs: list[Tensor] = []
        for g in range(self.num_groups - 1):
            p0, p1 = cache.length, cache.length + x.shape[1]
            rope = (cos[:, :, p0:p1], sin[:, :, p0:p1])
            h = self.model.run(self.small_to_mtp_projection(x), all_pos[:, p0:p1], cache, rope)
            cache.advance(x.shape[1])
            code = choose(g, self.lm_head[g](h[:, -1]))  # [B]
            codes.append(code)
            e = self.model.codec_embedding[g](code)  # [B, H]
            embs.append(e)
            x = e[:, None]
        return torch.stack(codes, dim=1), torch.stack(embs, dim=1)


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TalkerBody(cfg)
        self.text_projection = TextProjection(cfg.text_hidden_size, cfg.transformer.hidden_size)
        self.codec_head = nn.Linear(cfg.transformer.hidden_size, cfg.vocab_size, bias=False)
        self.code_predictor = CodePredictor(cfg.code_predictor, cfg.transformer.hidden_size)

    @torch.no_grad()
    def to_inference(self, groups: int = 1) -> Talker:
        """Switch to the inference form: fused q/k/v and gate/up products and every linear in
        the layout fastest for the device (see FusedLinear). The checkpoint layout is gone after
        this (so is training); outputs are unchanged up to float summation order."""
        for m in self.modules():
            if isinstance(m, (Attention, MLP)):
                m.fuse(groups)
        fuse_linears(self, groups)
        self.prepared = True
        return self

    def embed_text(self, ids: Tensor) -> Tensor:
        return self.text_projection(self.model.text_embedding(ids))

    def embed_codec(self, ids: Tensor) -> Tensor:
        return self.model.codec_embedding(ids)

    def embed_frames(self, codes: Tensor) -> Tensor:
        """Σ_q E_q(codes[..., q]) for codes [..., 16]: the codec-track input of a frame."""
        parts = [self.model.codec_embedding(codes[..., 0])]
        parts += [emb(codes[..., q + 1]) for q, emb in enumerate(self.code_predictor.model.codec_embedding)]
        # One stacked sum (not a running sum) to add in the same order as the official code.
        return torch.stack(parts, dim=-2).sum(-2)

    def embed_slots(
        self, slots: list[Slot], xvector: Tensor | None = None, ref_codes: Tensor | None = None
    ) -> Tensor:
        """Prefill input [1, P, H]: per slot, the sum of its text-track and codec-track parts."""
        w = self.model.codec_embedding.weight
        x = torch.zeros(len(slots), w.shape[1], device=w.device, dtype=w.dtype)
        text_pos = [i for i, s in enumerate(slots) if s.text is not None]
        if text_pos:
            ids = torch.tensor([slots[i].text for i in text_pos], device=w.device)
            x[text_pos] = self.embed_text(ids[None])[0]
        codec_pos = [i for i, s in enumerate(slots) if s.codec is not None]
        if codec_pos:
            ids = torch.tensor([slots[i].codec for i in codec_pos], device=w.device)
            x[codec_pos] = x[codec_pos] + self.embed_codec(ids)
        spk_pos = [i for i, s in enumerate(slots) if s.speaker]
        if spk_pos:
            if xvector is None:
                raise ValueError("the prompt has a speaker slot but the voice has no x-vector")
            x[spk_pos] = x[spk_pos] + xvector.to(device=w.device, dtype=w.dtype)
        ref_pos = [i for i, s in enumerate(slots) if s.ref_frame is not None]
        if ref_pos:
            if ref_codes is None:
                raise ValueError("the prompt has reference frames but the voice has no reference codes")
            frames = torch.stack([ref_codes[slots[i].ref_frame] for i in ref_pos]).to(w.device)  # [n, 16]
            x[ref_pos] = x[ref_pos] + self.embed_frames(frames)
        return x[None]

    def forward_hidden(self, x: Tensor, positions: Tensor, kv: KVStore) -> Tensor:
        """x [B, T, H] at positions [B, T] -> post-norm hidden [B, T, H]."""
        return self.model.run(x, positions, kv)


class Qwen3TTS(nn.Module):
    """Root module: `talker.*` (and `speaker_encoder.*` for Base checkpoints, loaded separately)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.talker = Talker(cfg.talker)


# ---- KV caches --------------------------------------------------------------------------------


class TalkerCache(KVStore):
    """Static per-slot KV cache: layer -> [slots, Hkv, capacity, D], one row per stream.

    A step runs on a contiguous range of rows [r0, r1) (a view, no gather); each row has its own
    position. Rows in the range that sit the step out (stalled streams) may be computed, but
    their writes land at their own next free position and are overwritten when they really run.
    """

    def __init__(
        self, cfg: TransformerConfig, slots: int, capacity: int, device: torch.device, dtype: torch.dtype
    ):
        shape = (slots, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.capacity = capacity
        self._rows = slice(0, 0)
        self._pos: Tensor | None = None
        self._span = 0
        self._mask: Tensor | None = None

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    def bind(self, rows: slice, positions: Tensor) -> TalkerCache:
        """Target the next forward at `rows`, whose new tokens sit at positions [B, T]."""
        self._rows, self._pos = rows, positions
        self._span = int(positions.max()) + 1
        keys = torch.arange(self._span, device=positions.device)
        # A query at position p sees keys 0..p of its own row.
        self._mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, span]
        return self

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        assert self._pos is not None
        kc, vc = self.k[layer][self._rows], self.v[layer][self._rows]  # views
        b, _, t, _ = k.shape
        if t == 1:
            idx = torch.arange(b, device=k.device)
            kc[idx, :, self._pos[:, 0]] = k[:, :, 0]
            vc[idx, :, self._pos[:, 0]] = v[:, :, 0]
        else:  # prefill: one contiguous run of positions per row
            for i in range(b):
                p0 = int(self._pos[i, 0])
                kc[i, :, p0 : p0 + t] = k[i]
                vc[i, :, p0 : p0 + t] = v[i]
        return kc[:, :, : self._span], vc[:, :, : self._span], self._mask

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy a stream's first `length` cached positions to another row (slot compaction)."""
        for kc, vc in zip(self.k, self.v, strict=True):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]

    def grow(self, capacity: int) -> None:
        """Reallocate every layer with a larger position capacity, keeping the contents."""
        if capacity <= self.capacity:
            return
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, : self.capacity] = old
                cache[i] = new
        self.capacity = capacity


class PrefillStore(KVStore):
    """Prefill of new prompts: attention over the new tokens only (causal), keys/values written
    to the streams' cache rows at positions 0..T-1. Any rows, no gathering of old cache."""

    def __init__(self, cache: TalkerCache, rows: Tensor):
        self.cache, self.rows = cache, rows

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        t = k.shape[2]
        self.cache.k[layer][self.rows, :, :t] = k
        self.cache.v[layer][self.rows, :, :t] = v
        causal = torch.ones(t, t, dtype=torch.bool, device=k.device).tril()[None, None]
        return k, v, causal


class PredictorCache(KVStore):
    """Fresh per frame: every row is at the same position, 16 positions at most."""

    def __init__(
        self, cfg: TransformerConfig, batch: int, length: int, device: torch.device, dtype: torch.dtype
    ):
        shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.length = 0

    def advance(self, n: int) -> None:
        self.length += n

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        t = k.shape[2]
        end = self.length + t
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        mask = None
        if t > 1:  # the 2-position prefill is causal
            q_pos = torch.arange(self.length, end, device=k.device)
            mask = (torch.arange(end, device=k.device)[None, :] <= q_pos[:, None])[None, None]
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask
