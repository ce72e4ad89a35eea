"""The Mimi encoder's configuration (the speech tokenizer's `encoder_config`), shared by the
torch and MLX codec encoders; no tensor library."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The official tokenizer keeps the first `encoder_valid_num_quantizers` codebooks.
DEFAULT_NUM_CODEBOOKS = 16


@dataclass(frozen=True)
class MimiEncoderConfig:
    """The fields of a `MimiConfig` dict that the encoder reads (defaults: transformers' own)."""

    sampling_rate: int = 24000
    audio_channels: int = 1
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    compress: int = 2
    use_causal_conv: bool = True
    use_conv_shortcut: bool = False
    pad_mode: str = "constant"
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    intermediate_size: int = 2048
    hidden_act: str = "gelu"
    norm_eps: float = 1e-5
    layer_scale_initial_scale: float = 0.01
    rope_theta: float = 10000.0
    attention_bias: bool = False
    codebook_size: int = 2048
    codebook_dim: int = 256
    vector_quantization_hidden_dimension: int = 256
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1
    frame_rate: float = 12.5

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MimiEncoderConfig:
        ratios = tuple(int(r) for r in d.get("upsampling_ratios") or (8, 6, 5, 4))
        sr = int(d.get("sampling_rate", 24000))
        hidden = int(d.get("hidden_size", 512))
        heads = int(d.get("num_attention_heads", 8))
        # released configs store the frame rate as `_frame_rate`; MimiConfig derives it otherwise
        frame_rate = d.get("frame_rate", d.get("_frame_rate")) or sr / (math.prod(ratios) * 2)
        rope = d.get("rope_scaling")
        if isinstance(rope, Mapping) and rope.get("rope_type", rope.get("type")) not in (None, "default"):
            raise ValueError(f"Mimi encoder: rope_scaling {rope!r} is not supported")
        cfg = cls(
            sampling_rate=sr,
            audio_channels=int(d.get("audio_channels", 1)),
            num_filters=int(d.get("num_filters", 64)),
            num_residual_layers=int(d.get("num_residual_layers", 1)),
            upsampling_ratios=ratios,
            kernel_size=int(d.get("kernel_size", 7)),
            last_kernel_size=int(d.get("last_kernel_size", 3)),
            residual_kernel_size=int(d.get("residual_kernel_size", 3)),
            dilation_growth_rate=int(d.get("dilation_growth_rate", 2)),
            compress=int(d.get("compress", 2)),
            use_causal_conv=bool(d.get("use_causal_conv", True)),
            use_conv_shortcut=bool(d.get("use_conv_shortcut", False)),
            pad_mode=str(d.get("pad_mode", "constant")),
            hidden_size=hidden,
            num_hidden_layers=int(d.get("num_hidden_layers", 8)),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads", 8)),
            head_dim=int(d.get("head_dim") or hidden // heads),
            intermediate_size=int(d.get("intermediate_size", 2048)),
            hidden_act=str(d.get("hidden_act", "gelu")),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            layer_scale_initial_scale=float(d.get("layer_scale_initial_scale", 0.01)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            attention_bias=bool(d.get("attention_bias", False)),
            codebook_size=int(d.get("codebook_size", 2048)),
            codebook_dim=int(d.get("codebook_dim") or hidden),
            vector_quantization_hidden_dimension=int(d.get("vector_quantization_hidden_dimension", 256)),
            num_quantizers=int(d.get("num_quantizers", 32)),
            num_semantic_quantizers=int(d.get("num_semantic_quantizers", 1)),
            frame_rate=float(frame_rate),
        )
        cfg.validate()
        return cfg

    @property
    def hop_length(self) -> int:
        """Samples per frame of the SEANet stack (960 released: 25 Hz)."""
        return math.prod(self.upsampling_ratios)

    @property
    def downsample_kernel(self) -> int:
        # MimiModel: kernel 2 * int(encodec_frame_rate / frame_rate), stride fixed at 2
        encodec_frame_rate = math.ceil(self.sampling_rate / self.hop_length)
        return 2 * int(encodec_frame_rate / self.frame_rate)

    @property
    def samples_per_frame(self) -> int:
        """Samples per output code frame (1920 released: 12.5 Hz)."""
        return self.hop_length * 2

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"Mimi encoder config: {what}")

        # Options the 12 Hz tokenizer never uses are refused rather than half-supported.
        need(self.audio_channels == 1, f"audio_channels {self.audio_channels} (only mono is supported)")
        need(self.use_causal_conv, "use_causal_conv=False is not supported")
        need(not self.use_conv_shortcut, "use_conv_shortcut=True is not supported")
        need(self.pad_mode in ("constant", "replicate"), f"pad_mode {self.pad_mode!r} is not supported")
        need(self.hidden_act == "gelu", f"hidden_act {self.hidden_act!r} is not supported (gelu only)")
        need(
            math.ceil(self.sampling_rate / self.hop_length) != self.frame_rate,
            "frame_rate equals the SEANet rate: no downsample layer, not the 12 Hz tokenizer",
        )
        need(self.num_attention_heads % self.num_key_value_heads == 0, "heads not a multiple of KV heads")
        need(self.head_dim % 2 == 0, "head_dim must be even for RoPE")
        need(
            self.codebook_dim == self.vector_quantization_hidden_dimension,
            f"codebook_dim {self.codebook_dim} != vector_quantization_hidden_dimension "
            f"{self.vector_quantization_hidden_dimension}",
        )
        need(
            0 < self.num_semantic_quantizers < self.num_quantizers,
            "num_semantic_quantizers must be in [1, num_quantizers)",
        )
