"""Frozen configuration read from a checkpoint's JSON files (the official Qwen3-TTS layout).

Every field the engine relies on is read explicitly and validated once here, so a bad or
foreign checkpoint fails at load time with a message naming the file and the key, never with a
shape error deep inside a forward pass. The official config classes have defaults that are
*not* the released values (20 talker layers, codec ids 4196+, ...): we never fall back to
those; a missing required key is an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPES = ("base", "custom_voice", "voice_design")


class ConfigError(ValueError):
    """A checkpoint's configuration is missing a key or holds an unusable value."""


def _req(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}: required key {key!r} is missing")
    return d[key]


def _int_map(d: Any, where: str) -> dict[str, int]:
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
    out: dict[str, int] = {}
    for k, v in d.items():
        # Released files store plain ints; tolerate the one-element lists some exporters write.
        if isinstance(v, list) and len(v) == 1:
            v = v[0]
        if not isinstance(v, int):
            raise ConfigError(f"{where}[{k!r}]: expected an integer id, got {v!r}")
        out[str(k).lower()] = v
    return out


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of one Qwen3-style decoder stack (talker or code predictor)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> TransformerConfig:
        hidden = int(_req(d, "hidden_size", where))
        heads = int(_req(d, "num_attention_heads", where))
        cfg = cls(
            hidden_size=hidden,
            intermediate_size=int(_req(d, "intermediate_size", where)),
            num_layers=int(_req(d, "num_hidden_layers", where)),
            num_heads=heads,
            num_kv_heads=int(_req(d, "num_key_value_heads", where)),
            # The official classes silently default head_dim to hidden/heads (64 for 0.6B,
            # where the released value is 128), so it is required here.
            head_dim=int(_req(d, "head_dim", where)),
            rope_theta=float(_req(d, "rope_theta", where)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        )
        if cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (Qwen3-TTS uses silu)")
        if d.get("attention_bias"):
            raise ConfigError(f"{where}: attention_bias=true is not supported (Qwen3-TTS has none)")
        return cfg


@dataclass(frozen=True)
class CodePredictorConfig:
    """The 5-layer "sub-talker" that predicts codebooks 1..15 of each frame."""

    transformer: TransformerConfig
    vocab_size: int  # entries per codebook (2048)
    num_code_groups: int  # 16: codebook 0 from the talker, 15 from here

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> CodePredictorConfig:
        return cls(
            transformer=TransformerConfig.from_dict(d, where),
            vocab_size=int(_req(d, "vocab_size", where)),
            num_code_groups=int(_req(d, "num_code_groups", where)),
        )


@dataclass(frozen=True)
class TalkerConfig:
    transformer: TransformerConfig
    vocab_size: int  # codec vocabulary: 2048 codes + specials/languages/speakers = 3072
    text_vocab_size: int
    text_hidden_size: int
    num_code_groups: int
    codec_pad_id: int
    codec_bos_id: int
    codec_eos_id: int
    codec_think_id: int
    codec_nothink_id: int
    codec_think_bos_id: int
    codec_think_eos_id: int
    codec_language_id: dict[str, int]
    spk_id: dict[str, int]
    # speaker -> dialect language name (a key of codec_language_id), for dialect speakers only
    spk_is_dialect: dict[str, str]
    code_predictor: CodePredictorConfig

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> TalkerConfig:
        rope = d.get("rope_scaling")
        head_dim = int(_req(d, "head_dim", where))
        if isinstance(rope, Mapping) and "mrope_section" in rope:
            # The 3-D M-RoPE degenerates to 1-D RoPE (all three position rows are equal), but
            # the section sizes must still cover the rotary half, as the official code asserts.
            if sum(rope["mrope_section"]) != head_dim // 2:
                raise ConfigError(f"{where}: rope_scaling.mrope_section must sum to head_dim/2")
        dialect_raw = d.get("spk_is_dialect") or {}
        dialects = {str(k).lower(): str(v).lower() for k, v in dialect_raw.items() if v}
        cp_raw = _req(d, "code_predictor_config", where)
        cfg = cls(
            transformer=TransformerConfig.from_dict(d, where),
            vocab_size=int(_req(d, "vocab_size", where)),
            text_vocab_size=int(_req(d, "text_vocab_size", where)),
            text_hidden_size=int(_req(d, "text_hidden_size", where)),
            num_code_groups=int(_req(d, "num_code_groups", where)),
            codec_pad_id=int(_req(d, "codec_pad_id", where)),
            codec_bos_id=int(_req(d, "codec_bos_id", where)),
            codec_eos_id=int(_req(d, "codec_eos_token_id", where)),
            codec_think_id=int(_req(d, "codec_think_id", where)),
            codec_nothink_id=int(_req(d, "codec_nothink_id", where)),
            codec_think_bos_id=int(_req(d, "codec_think_bos_id", where)),
            codec_think_eos_id=int(_req(d, "codec_think_eos_id", where)),
            codec_language_id=_int_map(_req(d, "codec_language_id", where), f"{where}.codec_language_id"),
            spk_id=_int_map(d.get("spk_id"), f"{where}.spk_id"),
            spk_is_dialect=dialects,
            code_predictor=CodePredictorConfig.from_dict(cp_raw, f"{where}.code_predictor_config"),
        )
        for spk, dialect in cfg.spk_is_dialect.items():
            if dialect not in cfg.codec_language_id:
                raise ConfigError(f"{where}.spk_is_dialect[{spk!r}]: unknown dialect {dialect!r}")
        if cfg.code_predictor.num_code_groups != cfg.num_code_groups:
            raise ConfigError(f"{where}: talker and code predictor disagree on num_code_groups")
        return cfg

    @property
    def codebook_size(self) -> int:
        return self.code_predictor.vocab_size


@dataclass(frozen=True)
class SpeakerEncoderConfig:
    """ECAPA-TDNN x-vector extractor of the Base models."""

    mel_dim: int = 128
    enc_dim: int = 1024
    enc_channels: tuple[int, ...] = (512, 512, 512, 512, 1536)
    enc_kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    enc_dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 128
    enc_res2net_scale: int = 8
    enc_se_channels: int = 128
    sample_rate: int = 24000

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpeakerEncoderConfig:
        kw: dict[str, Any] = {}
        for f in cls.__dataclass_fields__:
            if f in d and d[f] is not None:
                v = d[f]
                kw[f] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)


@dataclass(frozen=True)
class ModelConfig:
    """Root `config.json` of a Qwen3-TTS-12Hz checkpoint."""

    model_type: str  # base | custom_voice | voice_design
    model_size: str  # "0b6" | "1b7" | anything else for custom shapes
    talker: TalkerConfig
    speaker_encoder: SpeakerEncoderConfig | None
    im_start_id: int = 151644
    im_end_id: int = 151645
    tts_pad_id: int = 151671
    tts_bos_id: int = 151672
    tts_eos_id: int = 151673

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
        model_type = str(_req(d, "tts_model_type", where))
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{where}: tts_model_type {model_type!r} is not one of {MODEL_TYPES}")
        tokenizer_type = d.get("tokenizer_type", "qwen3_tts_tokenizer_12hz")
        if tokenizer_type != "qwen3_tts_tokenizer_12hz":
            raise ConfigError(
                f"{where}: tokenizer_type {tokenizer_type!r} is not supported; this engine serves the "
                "12 Hz family (qwen3_tts_tokenizer_12hz)"
            )
        spk = d.get("speaker_encoder_config")
        return cls(
            model_type=model_type,
            model_size=str(d.get("tts_model_size", "")),
            talker=TalkerConfig.from_dict(_req(d, "talker_config", where), f"{where}.talker_config"),
            speaker_encoder=SpeakerEncoderConfig.from_dict(spk or {}) if model_type == "base" else None,
            im_start_id=int(d.get("im_start_token_id", 151644)),
            im_end_id=int(d.get("im_end_token_id", 151645)),
            tts_pad_id=int(d.get("tts_pad_token_id", 151671)),
            tts_bos_id=int(d.get("tts_bos_token_id", 151672)),
            tts_eos_id=int(d.get("tts_eos_token_id", 151673)),
        )

    @property
    def speakers(self) -> list[str]:
        return sorted(self.talker.spk_id)

    @property
    def languages(self) -> list[str]:
        """Selectable languages: "auto" plus every non-dialect language id (as the official API)."""
        return ["auto", *sorted(k for k in self.talker.codec_language_id if "dialect" not in k)]


@dataclass(frozen=True)
class GenerationConfig:
    """`generation_config.json`: sampling defaults and the frame cap, with the official meaning.

    `max_new_tokens` counts sampled codebook-0 tokens including the one that would follow the
    last frame, so N yields at most N-1 frames (the official code drops the last sample).
    """

    do_sample: bool = True
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 0.9
    repetition_penalty: float = 1.05
    subtalker_dosample: bool = True
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0
    subtalker_temperature: float = 0.9
    # qwen-tts' wrapper falls back to 2048 when the file lacks the key.
    max_new_tokens: int = 2048

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenerationConfig:
        kw = {f: d[f] for f in cls.__dataclass_fields__ if f in d and d[f] is not None}
        return cls(**kw)

    @property
    def max_frames(self) -> int:
        return max(0, self.max_new_tokens - 1)


@dataclass(frozen=True)
class CodecDecoderConfig:
    """`speech_tokenizer/config.json` -> decoder_config (the 12 Hz codec's decoder)."""

    latent_dim: int
    codebook_dim: int
    codebook_size: int
    decoder_dim: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int
    num_quantizers: int
    num_semantic_quantizers: int
    upsample_rates: tuple[int, ...]
    upsampling_ratios: tuple[int, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> CodecDecoderConfig:
        return cls(
            latent_dim=int(_req(d, "latent_dim", where)),
            codebook_dim=int(_req(d, "codebook_dim", where)),
            codebook_size=int(_req(d, "codebook_size", where)),
            decoder_dim=int(_req(d, "decoder_dim", where)),
            hidden_size=int(_req(d, "hidden_size", where)),
            intermediate_size=int(_req(d, "intermediate_size", where)),
            head_dim=int(_req(d, "head_dim", where)),
            num_heads=int(_req(d, "num_attention_heads", where)),
            num_kv_heads=int(d.get("num_key_value_heads", d["num_attention_heads"])),
            num_layers=int(_req(d, "num_hidden_layers", where)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            sliding_window=int(d.get("sliding_window", 72)),
            num_quantizers=int(_req(d, "num_quantizers", where)),
            num_semantic_quantizers=int(d.get("num_semantic_quantizers", 1)),
            upsample_rates=tuple(int(x) for x in _req(d, "upsample_rates", where)),
            upsampling_ratios=tuple(int(x) for x in _req(d, "upsampling_ratios", where)),
        )

    @property
    def samples_per_frame(self) -> int:
        n = 1
        for r in (*self.upsample_rates, *self.upsampling_ratios):
            n *= r
        return n


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    decoder: CodecDecoderConfig
    # The Mimi encoder's config is kept raw: only the reference-audio path reads it.
    encoder: dict[str, Any] = field(default_factory=dict)
    sample_rate: int = 24000
    encoder_valid_num_quantizers: int = 16

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], where: str = "speech_tokenizer/config.json"
    ) -> SpeechTokenizerConfig:
        model_type = d.get("model_type", "qwen3_tts_tokenizer_12hz")
        if model_type != "qwen3_tts_tokenizer_12hz":
            raise ConfigError(f"{where}: model_type {model_type!r} is not the 12 Hz speech tokenizer")
        dec = CodecDecoderConfig.from_dict(_req(d, "decoder_config", where), f"{where}.decoder_config")
        sr = int(d.get("output_sample_rate", 24000))
        upsample = int(d.get("decode_upsample_rate", dec.samples_per_frame))
        if upsample != dec.samples_per_frame:
            raise ConfigError(f"{where}: decode_upsample_rate {upsample} != product of upsample rates")
        return cls(
            decoder=dec,
            encoder=dict(d.get("encoder_config") or {}),
            sample_rate=sr,
            encoder_valid_num_quantizers=int(d.get("encoder_valid_num_quantizers", 16)),
        )


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found (is this a Qwen3-TTS-12Hz checkpoint directory?)"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data
