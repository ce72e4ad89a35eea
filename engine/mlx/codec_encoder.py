"""Speech-tokenizer encoder of the 12 Hz codec in MLX: 24 kHz reference audio -> codes.

The same network as `engine/torch/codec_encoder.py` (Kyutai's Mimi encoder as the official
tokenizer runs it; read that docstring for the facts reproduced here), channels last:

    wav [N] -> SEANet causal conv stack      [T25, D]   T25 = ceil(N / 960), 25 Hz
            -> causal transformer (RoPE)     [T25, D]
            -> stride-2 causal conv          [T, D]     T = ceil(N / 1920), 12.5 Hz
            -> split residual VQ             [T, Q]     Q = 16 of the 32 quantizers

Only ICL voice cloning uses it, once per reference clip, so the convs are plain `mx.conv1d`.
Run it in float32: the nearest-code search is precision-sensitive.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from engine.checkpoint import Checkpoint
from engine.config import SpeechTokenizerConfig
from engine.mimi_config import MimiEncoderConfig
from engine.mlx.audio_weights import Weights, checkpoint_weights, evaluate_arrays
from engine.mlx.codec_layers import Linear, gelu


def elu(x: mx.array) -> mx.array:
    return mx.where(x > 0, x, mx.expm1(mx.minimum(x, 0.0)))


class CausalConv1d:
    """Conv1d that sees only the past: [B, L, C_in] -> [B, ceil(L / stride), C_out].

    Left padding is the receptive field minus the stride; a partial last window is padded on the
    right so that it still yields a frame (which makes the frame count ceil(N / 1920))."""

    def __init__(
        self,
        w: Weights,
        name: str,
        c_in: int,
        c_out: int,
        kernel: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ):
        self.weight = w.take(f"{name}.conv.weight", (c_out, c_in, kernel)).transpose(
            0, 2, 1
        )  # [C_out, k, C_in]
        self.bias = w.take(f"{name}.conv.bias", (c_out,)) if bias else None
        self.stride, self.dilation = stride, dilation
        self.pad_left = (kernel - 1) * dilation + 1 - stride
        self.pad_mode = "edge" if pad_mode == "replicate" else "constant"

    def __call__(self, x: mx.array) -> mx.array:
        pad_right = -x.shape[1] % self.stride
        x = mx.pad(x, [(0, 0), (self.pad_left, pad_right), (0, 0)], mode=self.pad_mode)
        y = mx.conv1d(x, self.weight, stride=self.stride, dilation=self.dilation)
        return y if self.bias is None else y + self.bias


class ResidualUnit:
    """x + Conv_k1(ELU(Conv_k(ELU(x)))), the bottleneck halving the channels."""

    def __init__(self, w: Weights, name: str, cfg: MimiEncoderConfig, dim: int, dilation: int):
        hidden, k = dim // cfg.compress, cfg.residual_kernel_size
        self.conv1 = CausalConv1d(
            w, f"{name}.block.1", dim, hidden, k, dilation=dilation, pad_mode=cfg.pad_mode
        )
        self.conv2 = CausalConv1d(w, f"{name}.block.3", hidden, dim, 1, pad_mode=cfg.pad_mode)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.conv2(elu(self.conv1(elu(x))))


class SeanetEncoder:
    """[B, N, 1] -> [B, ceil(N / hop), D]: conv, then per ratio (reversed) residual units, ELU and
    a strided conv that doubles the channels, then ELU and a conv to D."""

    def __init__(self, w: Weights, cfg: MimiEncoderConfig):
        i = 0  # checkpoint index: the parameterless ELUs keep their slots in `encoder.layers`
        # (ELU first?, layer): an ELU precedes each strided conv and the last conv.
        self.layers: list[tuple[bool, CausalConv1d | ResidualUnit]] = [
            (
                False,
                CausalConv1d(
                    w, "encoder.layers.0", 1, cfg.num_filters, cfg.kernel_size, pad_mode=cfg.pad_mode
                ),
            )
        ]
        channels = cfg.num_filters
        for ratio in reversed(cfg.upsampling_ratios):
            for j in range(cfg.num_residual_layers):
                i += 1
                unit = ResidualUnit(w, f"encoder.layers.{i}", cfg, channels, cfg.dilation_growth_rate**j)
                self.layers.append((False, unit))
            i += 2  # ELU, then the strided conv
            conv = CausalConv1d(
                w,
                f"encoder.layers.{i}",
                channels,
                2 * channels,
                2 * ratio,
                stride=ratio,
                pad_mode=cfg.pad_mode,
            )
            self.layers.append((True, conv))
            channels *= 2
        i += 2
        last = CausalConv1d(
            w, f"encoder.layers.{i}", channels, cfg.hidden_size, cfg.last_kernel_size, pad_mode=cfg.pad_mode
        )
        self.layers.append((True, last))

    def __call__(self, x: mx.array) -> mx.array:
        for act, layer in self.layers:
            x = layer(elu(x) if act else x)
        return x


class TransformerLayer:
    """Pre-norm LayerNorm, causal attention with RoPE, GELU MLP, layer scales."""

    def __init__(self, w: Weights, name: str, cfg: MimiEncoderConfig):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim, self.eps = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
            cfg.norm_eps,
        )
        self.norm1 = (
            w.take(f"{name}.input_layernorm.weight", (d,)),
            w.take(f"{name}.input_layernorm.bias", (d,)),
        )
        self.norm2 = (
            w.take(f"{name}.post_attention_layernorm.weight", (d,)),
            w.take(f"{name}.post_attention_layernorm.bias", (d,)),
        )
        a, bias = f"{name}.self_attn", cfg.attention_bias
        self.q_proj = Linear(w, f"{a}.q_proj", d, self.heads * hd, bias)
        self.k_proj = Linear(w, f"{a}.k_proj", d, self.kv_heads * hd, bias)
        self.v_proj = Linear(w, f"{a}.v_proj", d, self.kv_heads * hd, bias)
        self.o_proj = Linear(w, f"{a}.o_proj", self.heads * hd, d, bias)
        self.attn_scale = w.take(f"{name}.self_attn_layer_scale.scale", (d,))
        self.fc1 = Linear(w, f"{name}.mlp.fc1", d, cfg.intermediate_size, bias=False)
        self.fc2 = Linear(w, f"{name}.mlp.fc2", cfg.intermediate_size, d, bias=False)
        self.mlp_scale = w.take(f"{name}.mlp_layer_scale.scale", (d,))

    def _attention(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        b, t, _ = x.shape

        def heads(y: mx.array, n: int) -> mx.array:  # [B, T, n·E] -> [B, n, T, E]
            return y.reshape(b, t, n, self.head_dim).transpose(0, 2, 1, 3)

        def rope(y: mx.array) -> mx.array:  # halves layout (not interleaved)
            half = self.head_dim // 2
            return y * cos + mx.concatenate([-y[..., half:], y[..., :half]], axis=-1) * sin

        q = rope(heads(self.q_proj(x), self.heads))
        k = rope(heads(self.k_proj(x), self.kv_heads))
        v = heads(self.v_proj(x), self.kv_heads)
        # Full causal attention, no sliding window (see engine/torch/codec_encoder.py).
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, mask="causal")
        return self.o_proj(y.transpose(0, 2, 1, 3).reshape(b, t, -1))

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        x = x + self.attn_scale * self._attention(mx.fast.layer_norm(x, *self.norm1, self.eps), cos, sin)
        return x + self.mlp_scale * self.fc2(gelu(self.fc1(mx.fast.layer_norm(x, *self.norm2, self.eps))))


def _rope_tables(length: int, head_dim: int, theta: float) -> tuple[mx.array, mx.array]:
    """cos, sin [T25, E] for positions 0..length-1, in fp32 like the official tables."""
    inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2).astype(np.float32) / head_dim)).astype(np.float32)
    freqs = np.outer(np.arange(length, dtype=np.float32), inv_freq)  # [T25, E/2]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return mx.array(np.cos(emb)), mx.array(np.sin(emb))


class ResidualVectorQuantizer:
    """Project D -> K (1x1 conv), then each stage codes what the previous stages left over."""

    def __init__(self, w: Weights, name: str, cfg: MimiEncoderConfig, stages: int, used: int):
        k, d, s = cfg.codebook_dim, cfg.hidden_size, cfg.codebook_size
        self.input_proj = None
        if cfg.vector_quantization_hidden_dimension != cfg.hidden_size:
            self.input_proj = w.take(f"{name}.input_proj.weight", (k, d, 1))[..., 0].T  # [D, K]
            w.take(f"{name}.output_proj.weight", (d, k, 1))  # decode side only
        self.codebooks = []
        for i in range(stages):
            c = f"{name}.layers.{i}.codebook"
            w.take(f"{c}.initialized", (1,))
            usage, embed_sum = w.take(f"{c}.cluster_usage", (s,)), w.take(f"{c}.embed_sum", (s, k))
            if i < used:  # later stages only depend on earlier ones: never needed
                self.codebooks.append(embed_sum / mx.maximum(usage, 1e-5)[:, None])

    def encode(self, latents: mx.array) -> list[mx.array]:
        """latents [T, D] -> the codes [T] of each used stage."""
        residual = latents if self.input_proj is None else latents @ self.input_proj  # [T, K]
        codes = []
        for vectors in self.codebooks:  # [S, K]
            # Squared Euclidean distance as torch.cdist's matrix path computes it.
            dist = (residual * residual).sum(-1, keepdims=True) - 2 * residual @ vectors.T
            idx = mx.argmin(dist + (vectors * vectors).sum(-1), axis=-1)
            residual = residual - vectors[idx]
            codes.append(idx)
        return codes


class CodecEncoder:
    """Mimi encoder of the 12 Hz speech tokenizer: 24 kHz waveform [N] -> codes [T, 16]."""

    def __init__(self, config: dict | MimiEncoderConfig, num_codebooks: int, weights: Weights):
        cfg = config if isinstance(config, MimiEncoderConfig) else MimiEncoderConfig.from_dict(config)
        if not cfg.num_semantic_quantizers <= num_codebooks <= cfg.num_quantizers:
            raise ValueError(
                f"num_codebooks {num_codebooks} outside [{cfg.num_semantic_quantizers}, {cfg.num_quantizers}]"
            )
        w, d = weights, cfg.hidden_size
        self.config, self.num_codebooks = cfg, num_codebooks
        self.samples_per_frame = cfg.samples_per_frame
        self.encoder = SeanetEncoder(w, cfg)
        self.layers = [
            TransformerLayer(w, f"encoder_transformer.layers.{i}", cfg) for i in range(cfg.num_hidden_layers)
        ]
        # Halves the frame rate (25 -> 12.5 Hz); the only conv that pads by repeating the edge.
        self.downsample = CausalConv1d(
            w, "downsample", d, d, cfg.downsample_kernel, stride=2, bias=False, pad_mode="replicate"
        )
        n_sem = cfg.num_semantic_quantizers
        q = "quantizer.semantic_residual_vector_quantizer"
        self.semantic = ResidualVectorQuantizer(w, q, cfg, n_sem, min(num_codebooks, n_sem))
        q = "quantizer.acoustic_residual_vector_quantizer"
        self.acoustic = ResidualVectorQuantizer(
            w, q, cfg, cfg.num_quantizers - n_sem, max(0, num_codebooks - n_sem)
        )
        w.finish()
        evaluate_arrays(self)

    @classmethod
    def from_config(cls, config: SpeechTokenizerConfig, weights: Weights) -> CodecEncoder:
        return cls(config.encoder, config.encoder_valid_num_quantizers, weights)

    def num_frames(self, num_samples: int) -> int:
        """Code frames for a clip of `num_samples` samples: ceil(N / 1920)."""
        return -(-num_samples // self.samples_per_frame)

    def latents(self, wav_24k: np.ndarray) -> mx.array:
        """wav [N] at 24 kHz -> pre-quantization latents [T, D], T = ceil(N / 1920)."""
        x = mx.array(_check(wav_24k))[None, :, None]  # [1, N, 1]
        x = self.encoder(x)  # [1, T25, D]
        cos, sin = _rope_tables(x.shape[1], self.config.head_dim, self.config.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.downsample(x)[0]  # [T, D]

    def encode(self, wav_24k: np.ndarray) -> np.ndarray:
        """wav [N] float at 24 kHz -> codes [ceil(N / 1920), num_codebooks] int64, equal to the
        official `Qwen3TTSTokenizer.encode` of the clip."""
        latents = self.latents(wav_24k)
        codes = mx.stack(self.semantic.encode(latents) + self.acoustic.encode(latents), axis=-1)
        return np.array(codes).astype(np.int64)


def _check(wav: np.ndarray) -> np.ndarray:
    if not isinstance(wav, np.ndarray):
        raise ValueError(f"expected a numpy waveform, got {type(wav).__name__}")
    if wav.ndim != 1:
        raise ValueError(f"expected one clip of shape [samples], got shape {wav.shape}")
    if wav.shape[0] == 0:
        raise ValueError("empty audio: no samples")
    if not np.issubdtype(wav.dtype, np.floating):
        raise ValueError(f"expected float samples in [-1, 1], got dtype {wav.dtype}")
    if not np.isfinite(wav).all():
        raise ValueError("waveform contains NaN or infinite samples")
    # Like the official wrapper: no normalisation, float32.
    return wav.astype(np.float32, copy=False)


def load_codec_encoder(checkpoint: Checkpoint) -> CodecEncoder:
    """The reference-audio encoder (ICL voice cloning) of a checkpoint, in float32."""
    return CodecEncoder.from_config(checkpoint.codec, checkpoint_weights(checkpoint, "encoder", mx.float32))
