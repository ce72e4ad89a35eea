"""The 12 Hz codec decoder in MLX: 16 codebooks x n frames -> n x 1920 samples at 24 kHz.

The same network, state and streaming rule as `engine/torch/codec.py` (read its docstring for
the pipeline and why streaming is exact), channels last. Shapes for one call of n frames of B
streams:

    codes [B, 16, n]
    -> split RVQ lookup + projections          [B, n, 512]
    -> pre_conv   causal conv k3               [B, n, 1024]
    -> pre_transformer (8 layers, window 72)   [B, n, 1024]
    -> upsample   2 x (transposed conv x2, ConvNeXt)               [B, 4n, 1024]
    -> decoder.0  causal conv k7                                   [B, 4n, 1536]
    -> decoder.1-4  (SnakeBeta, transposed conv, 3 residual units)  [B, 1920n, 96]
    -> decoder.5-6  SnakeBeta, causal conv k7 -> clamp(-1, 1)       [B, 1920n]

`CodecDecoder.step(codes, state)` decodes n frames and advances `state`; calling the decoder is
`step` on a fresh zero state (the one-pass decode). `CodecStreams` keeps one state per stream
row and advances any subset of rows in one batched call. Frame counts live on the host (numpy):
RoPE angles and window masks are built there without waiting for the device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from engine.checkpoint import Checkpoint
from engine.config import CodecDecoderConfig
from engine.mlx.audio_weights import Weights, checkpoint_weights, evaluate_arrays
from engine.mlx.codec_layers import (
    CausalConv,
    CausalTransConv,
    ConvNeXtBlock,
    DecoderBlock,
    Linear,
    SnakeBeta,
    Tensors,
)


@dataclass
class StreamState:
    """Streaming state of B streams: frames decoded per stream (host) and one array per
    stateful layer, keyed by its checkpoint name, batch first."""

    frames: np.ndarray  # [B] int64
    tensors: Tensors


# ----------------------------------------------------------------------------------------------
# Residual vector quantizer (decode side)


class SplitRVQ:
    """Codebook 0 (semantic) and codebooks 1.. (acoustic), each group with its own projection."""

    CLUSTER_USAGE_EPS = 1e-5

    def __init__(self, w: Weights, n_codebooks: int, size: int, dim: int, out_dim: int):
        books = []
        for group, count in (("rvq_first", 1), ("rvq_rest", n_codebooks - 1)):
            for i in range(count):
                prefix = f"quantizer.{group}.vq.layers.{i}._codebook"
                usage = w.take(f"{prefix}.cluster_usage", (size,))
                vectors = w.take(f"{prefix}.embedding_sum", (size, dim))
                books.append(vectors / mx.maximum(usage, self.CLUSTER_USAGE_EPS)[:, None])
            w.skip(f"quantizer.{group}.input_proj.")  # the encoder's projection, kept in the file
        self.table = mx.concatenate(books)  # [Q·S, D]: block q holds codebook q
        self.first_proj = w.take("quantizer.rvq_first.output_proj.weight", (out_dim, dim, 1))[..., 0].T
        self.rest_proj = w.take("quantizer.rvq_rest.output_proj.weight", (out_dim, dim, 1))[..., 0].T
        self.size = size

    def __call__(self, codes: mx.array) -> mx.array:
        # codes [B, Q, n] -> [B, n, out_dim]
        offsets = mx.arange(codes.shape[1], dtype=codes.dtype)[:, None] * self.size
        vectors = self.table[codes + offsets]  # [B, Q, n, D]
        return vectors[:, 0] @ self.first_proj + vectors[:, 1:].sum(axis=1) @ self.rest_proj


# ----------------------------------------------------------------------------------------------
# Sliding-window transformer


class Attention:
    """Multi-head attention over the last `window` frames (self included), RoPE, no q/k norm."""

    def __init__(self, w: Weights, name: str, cfg: CodecDecoderConfig):
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.context = cfg.sliding_window - 1
        hidden, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # q, k and v in one product: a derived copy, the checkpoint keeps them apart.
        self.qkv_weight = mx.concatenate(
            [w.take(f"{name}.{p}_proj.weight", (n, hidden)) for p, n in (("q", q), ("k", kv), ("v", kv))]
        ).T
        self.o_proj = Linear(w, f"{name}.o_proj", q, hidden, bias=False)
        self.state_key = name

    def state_shape(self) -> tuple[int, ...]:
        # Keys (already rotated) and values of the previous `context` frames, oldest first.
        return (2, self.n_kv_heads, self.context, self.head_dim)

    def __call__(
        self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array, state: Tensors
    ) -> mx.array:
        # x [B, n, hidden]; rope cos/sin [B, 1, n, D]; mask additive [B, 1, n, context + n]
        b, n, _ = x.shape
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = (x @ self.qkv_weight).reshape(b, n, hq + 2 * hkv, d).transpose(0, 2, 1, 3)  # [B, H, n, D]
        qk, v = qkv[:, : hq + hkv], qkv[:, hq + hkv :]
        cos, sin = rope
        half = d // 2
        rotated = mx.concatenate([-qk[..., half:], qk[..., :half]], axis=-1)
        qk = qk * cos + rotated * sin  # RoPE, rotate-half layout
        q, k = qk[:, :hq], qk[:, hq:]
        kv = mx.concatenate(
            [state[self.state_key], mx.stack([k, v], axis=1)], axis=3
        )  # [B, 2, Hkv, ctx+n, D]
        state[self.state_key] = kv[:, :, :, n:]
        out = mx.fast.scaled_dot_product_attention(q, kv[:, 0], kv[:, 1], scale=d**-0.5, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(b, n, hq * d))


class Mlp:
    def __init__(self, w: Weights, name: str, dim: int, hidden: int):
        gate = w.take(f"{name}.gate_proj.weight", (hidden, dim))
        up = w.take(f"{name}.up_proj.weight", (hidden, dim))
        self.gate_up_weight = mx.concatenate([gate, up]).T  # [dim, 2·hidden]
        self.down_proj = Linear(w, f"{name}.down_proj", hidden, dim, bias=False)
        self.hidden = hidden

    def __call__(self, x: mx.array) -> mx.array:
        gu = x @ self.gate_up_weight
        gate, up = gu[..., : self.hidden], gu[..., self.hidden :]
        return self.down_proj(gate * mx.sigmoid(gate) * up)


class TransformerLayer:
    def __init__(self, w: Weights, name: str, cfg: CodecDecoderConfig):
        h = cfg.hidden_size
        self.self_attn = Attention(w, f"{name}.self_attn", cfg)
        self.mlp = Mlp(w, f"{name}.mlp", h, cfg.intermediate_size)
        self.input_norm = w.take(f"{name}.input_layernorm.weight", (h,))
        self.post_attention_norm = w.take(f"{name}.post_attention_layernorm.weight", (h,))
        self.attn_scale = w.take(f"{name}.self_attn_layer_scale.scale", (h,))
        self.mlp_scale = w.take(f"{name}.mlp_layer_scale.scale", (h,))
        self.eps = cfg.rms_norm_eps

    def __call__(
        self, x: mx.array, rope: tuple[mx.array, mx.array], mask: mx.array, state: Tensors
    ) -> mx.array:
        h = self.self_attn(mx.fast.rms_norm(x, self.input_norm, self.eps), rope, mask, state)
        x = x + self.attn_scale * h
        return x + self.mlp_scale * self.mlp(mx.fast.rms_norm(x, self.post_attention_norm, self.eps))


class Transformer:
    """latent -> hidden, pre-norm layers with a sliding window, RMSNorm, hidden -> latent."""

    def __init__(self, w: Weights, name: str, cfg: CodecDecoderConfig):
        self.input_proj = Linear(w, f"{name}.input_proj", cfg.latent_dim, cfg.hidden_size)
        self.layers = [TransformerLayer(w, f"{name}.layers.{i}", cfg) for i in range(cfg.num_layers)]
        self.norm = w.take(f"{name}.norm.weight", (cfg.hidden_size,))
        self.output_proj = Linear(w, f"{name}.output_proj", cfg.hidden_size, cfg.latent_dim)
        self.window, self.head_dim, self.eps = cfg.sliding_window, cfg.head_dim, cfg.rms_norm_eps
        d = cfg.head_dim
        # The official fp32 inverse frequencies, used in fp64 (see _rope).
        self.inv_freq = (1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d)).astype(
            np.float32
        )

    def _rope(self, frames: np.ndarray, n: int, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """cos/sin [B, 1, n, D] for absolute positions frames + 0..n-1 (rotate-half layout).
        Angles in fp64: positions keep counting for the life of a stream, and an fp32 angle
        loses precision as they grow."""
        positions = frames[:, None] + np.arange(n)  # [B, n]
        angles = positions[..., None].astype(np.float64) * self.inv_freq.astype(np.float64)
        angles = np.concatenate([angles, angles], axis=-1)[:, None]  # [B, 1, n, D]
        return mx.array(np.cos(angles), dtype=dtype), mx.array(np.sin(angles), dtype=dtype)

    def _mask(self, frames: np.ndarray, n: int, dtype: mx.Dtype) -> mx.array:
        """Additive mask [B, 1, n, ctx + n]: query i (absolute frames+i) sees key j (absolute
        frames-ctx+j) iff it lies in the window (i <= j <= i + ctx) and exists (frames-ctx+j >= 0)."""
        ctx = self.window - 1
        i, j = np.arange(n)[:, None], np.arange(ctx + n)[None, :]
        in_window = (j >= i) & (j <= i + ctx)  # [n, ctx + n]
        exists = j >= ctx - frames[:, None, None]  # [B, 1, ctx + n]
        visible = (in_window & exists)[:, None]  # [B, 1, n, ctx + n]
        return mx.array(np.where(visible, 0.0, -np.inf).astype(np.float32), dtype=dtype)

    def __call__(self, x: mx.array, state: StreamState) -> mx.array:
        # x [B, n, latent] -> [B, n, latent]
        n = x.shape[1]
        rope = self._rope(state.frames, n, x.dtype)
        mask = self._mask(state.frames, n, x.dtype)
        h = self.input_proj(x)
        for layer in self.layers:
            h = layer(h, rope, mask, state.tensors)
        return self.output_proj(mx.fast.rms_norm(h, self.norm, self.eps))


# ----------------------------------------------------------------------------------------------
# The decoder


class CodecDecoder:
    """Codes [B, Q, n] -> waveform [B, n·samples_per_frame] in [-1, 1], one pass or streaming.

    `weights` holds the official `decoder.*` tensors without the prefix, every one of them used
    (a `CheckpointError` otherwise); they are cast to `dtype`.
    """

    def __init__(self, cfg: CodecDecoderConfig, weights: Weights):
        if cfg.num_quantizers < 2:
            raise ValueError("the split RVQ needs at least 2 codebooks")
        w = weights
        self.cfg, self.dtype = cfg, w.dtype
        self.samples_per_frame = cfg.samples_per_frame
        # The official decoder always splits 1 + (n-1), whatever num_semantic_quantizers says.
        self.quantizer = SplitRVQ(
            w, cfg.num_quantizers, cfg.codebook_size, cfg.codebook_dim // 2, cfg.codebook_dim
        )
        self.pre_conv = CausalConv(w, "pre_conv", cfg.codebook_dim, cfg.latent_dim, 3)
        self.pre_transformer = Transformer(w, "pre_transformer", cfg)
        # Checkpoint layout: upsample.i = [transposed conv (x ratio), ConvNeXt block].
        self.upsample = [
            (
                CausalTransConv(w, f"upsample.{i}.0", cfg.latent_dim, cfg.latent_dim, r, r),
                ConvNeXtBlock(w, f"upsample.{i}.1", cfg.latent_dim),
            )
            for i, r in enumerate(cfg.upsampling_ratios)
        ]
        rates = cfg.upsample_rates
        dims = [cfg.decoder_dim // 2**i for i in range(len(rates) + 1)]
        # Checkpoint layout: decoder = [conv in, block x len(rates), SnakeBeta, conv out].
        self.conv_in = CausalConv(w, "decoder.0", cfg.latent_dim, dims[0], 7)
        self.blocks = [
            DecoderBlock(w, f"decoder.{i + 1}", dims[i], dims[i + 1], r) for i, r in enumerate(rates)
        ]
        self.act_out = SnakeBeta(w, f"decoder.{len(rates) + 1}", dims[-1])
        self.conv_out = CausalConv(w, f"decoder.{len(rates) + 2}", dims[-1], 1, 7)
        w.finish()
        evaluate_arrays(self)

    def _stateful(self) -> Iterator[CausalConv | CausalTransConv | Attention]:
        yield self.pre_conv
        yield from (layer.self_attn for layer in self.pre_transformer.layers)
        for transconv, convnext in self.upsample:
            yield from (transconv, convnext.dwconv)
        yield self.conv_in
        for block in self.blocks:
            yield from block.stateful()
        yield self.conv_out

    def init_state(self, batch: int) -> StreamState:
        """A zero state for `batch` new streams (equal to the official zero padding)."""
        tensors = {}
        for layer in self._stateful():
            shape = layer.state_shape()
            if shape is not None:
                tensors[layer.state_key] = mx.zeros((batch, *shape), dtype=self.dtype)
        mx.eval(tensors)  # made here, possibly used from another thread (see evaluate_arrays)
        return StreamState(np.zeros(batch, dtype=np.int64), tensors)

    def check_codes(self, codes: mx.array) -> None:
        """ValueError unless codes is an integer [B, num_quantizers, n] array of valid entries."""
        if not mx.issubdtype(codes.dtype, mx.integer):
            raise ValueError(f"codes must be an integer array, got {codes.dtype}")
        q = self.cfg.num_quantizers
        if codes.ndim != 3 or codes.shape[1] != q:
            raise ValueError(f"codes must have shape [batch, {q}, frames], got {list(codes.shape)}")
        if codes.size:
            # One host sync per call: a wrong code must not become an out-of-range table read
            # (or, with the official -1 padding, silently decode as another code).
            lo, hi = int(codes.min().item()), int(codes.max().item())
            if lo < 0 or hi >= self.cfg.codebook_size:
                raise ValueError(
                    f"codes must lie in [0, {self.cfg.codebook_size}), got values in [{lo}, {hi}]"
                )

    def step(self, codes: mx.array, state: StreamState) -> mx.array:
        """Decode n more frames per stream: codes [B, Q, n] -> samples [B, n·samples_per_frame].

        `state` holds B streams (from `init_state`) and is advanced in place. Lazy: the caller
        evaluates the samples and the new state together (`mx.eval`)."""
        codes = mx.array(codes) if isinstance(codes, np.ndarray) else codes
        self.check_codes(codes)
        b, _, n = codes.shape
        if state.frames.shape[0] != b:
            raise ValueError(f"codes have {b} streams but the state has {state.frames.shape[0]}")
        if n == 0:
            return mx.zeros((b, 0), dtype=self.dtype)
        s = state.tensors
        x = self.quantizer(codes.astype(mx.int32))  # [B, n, 512]
        x = self.pre_transformer(self.pre_conv(x, s), state)  # [B, n, 1024]
        for transconv, convnext in self.upsample:
            x = convnext(transconv(x, s), s)  # [B, 4n, 1024] at the end
        x = self.conv_in(x, s)  # [B, 4n, 1536]
        for block in self.blocks:
            x = block(x, s)  # [B, 1920n, 96] at the end
        wav = self.conv_out(x, s, act=self.act_out)  # [B, 1920n, 1]
        state.frames = state.frames + n
        return mx.clip(wav[..., 0], -1.0, 1.0)

    def __call__(self, codes: mx.array) -> mx.array:
        """One full pass from silence, as the official `decoder(codes)`: [B, Q, T] -> [B, T·1920]."""
        wav = self.step(codes, self.init_state(codes.shape[0]))
        mx.eval(wav)
        return wav


def load_codec_decoder(checkpoint: Checkpoint, dtype: mx.Dtype = mx.float32) -> CodecDecoder:
    """The codec decoder of a checkpoint: `speech_tokenizer/model.safetensors` read with
    `mx.load`, or for a random spec the torch backend's random weights (engine.mlx.audio_weights)."""
    return CodecDecoder(checkpoint.codec.decoder, checkpoint_weights(checkpoint, "decoder", dtype))


# ----------------------------------------------------------------------------------------------
# Many streams


class CodecStreams:
    """Streaming state for up to `max_streams` streams of one decoder, one row per stream.

    `decode(rows, codes)` advances any subset of rows by the same number of frames in one batched
    pass and returns their final samples at once (no lookahead, nothing decoded twice). A row is
    a slot: `reset(row)` makes it a fresh stream again. Each row's state is kept on its own, so a
    call gathers only the rows it advances (no pool-wide scatter).
    """

    def __init__(self, decoder: CodecDecoder, max_streams: int):
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.decoder = decoder
        self.max_streams = max_streams
        self._rows: list[StreamState] = [decoder.init_state(1) for _ in range(max_streams)]

    def reset(self, row: int) -> None:
        """Forget row `row`'s history: its next frame decodes as the first of a new stream."""
        self._check_rows([row])
        self._rows[row] = self.decoder.init_state(1)

    def frames(self, row: int) -> int:
        """Frames decoded on `row` since its last reset."""
        self._check_rows([row])
        return int(self._rows[row].frames[0])

    def decode(self, rows: Sequence[int], codes: mx.array) -> mx.array:
        """Advance `rows` by n frames: codes [len(rows), Q, n] -> samples [len(rows), n·1920]."""
        rows = self._check_rows(rows)
        if codes.ndim != 3 or codes.shape[0] != len(rows):
            raise ValueError(f"codes must be [len(rows)={len(rows)}, Q, frames], got {list(codes.shape)}")
        parts = [self._rows[r] for r in rows]
        if len(parts) == 1:
            batch = StreamState(parts[0].frames.copy(), dict(parts[0].tensors))
        else:
            batch = StreamState(
                np.concatenate([p.frames for p in parts]),
                {k: mx.concatenate([p.tensors[k] for p in parts]) for k in parts[0].tensors},
            )
        wav = self.decoder.step(codes, batch)  # validates before touching any row
        mx.eval(wav, batch.tensors)
        for i, r in enumerate(rows):
            self._rows[r] = StreamState(
                batch.frames[i : i + 1].copy(), {k: t[i : i + 1] for k, t in batch.tensors.items()}
            )
        return wav

    def prime(self, row: int, codes: mx.array) -> None:
        """Decode codes [Q, n] on `row` and discard the audio (e.g. a voice-clone reference), so
        the frames that follow sound as if they continued it."""
        if codes.ndim != 2:
            raise ValueError(f"prime takes codes [Q, frames], got {list(codes.shape)}")
        self.decode([row], codes[None])

    def _check_rows(self, rows: Sequence[int]) -> list[int]:
        values = [int(r) for r in rows]
        if not values:
            raise ValueError("rows is empty")
        if min(values) < 0 or max(values) >= self.max_streams:
            raise ValueError(f"rows must lie in [0, {self.max_streams}), got {values}")
        if len(set(values)) != len(values):
            raise ValueError(f"rows must be distinct, got {values}")
        return values
