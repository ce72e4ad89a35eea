"""Speech-tokenizer encoder of the 12 Hz codec: 24 kHz reference audio -> codes (MODEL.md §1.5).

Only ICL voice cloning needs it (MODEL.md §2.3): the reference clip becomes `ref_code`, a
[T, 16] grid of codebook indices that the talker reads exactly like frames it generated itself.
The network is Kyutai's Mimi encoder (Défossez et al., 2024) as the official tokenizer runs it
(transformers' `MimiModel` with the decoder removed):

    wav [B, N] -> SEANet causal conv stack      [B, D, T25]   T25 = ceil(N / 960), 25 Hz
               -> causal transformer (RoPE)     [B, D, T25]
               -> stride-2 causal conv          [B, D, T]     T = ceil(N / 1920), 12.5 Hz
               -> split residual VQ             [B, T, Q]     Q = 16 of the 32 quantizers

Module, parameter and buffer names equal the official checkpoint keys under `encoder.` (prefix
removed), codebook buffers included, so that part of `speech_tokenizer/model.safetensors` loads
with `load_state_dict(strict=True)`.

Shapes: B batch, N samples, C channels, D hidden size, T25 / T frames at 25 / 12.5 Hz,
H heads, E head dim, K codebook dim, S codebook size, Q codebooks kept.

Facts about the official encoder an integrator should know (all reproduced here):
- No normalization of the waveform: the official `EncodecFeatureExtractor` only converts to
  float32 and right-pads a batch with zeros. Amplitude matters.
- The padding mask is not given to the network. A padded batch is encoded as if the zeros were
  audio and each row is then cut to ceil(len / 1920) frames; since every layer is causal only
  the last frame of a shorter row can differ from encoding that row alone (`encode_batch`).
- The config says `sliding_window: 250`, but transformers 4.57.3 (the version qwen-tts pins)
  builds a plain causal mask for Mimi's eager and SDPA attention, which is what the official
  tokenizer runs: every frame attends to all earlier frames. Only flash-attention-2 would apply
  the window. We follow the official default, so clips longer than 10 s (250 frames at 25 Hz)
  encode as they do officially, not as Kyutai's original streaming Mimi would.
- Codebook 0 comes from the one-codebook "semantic" RVQ, codebooks 1..15 from the first 15
  stages of the 31-stage "acoustic" RVQ. Both quantize the *same* latent, each after its own
  1x1 input projection; stages 16..31 are never needed (RVQ stages only depend on earlier ones).
- Codebooks are `embed_sum / cluster_usage.clamp(min=1e-5)` (EMA statistics, stored as buffers).
- Run it in float32. The official model runs in the dtype it was loaded in (the wrapper casts
  the waveform to it); only the nearest-code search is always fp32, so bf16 latents can pick
  other codes than the fp32 reference. `encode` casts the waveform to the weights' dtype/device.
- Only the first `encoder_valid_num_quantizers` (16) codebooks are returned; the released
  file still holds all 32 codebooks, so the state dict has them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import SpeechTokenizerConfig
from engine.mimi_config import DEFAULT_NUM_CODEBOOKS, MimiEncoderConfig


class CausalConv1d(nn.Module):
    """Conv1d that sees only the past: [B, Cin, L] -> [B, Cout, ceil(L / stride)].

    Left padding is the receptive field minus the stride. When L is not a multiple of the stride
    the input is also padded on the right so the last partial window still yields a frame; that
    is what makes the frame count ceil(N / 1920) end to end.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, bias=bias)
        self.stride = stride
        self.pad_left = (kernel_size - 1) * dilation + 1 - stride
        self.pad_mode = pad_mode

    def forward(self, x: Tensor) -> Tensor:
        pad_right = -x.shape[-1] % self.stride
        return self.conv(F.pad(x, (self.pad_left, pad_right), mode=self.pad_mode))


class ResidualUnit(nn.Module):
    """x + Conv_k1(ELU(Conv_k(ELU(x)))), the bottleneck halving the channels."""

    def __init__(self, cfg: MimiEncoderConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // cfg.compress
        # nn.Sequential so that the convs sit at `block.1` and `block.3` like the checkpoint keys
        self.block = nn.Sequential(
            nn.ELU(),
            CausalConv1d(dim, hidden, cfg.residual_kernel_size, dilation=dilation, pad_mode=cfg.pad_mode),
            nn.ELU(),
            CausalConv1d(hidden, dim, 1, pad_mode=cfg.pad_mode),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class SeanetEncoder(nn.Module):
    """[B, 1, N] -> [B, D, ceil(N / hop)]: conv, then per ratio (reversed: 4, 5, 6, 8) residual
    units and a strided conv that doubles the channels, then ELU and a conv to D."""

    def __init__(self, cfg: MimiEncoderConfig):
        super().__init__()
        layers: list[nn.Module] = [
            CausalConv1d(cfg.audio_channels, cfg.num_filters, cfg.kernel_size, pad_mode=cfg.pad_mode)
        ]
        channels = cfg.num_filters
        for ratio in reversed(cfg.upsampling_ratios):
            for j in range(cfg.num_residual_layers):
                layers.append(ResidualUnit(cfg, channels, cfg.dilation_growth_rate**j))
            layers.append(nn.ELU())
            layers.append(
                CausalConv1d(channels, channels * 2, ratio * 2, stride=ratio, pad_mode=cfg.pad_mode)
            )
            channels *= 2
        layers.append(nn.ELU())
        layers.append(CausalConv1d(channels, cfg.hidden_size, cfg.last_kernel_size, pad_mode=cfg.pad_mode))
        # The parameterless ELUs keep their slots: checkpoint keys number every layer.
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


# --------------------------------------------------------------------------------------------
# Transformer (pre-norm LayerNorm, RoPE, causal attention, layer scale)


def _rope(
    length: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin [T25, E] for positions 0..length-1, computed in fp32 like the official tables."""
    # inv_freq on the CPU in fp32 (as HF builds it at init), so every device gets the same table
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    freqs = torch.outer(torch.arange(length, device=device).float(), inv_freq.to(device))  # [T25, E/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [B, H, T25, E] by position, halves layout (not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LayerScale(nn.Module):
    """Learned per-channel scale on each residual branch (Touvron et al., 2021)."""

    def __init__(self, dim: int, initial_scale: float):
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), initial_scale))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x


class SelfAttention(nn.Module):
    def __init__(self, cfg: MimiEncoderConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        d, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T25, E]
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        # Full causal attention, no sliding window: see the module docstring.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T25, E]
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: MimiEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as transformers' "gelu"


class TransformerLayer(nn.Module):
    def __init__(self, cfg: MimiEncoderConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), rope))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """[B, T25, D] -> [B, T25, D]; positions start at 0 for every clip."""

    def __init__(self, cfg: MimiEncoderConfig):
        super().__init__()
        self.head_dim, self.theta = cfg.head_dim, cfg.rope_theta
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: Tensor) -> Tensor:
        rope = _rope(x.shape[1], self.head_dim, self.theta, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, rope)
        return x


# --------------------------------------------------------------------------------------------
# Split residual vector quantizer (encode direction only)


class Codebook(nn.Module):
    """S code vectors of dim K, kept as EMA statistics: vector = embed_sum / cluster_usage."""

    initialized: Tensor
    cluster_usage: Tensor
    embed_sum: Tensor

    def __init__(self, size: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        # Buffers, not parameters, as in the checkpoint; `initialized` is unused but stored.
        self.register_buffer("initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(size))
        self.register_buffer("embed_sum", torch.zeros(size, dim))

    def vectors(self) -> Tensor:  # [S, K]
        return self.embed_sum / self.cluster_usage.clamp(min=self.eps)[:, None]


class VectorQuantizer(nn.Module):
    """One RVQ stage: the nearest code vector (Euclidean) to each frame."""

    def __init__(self, cfg: MimiEncoderConfig):
        super().__init__()
        self.codebook = Codebook(cfg.codebook_size, cfg.codebook_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, K] -> (indices [B, T], their code vectors [B, T, K])."""
        b, t, k = x.shape
        vectors = self.codebook.vectors()  # [S, K]
        # torch.cdist on [B*T, K] rows in fp32 is the official distance kernel; using the same
        # one makes near-ties round the same way, so the codes match bit for bit.
        dist = torch.cdist(x.reshape(1, b * t, k).float(), vectors[None].float())[0]  # [B*T, S]
        idx = dist.argmin(dim=-1).view(b, t)
        return idx, F.embedding(idx, vectors)


class ResidualVectorQuantizer(nn.Module):
    """Project D -> K (1x1 conv), then each stage codes what the previous stages left over."""

    def __init__(self, cfg: MimiEncoderConfig, stages: int):
        super().__init__()
        self.layers = nn.ModuleList(VectorQuantizer(cfg) for _ in range(stages))
        self.input_proj: nn.Conv1d | None = None
        self.output_proj: nn.Conv1d | None = None
        if cfg.vector_quantization_hidden_dimension != cfg.hidden_size:
            k, d = cfg.vector_quantization_hidden_dimension, cfg.hidden_size
            self.input_proj = nn.Conv1d(d, k, 1, bias=False)
            # decode side only; kept so the checkpoint loads strictly
            self.output_proj = nn.Conv1d(k, d, 1, bias=False)

    def encode(self, latents: Tensor, stages: int) -> Tensor:
        """latents [B, D, T] -> codes [B, T, stages] of the first `stages` stages."""
        x = latents if self.input_proj is None else self.input_proj(latents)
        residual = x.transpose(1, 2)  # [B, T, K]
        codes = []
        for vq in self.layers[:stages]:
            idx, quantized = vq(residual)
            residual = residual - quantized
            codes.append(idx)
        return torch.stack(codes, dim=-1)


class SplitResidualVectorQuantizer(nn.Module):
    """Codebook 0 from the semantic RVQ, the rest from the acoustic RVQ, on the same latent."""

    def __init__(self, cfg: MimiEncoderConfig):
        super().__init__()
        self.num_semantic = cfg.num_semantic_quantizers
        self.semantic_residual_vector_quantizer = ResidualVectorQuantizer(cfg, cfg.num_semantic_quantizers)
        self.acoustic_residual_vector_quantizer = ResidualVectorQuantizer(
            cfg, cfg.num_quantizers - cfg.num_semantic_quantizers
        )

    def encode(self, latents: Tensor, num_codebooks: int) -> Tensor:
        """latents [B, D, T] -> codes [B, T, num_codebooks]."""
        codes = self.semantic_residual_vector_quantizer.encode(latents, min(num_codebooks, self.num_semantic))
        if num_codebooks > self.num_semantic:
            acoustic = self.acoustic_residual_vector_quantizer.encode(
                latents, num_codebooks - self.num_semantic
            )
            codes = torch.cat([codes, acoustic], dim=-1)
        return codes


# --------------------------------------------------------------------------------------------
# The encoder


class CodecEncoder(nn.Module):
    """Mimi encoder of the 12 Hz speech tokenizer: 24 kHz waveform -> [B, T, 16] codes."""

    def __init__(
        self, config: Mapping[str, Any] | MimiEncoderConfig, num_codebooks: int = DEFAULT_NUM_CODEBOOKS
    ):
        """`config` is the raw `encoder_config` dict of speech_tokenizer/config.json
        (`SpeechTokenizerConfig.encoder`); `num_codebooks` its `encoder_valid_num_quantizers`."""
        super().__init__()
        cfg = config if isinstance(config, MimiEncoderConfig) else MimiEncoderConfig.from_dict(config)
        if not cfg.num_semantic_quantizers <= num_codebooks <= cfg.num_quantizers:
            raise ValueError(
                f"num_codebooks {num_codebooks} outside [{cfg.num_semantic_quantizers}, {cfg.num_quantizers}]"
            )
        self.config = cfg
        self.num_codebooks = num_codebooks
        self.sample_rate = cfg.sampling_rate
        self.samples_per_frame = cfg.samples_per_frame
        self.encoder = SeanetEncoder(cfg)
        self.encoder_transformer = Transformer(cfg)
        # Halves the frame rate (25 -> 12.5 Hz); the only conv that pads by repeating the edge.
        self.downsample = CausalConv1d(
            cfg.hidden_size,
            cfg.hidden_size,
            cfg.downsample_kernel,
            stride=2,
            bias=False,
            pad_mode="replicate",
        )
        self.quantizer = SplitResidualVectorQuantizer(cfg)

    @classmethod
    def from_config(cls, config: SpeechTokenizerConfig) -> CodecEncoder:
        return cls(config.encoder, config.encoder_valid_num_quantizers)

    def num_frames(self, num_samples: int) -> int:
        """Code frames for a clip of `num_samples` samples: ceil(N / 1920)."""
        return -(-num_samples // self.samples_per_frame)

    @torch.no_grad()
    def latents(self, wav: Tensor) -> Tensor:
        """wav [B, N] at 24 kHz -> pre-quantization latents [B, D, T], T = ceil(N / 1920)."""
        x = self._check(wav)[:, None, :]  # [B, 1, N]
        x = self.encoder(x)  # [B, D, T25]
        x = self.encoder_transformer(x.transpose(1, 2)).transpose(1, 2)  # [B, D, T25]
        return self.downsample(x)  # [B, D, T]

    @torch.no_grad()
    def encode(self, wav: Tensor) -> Tensor:
        """wav [B, N] at 24 kHz, every row full length -> codes [B, T, num_codebooks] int64.

        Equal to the official `Qwen3TTSTokenizer.encode` of each row when B = 1 or all rows are
        real audio of length N. For clips of different lengths use `encode_batch`.
        """
        return self.quantizer.encode(self.latents(wav), self.num_codebooks)

    @torch.no_grad()
    def encode_batch(self, wavs: Sequence[Tensor]) -> list[Tensor]:
        """Clips [N_i] of any lengths -> codes [ceil(N_i / 1920), num_codebooks] each.

        Mirrors the official batched path: right-pad with zeros to the longest clip, encode
        once, cut each row to its own frame count.
        """
        if len(wavs) == 0:
            raise ValueError("encode_batch needs at least one clip")
        for i, w in enumerate(wavs):
            if not isinstance(w, Tensor) or w.ndim != 1:
                shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
                raise ValueError(f"clip {i}: expected a 1-D torch.Tensor waveform [samples], got {shape}")
            if w.shape[0] == 0:
                raise ValueError(f"clip {i}: empty audio")
        longest = max(w.shape[0] for w in wavs)
        batch = torch.stack([F.pad(w, (0, longest - w.shape[0])) for w in wavs])  # [B, N]
        codes = self.encode(batch)
        return [c[: self.num_frames(w.shape[0])] for c, w in zip(codes, wavs, strict=True)]

    def _check(self, wav: Tensor) -> Tensor:
        if not isinstance(wav, Tensor):
            raise ValueError(f"expected a torch.Tensor waveform, got {type(wav).__name__}")
        if wav.ndim != 2:
            raise ValueError(f"expected a waveform of shape [batch, samples], got shape {tuple(wav.shape)}")
        if wav.shape[0] == 0 or wav.shape[1] == 0:
            raise ValueError(f"empty audio: waveform shape {tuple(wav.shape)}")
        if not wav.is_floating_point():
            raise ValueError(f"expected float samples in [-1, 1], got dtype {wav.dtype}")
        if not bool(torch.isfinite(wav).all()):
            raise ValueError("waveform contains NaN or infinite samples")
        # Like the official wrapper, run in the model's dtype (float32 unless cast).
        w = self.downsample.conv.weight
        return wav.to(device=w.device, dtype=w.dtype)
