"""The 12 Hz codec decoder in plain PyTorch: 16 codebooks x T frames -> T x 1920 samples at 24 kHz.

Pipeline (MODEL.md §1.5), shapes for one call of n frames of B streams:

    codes [B, 16, n]
    -> split RVQ lookup + projections          [B, 512, n]
    -> pre_conv   causal conv k3               [B, 1024, n]
    -> pre_transformer (8 layers, window 72)   [B, 1024, n]
    -> upsample   2 x (transposed conv x2, ConvNeXt)       [B, 1024, 4n]
    -> decoder.0  causal conv k7               [B, 1536, 4n]
    -> decoder.1-4  (SnakeBeta, transposed conv x8/x5/x4/x3, 3 residual units)  [B, 96, 1920n]
    -> decoder.5-6  SnakeBeta, causal conv k7 -> clamp(-1, 1)                    [B, 1920n]

Every layer is causal with no lookahead, so the decoder streams *exactly* (MODEL.md §5.3): each
layer keeps a little state between calls and every frame's 1920 samples are final as soon as the
frame is decoded. The state per stream is

- every causal conv: its last (k-1)*dilation input samples (zeros = the official zero padding);
- every transposed conv with kernel 2s: the s samples of the last frame's response that spill
  into the next frame (the part the official code trims off the right end);
- every transformer layer: the keys/values of the last `sliding_window - 1` frames, and per
  stream the number of frames decoded so far (RoPE positions and the window mask).

There is one code path: `CodecDecoder.step(codes, state)` decodes n frames and advances `state`
in place; `forward(codes)` is `step` on a fresh zero state. `CodecStreams` keeps the state of many
streams in one pool and advances any subset of them in one batched call.

Module and parameter names are the official checkpoint's `decoder.*` keys without the prefix
(odd ones such as `quantizer.rvq_rest.vq.layers.3._codebook.embedding_sum` included), so the
official weights load with `load_state_dict(strict=True)`. Tensors derived from the weights
(codebook tables, SnakeBeta factors, fused q/k/v and gate/up weights) are non-persistent
buffers recomputed by `prepare()`, which `load_state_dict` runs automatically.

Speed (CPU; on CUDA the plain kernels are used): a streaming call decodes a few frames, so the
first layers multiply a few activation rows by large weights and are bound by reading them
(`matmul`), while the last blocks are bound by arithmetic on many samples (`_tail`). See
`engine/bench_codec.py` for the measurements.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import CodecDecoderConfig
from engine.torch.codec_layers import (
    FRAMES,
    CausalConv,
    CausalTransConv,
    ConvNeXtBlock,
    DecoderBlock,
    Linear,
    SnakeBeta,
    StreamState,
    _Stateful,
    matmul,
)
from engine.torch.layers import RMSNorm

# Time tiles of the last blocks: ~4 MB activations in fp32 (see CodecDecoder._tail); a module
# constant so that tests can force the tiled path.
TILE_ELEMENTS = 1 << 20

# ----------------------------------------------------------------------------------------------
# Residual vector quantizer (decode side only)


class _Codebook(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        # EMA statistics as trained: the vectors are embedding_sum / cluster_usage.
        self.cluster_usage = nn.Parameter(torch.ones(size))
        self.embedding_sum = nn.Parameter(torch.zeros(size, dim))


class _VectorQuantizer(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self._codebook = _Codebook(size, dim)


class _Layers(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class _CodebookGroup(nn.Module):
    """Codebooks whose vectors are summed, then projected dim -> out_dim by a k1 conv."""

    def __init__(self, n_codebooks: int, size: int, dim: int, out_dim: int):
        super().__init__()
        # input_proj is the encoder's; it is in the checkpoint, so it is kept, never used.
        self.input_proj = nn.Conv1d(out_dim, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, out_dim, 1, bias=False)
        self.vq = _Layers([_VectorQuantizer(size, dim) for _ in range(n_codebooks)])


class SplitRVQ(nn.Module):
    """Codebook 0 (semantic) and codebooks 1.. (acoustic), each group with its own projection."""

    CLUSTER_USAGE_EPS = 1e-5

    def __init__(self, n_codebooks: int, size: int, dim: int, out_dim: int):
        super().__init__()
        # The official decoder always splits 1 + (n-1), whatever num_semantic_quantizers says.
        self.rvq_first = _CodebookGroup(1, size, dim, out_dim)
        self.rvq_rest = _CodebookGroup(n_codebooks - 1, size, dim, out_dim)
        self.size = size
        self.register_buffer("table", torch.zeros(n_codebooks * size, dim), persistent=False)

    def prepare(self) -> None:
        books = [q._codebook for g in (self.rvq_first, self.rvq_rest) for q in g.vq.layers]
        self.table = torch.cat(
            [
                b.embedding_sum.detach() / b.cluster_usage.detach().clamp(min=self.CLUSTER_USAGE_EPS)[:, None]
                for b in books
            ]
        )

    def forward(self, codes: Tensor) -> Tensor:
        # codes: [B, Q, n] -> [B, out_dim, n]; row q of the table block q holds codebook q.
        offsets = torch.arange(codes.shape[1], device=codes.device)[:, None] * self.size
        vectors = F.embedding(codes + offsets, self.table)  # [B, Q, n, D]
        first = F.linear(vectors[:, 0], self.rvq_first.output_proj.weight[..., 0])
        rest = F.linear(vectors[:, 1:].sum(1), self.rvq_rest.output_proj.weight[..., 0])
        return (first + rest).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Sliding-window transformer


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), 0.01))

    def add_scaled(self, x: Tensor, h: Tensor) -> Tensor:
        """x + scale·h"""
        return torch.addcmul(x, self.scale, h)


def _fused_weight(*linears: nn.Linear) -> Tensor:
    """The linears' weights stacked, for one product instead of several (a derived copy: the
    checkpoint keeps them apart)."""
    return torch.cat([lin.weight.detach() for lin in linears])


class Attention(_Stateful):
    """Multi-head attention over the last `window` frames (self included), RoPE, no q/k norm."""

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.context = cfg.sliding_window - 1
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.register_buffer("qkv_weight", torch.zeros(0), persistent=False)

    def prepare(self) -> None:
        self.qkv_weight = _fused_weight(self.q_proj, self.k_proj, self.v_proj)

    def state_shape(self) -> tuple[int, ...]:
        # Keys (already rotated) and values of the previous `context` frames, oldest first.
        return (2, self.n_kv_heads, self.context, self.head_dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, state: StreamState) -> Tensor:
        # x: [B, n, hidden]; rope cos/sin: [B, n, 1, D]; mask: additive [B, 1, n, context + n]
        b, n, _ = x.shape
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        cos, sin = rope
        qkv = matmul(x.reshape(b * n, -1), self.qkv_weight.t()).view(b, n, hq + 2 * hkv, d)
        qk, v = qkv[:, :, : hq + hkv], qkv[:, :, hq + hkv :]
        half1, half2 = qk.chunk(2, dim=-1)
        qk = torch.addcmul(qk * cos, torch.cat((-half2, half1), dim=-1), sin)  # RoPE, rotate-half
        q, k = qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:]  # q: [B, Hq, n, D]
        new = torch.stack((k, v), dim=1).transpose(2, 3)  # [B, 2, Hkv, n, D]
        kv = torch.cat((state[self.state_key], new), dim=3)  # [B, 2, Hkv, ctx + n, D]
        state[self.state_key] = kv[:, :, :, n:]
        k, v = kv[:, 0], kv[:, 1]
        if hq != hkv:
            k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=d**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, hq * d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)
        self.register_buffer("gate_up_weight", torch.zeros(0), persistent=False)

    def prepare(self) -> None:
        self.gate_up_weight = _fused_weight(self.gate_proj, self.up_proj)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = matmul(x.reshape(-1, x.shape[-1]), self.gate_up_weight.t()).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up)).view(x.shape)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = Mlp(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, state: StreamState) -> Tensor:
        x = self.self_attn_layer_scale.add_scaled(
            x, self.self_attn(self.input_layernorm(x), rope, mask, state)
        )
        return self.mlp_layer_scale.add_scaled(x, self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """latent -> hidden, pre-norm layers with a sliding window, RMSNorm, hidden -> latent."""

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        self.input_proj = Linear(cfg.latent_dim, cfg.hidden_size)
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output_proj = Linear(cfg.hidden_size, cfg.latent_dim)
        self.window = cfg.sliding_window
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin [B, n, 1, D] for absolute positions [B, n] (rotate-half layout)."""
        d = self.head_dim
        # The official fp32 inverse frequencies; the angles in fp64, because positions keep
        # counting for the life of a stream and an fp32 angle loses precision as they grow.
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, device=positions.device).float() / d))
        angles = positions[..., None].double() * inv_freq.double()  # [B, n, D/2]
        angles = torch.cat((angles, angles), dim=-1)[:, :, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def _mask(self, frames: Tensor, n: int, dtype: torch.dtype) -> Tensor:
        """Additive mask [B, 1, n, ctx + n]: query i (absolute frames+i) sees key j (absolute
        frames-ctx+j) iff it lies in the window (i <= j <= i + ctx) and exists (frames-ctx+j >= 0)."""
        ctx = self.window - 1
        i = torch.arange(n, device=frames.device)[:, None]
        j = torch.arange(ctx + n, device=frames.device)[None, :]
        in_window = (j >= i) & (j <= i + ctx)  # [n, ctx + n]
        exists = j >= ctx - frames[:, None, None]  # [B, 1, ctx + n]
        visible = (in_window & exists)[:, None]
        # One float mask per call: with a bool mask, sdpa converts it again in every layer.
        return torch.zeros(visible.shape, dtype=dtype, device=frames.device).masked_fill_(
            ~visible, -torch.inf
        )

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        # x: [B, n, latent] -> [B, n, latent]
        n = x.shape[1]
        frames = state[FRAMES]
        positions = frames[:, None] + torch.arange(n, device=x.device)
        rope = self._rope(positions, x.dtype)
        mask = self._mask(frames, n, x.dtype)
        h = self.input_proj(x)
        for layer in self.layers:
            h = layer(h, rope, mask, state)
        return self.output_proj(self.norm(h))


# ----------------------------------------------------------------------------------------------
# The decoder


class CodecDecoder(nn.Module):
    """Codes [B, Q, T] -> waveform [B, T·samples_per_frame] in [-1, 1], full-pass or streaming."""

    def __init__(self, cfg: CodecDecoderConfig):
        super().__init__()
        if cfg.num_quantizers < 2:
            raise ValueError("the split RVQ needs at least 2 codebooks")
        self.cfg = cfg
        self.quantizer = SplitRVQ(
            cfg.num_quantizers, cfg.codebook_size, cfg.codebook_dim // 2, cfg.codebook_dim
        )
        self.pre_conv = CausalConv(cfg.codebook_dim, cfg.latent_dim, 3)
        self.pre_transformer = Transformer(cfg)
        # Checkpoint layout: upsample.i = [transposed conv (x ratio), ConvNeXt block].
        self.upsample = nn.ModuleList(
            nn.ModuleList(
                [CausalTransConv(cfg.latent_dim, cfg.latent_dim, r, r), ConvNeXtBlock(cfg.latent_dim)]
            )
            for r in cfg.upsampling_ratios
        )
        dims = [cfg.decoder_dim // 2**i for i in range(len(cfg.upsample_rates) + 1)]
        # Checkpoint layout: decoder = [conv in, block x len(rates), SnakeBeta, conv out].
        self.decoder = nn.ModuleList(
            [CausalConv(cfg.latent_dim, dims[0], 7)]
            + [DecoderBlock(dims[i], dims[i + 1], r) for i, r in enumerate(cfg.upsample_rates)]
            + [SnakeBeta(dims[-1]), CausalConv(dims[-1], 1, 7)]
        )
        self.samples_per_frame = cfg.samples_per_frame
        self._stateful = {name: m for name, m in self.named_modules() if isinstance(m, _Stateful)}
        for name, m in self._stateful.items():
            m.state_key = name
        # Inference only: no autograd graph, and the in-place ops above stay legal.
        self.requires_grad_(False)
        self.prepare()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.prepare())

    @torch.no_grad()
    def prepare(self) -> None:
        """Recompute the tensors derived from the weights. `load_state_dict` calls this; call it
        yourself after changing parameters in place."""
        for m in self.modules():
            if m is not self and hasattr(m, "prepare"):
                m.prepare()

    def init_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> StreamState:
        """A zero state for `batch` new streams (equal to the official zero padding)."""
        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        state = {FRAMES: torch.zeros(batch, dtype=torch.long, device=device)}
        for name, m in self._stateful.items():
            shape = m.state_shape()
            if shape is not None:
                state[name] = torch.zeros(batch, *shape, device=device, dtype=dtype)
        return state

    def check_codes(self, codes: Tensor) -> None:
        """ValueError unless codes is an integer [B, num_quantizers, n] tensor of valid entries."""
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
        q = self.cfg.num_quantizers
        if codes.dim() != 3 or codes.shape[1] != q:
            raise ValueError(f"codes must have shape [batch, {q}, frames], got {list(codes.shape)}")
        if codes.numel():
            # One host sync per call; cheap next to the decode, and a wrong code must not become
            # an out-of-range embedding read (or, with -1 padding, silently decode as code 0).
            lo, hi = (int(v) for v in torch.aminmax(codes))
            if lo < 0 or hi >= self.cfg.codebook_size:
                raise ValueError(
                    f"codes must lie in [0, {self.cfg.codebook_size}), got values in [{lo}, {hi}]"
                )

    @torch.no_grad()
    def step(self, codes: Tensor, state: StreamState) -> Tensor:
        """Decode n more frames per stream: codes [B, Q, n] -> samples [B, n·samples_per_frame].

        `state` holds B streams (from `init_state`) and is advanced in place."""
        self.check_codes(codes)
        b, _, n = codes.shape
        if state[FRAMES].shape[0] != b:
            raise ValueError(f"codes have {b} streams but the state has {state[FRAMES].shape[0]}")
        table = self.quantizer.table
        if n == 0:
            return table.new_zeros(b, 0)
        x = self.quantizer(codes.to(table.device, torch.long))  # [B, 512, n]
        x = self.pre_conv(x, state)  # [B, 1024, n]
        x = self.pre_transformer(x.transpose(1, 2), state).transpose(1, 2)  # [B, 1024, n]
        for transconv, convnext in self.upsample:  # type: ignore[misc]
            x = convnext(transconv(x, state), state)  # [B, 1024, 4n] at the end
        x = self.decoder[0](x, state)  # [B, 1536, 4n]
        # The first block holds most of the weights (125 MB at full size): read them once.
        x = self.decoder[1](x, state)  # [B, 768, 32n]
        wav = self._tail(x, state, 2)  # [B, 1, 1920n]
        state[FRAMES] = state[FRAMES] + n
        return wav.squeeze(1).clamp_(-1.0, 1.0)

    def _tail(self, x: Tensor, state: StreamState, i: int) -> Tensor:
        """decoder[i:] on x [B, C, L] -> [B, 1, L·(rates of blocks i..)], depth first in time tiles.

        The last blocks have few weights and many samples. Each block's input is cut into
        tiles of about TILE_ELEMENTS outputs, and each tile goes through all the later stages
        before the next: activations stay in cache, and below glibc's 32 MB mmap threshold (a
        fresh page costs a fault; ~4 GB/s here). Exact, as every stage is causal and stateful.
        """
        if i == len(self.decoder) - 2:
            return self.decoder[-1](x, state, act=self.decoder[-2])
        block = self.decoder[i]
        width = max(1, TILE_ELEMENTS // (x.shape[0] * block.outputs_per_sample))
        return torch.cat([self._tail(block(piece, state), state, i + 1) for piece in x.split(width, -1)], -1)

    def forward(self, codes: Tensor) -> Tensor:
        """One full pass from silence, as the official `decoder(codes)`: [B, Q, T] -> [B, T·1920]."""
        return self.step(codes, self.init_state(codes.shape[0]))


# ----------------------------------------------------------------------------------------------
# Many streams


class CodecStreams:
    """Streaming state for up to `max_streams` streams of one decoder, one row per stream.

    `decode(rows, codes)` advances any subset of rows by the same number of frames in one batched
    pass and returns their final samples at once (no lookahead, nothing decoded twice). A row is
    a slot: `reset(row)` makes it a fresh stream again.
    """

    def __init__(
        self,
        decoder: CodecDecoder,
        max_streams: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        p = next(decoder.parameters())
        device = torch.device(device) if device is not None else p.device
        dtype = dtype or p.dtype
        if (p.device.type, p.dtype) != (device.type, dtype):
            raise ValueError(f"decoder is on {p.device}/{p.dtype}; move it to {device}/{dtype} first")
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.decoder = decoder
        self.max_streams = max_streams
        self.device = device
        self.state = decoder.init_state(max_streams, device, dtype)

    def reset(self, row: int) -> None:
        """Forget row `row`'s history: its next frame decodes as the first of a new stream."""
        self._rows([row])
        for t in self.state.values():
            t[row].zero_()

    def frames(self, row: int) -> int:
        """Frames decoded on `row` since its last reset."""
        return int(self.state[FRAMES][row])

    def decode(self, rows: Sequence[int] | Tensor, codes: Tensor) -> Tensor:
        """Advance `rows` by n frames: codes [len(rows), Q, n] -> samples [len(rows), n·1920]."""
        idx = self._rows(rows)
        if codes.dim() != 3 or codes.shape[0] != idx.numel():
            raise ValueError(f"codes must be [len(rows)={idx.numel()}, Q, frames], got {list(codes.shape)}")
        batch = {k: t.index_select(0, idx) for k, t in self.state.items()}
        wav = self.decoder.step(codes.to(self.device), batch)
        for k, t in self.state.items():
            t.index_copy_(0, idx, batch[k])
        return wav

    def prime(self, row: int, codes: Tensor) -> None:
        """Decode codes [Q, n] on `row` and discard the audio (e.g. a voice-clone reference), so
        the frames that follow sound as if they continued it."""
        if codes.dim() != 2:
            raise ValueError(f"prime takes codes [Q, frames], got {list(codes.shape)}")
        self.decode([row], codes[None])

    def _rows(self, rows: Sequence[int] | Tensor) -> Tensor:
        idx = torch.as_tensor(rows, dtype=torch.long).flatten()
        if idx.numel() == 0:
            raise ValueError("rows is empty")
        values = idx.tolist()
        if min(values) < 0 or max(values) >= self.max_streams:
            raise ValueError(f"rows must lie in [0, {self.max_streams}), got {values}")
        if len(set(values)) != len(values):
            raise ValueError(f"rows must be distinct, got {values}")
        return idx.to(self.device)
