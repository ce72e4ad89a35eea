"""Checkpoints: resolve a model spec, read the official directory layout, describe random shapes.

A model spec is one of
- a local directory in the official layout (MODEL.md §6.2);
- a Hugging Face hub id such as `Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice` (the local cache first,
  then a download; offline and not cached is a clear error);
- `random:<shape>[:<type>]` with shape `tiny`, `tiny-mtp` (tiny with the 1.7B-style
  `small_to_mtp_projection`), `0.6b` or `1.7b` and type `custom_voice` (default), `base` or
  `voice_design`: random weights of that shape built in memory. The audio is noise; these exist
  for benchmarks and plumbing tests. Their weights are shaped so an utterance ends (EOS) right
  after its text, as a trained model's does, instead of running to the frame cap.

Nothing here depends on a tensor backend: weights are read by the backend's loader.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import (
    ConfigError,
    GenerationConfig,
    ModelConfig,
    SpeechTokenizerConfig,
    read_json,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
RANDOM_SHAPES = ("tiny", "tiny-mtp", "0.6b", "1.7b")


class CheckpointError(RuntimeError):
    """A model spec cannot be resolved or its files are missing or corrupt."""


@dataclass(frozen=True)
class Checkpoint:
    """A resolved model: its configuration and where its files are (None for random specs)."""

    name: str
    config: ModelConfig
    generation: GenerationConfig
    codec: SpeechTokenizerConfig
    path: Path | None
    tokenizer_dir: Path
    random_seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.path is None

    @property
    def weights_file(self) -> Path:
        assert self.path is not None
        return self.path / "model.safetensors"

    @property
    def codec_weights_file(self) -> Path:
        assert self.path is not None
        return self.path / "speech_tokenizer" / "model.safetensors"


def check_tensor_shapes(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """Refuse weights whose tensor names or shapes do not match the config (every backend's
    loader checks the same way), naming the first few offenders."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
    if unexpected:
        raise CheckpointError(
            f"{where}: {len(unexpected)} unexpected tensors, e.g. {', '.join(unexpected[:3])}"
        )
    for k, shape in found.items():
        if tuple(shape) != tuple(expected[k]):
            raise CheckpointError(
                f"{where}: {k} has shape {tuple(shape)}, the config implies {tuple(expected[k])}"
            )


def load_checkpoint(spec: str, *, random_seed: int = 0) -> Checkpoint:
    """Resolve `spec` (directory, hub id or random:...) and read its configuration."""
    if spec.startswith("random:"):
        return _random_checkpoint(spec, random_seed)
    path = resolve_path(spec)
    return read_checkpoint_dir(path, name=spec)


def read_checkpoint_dir(path: Path, *, name: str | None = None) -> Checkpoint:
    missing = [
        f
        for f in (
            "config.json",
            "model.safetensors",
            "speech_tokenizer/config.json",
            "speech_tokenizer/model.safetensors",
        )
        if not (path / f).is_file()
    ]
    if missing:
        raise CheckpointError(
            f"{path} is not a complete Qwen3-TTS-12Hz checkpoint: missing {', '.join(missing)}"
        )
    try:
        config = ModelConfig.from_dict(read_json(path / "config.json"), where=str(path / "config.json"))
        codec_path = path / "speech_tokenizer" / "config.json"
        codec = SpeechTokenizerConfig.from_dict(read_json(codec_path), where=str(codec_path))
        gen_path = path / "generation_config.json"
        generation = (
            GenerationConfig.from_dict(read_json(gen_path)) if gen_path.is_file() else GenerationConfig()
        )
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return Checkpoint(
        name=name or str(path),
        config=config,
        generation=generation,
        codec=codec,
        path=path,
        tokenizer_dir=path,
    )


def resolve_path(spec: str) -> Path:
    """A local directory as is; a hub id through the Hugging Face cache (downloading if allowed)."""
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{spec} is a file; expected a checkpoint directory or a hub id")
    if not _HUB_ID.match(spec):
        raise CheckpointError(
            f"model {spec!r} is neither a local directory nor a hub id like {DEFAULT_MODEL!r} "
            f"(random weights: random:{'|'.join(RANDOM_SHAPES)})"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        pass
    if _offline():
        raise CheckpointError(
            f"model {spec!r} is not in the local Hugging Face cache and downloads are disabled "
            "(HF_HUB_OFFLINE is set). Download it on a connected machine with "
            f"`huggingface-cli download {spec}` or pass a local directory."
        )
    log.info("downloading %s from the Hugging Face hub", spec)
    try:
        return Path(snapshot_download(spec))
    except Exception as e:  # network errors come in many types; all mean the same to a user
        raise CheckpointError(
            f"model {spec!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}). Check the "
            "network or pass a local checkpoint directory."
        ) from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


# ---- Random shapes (official JSON layout) -----------------------------------------------------

LANGUAGES = {
    "chinese": 2055, "english": 2050, "german": 2053, "italian": 2070, "portuguese": 2071,
    "spanish": 2054, "japanese": 2058, "korean": 2064, "french": 2061, "russian": 2069,
}  # fmt: skip
DIALECTS = {"beijing_dialect": 2074, "sichuan_dialect": 2062}
SPEAKERS = {
    "serena": 3066, "vivian": 3065, "uncle_fu": 3010, "ryan": 3061, "aiden": 2861,
    "ono_anna": 2873, "sohee": 2864, "eric": 2875, "dylan": 2878,
}  # fmt: skip
SPEAKER_DIALECTS = {"eric": "sichuan_dialect", "dylan": "beijing_dialect"}


def _layers(
    hidden: int, inter: int, layers: int, heads: int, kv: int, head_dim: int, theta: float
) -> dict[str, Any]:
    return dict(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=head_dim, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=theta,
        attention_bias=False,
    )  # fmt: skip


def random_config_dicts(shape: str, model_type: str = "custom_voice") -> dict[str, dict[str, Any]]:
    """config.json, generation_config.json and speech_tokenizer/config.json for a random shape."""
    if shape not in RANDOM_SHAPES:
        raise CheckpointError(f"unknown random shape {shape!r}; choose one of {', '.join(RANDOM_SHAPES)}")
    if model_type not in ("custom_voice", "base", "voice_design"):
        raise CheckpointError(f"unknown model type {model_type!r}; choose custom_voice, base or voice_design")
    tiny = shape.startswith("tiny")
    talker: dict[str, Any]
    predictor: dict[str, Any]
    if tiny:
        h, cp_h = 64, (32 if shape == "tiny-mtp" else 64)
        talker = _layers(h, 128, 2, 4, 2, 16, 1e6) | dict(
            rope_scaling={"rope_type": "default", "mrope_section": [3, 3, 2], "interleaved": True},
            text_hidden_size=32,
        )
        predictor = _layers(cp_h, 2 * cp_h, 1, 2, 1, 16, 1e6)
    else:
        h = 1024 if shape == "0.6b" else 2048
        talker = _layers(h, 3 * h, 28, 16, 8, 128, 1e6) | dict(
            rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "interleaved": True},
            text_hidden_size=2048,
        )
        predictor = _layers(1024, 3072, 5, 16, 8, 128, 1e6)
    custom = model_type == "custom_voice"
    talker |= dict(
        vocab_size=3072, text_vocab_size=151936, num_code_groups=16, max_position_embeddings=32768,
        codec_eos_token_id=2150, codec_think_id=2154, codec_nothink_id=2155, codec_think_bos_id=2156,
        codec_think_eos_id=2157, codec_pad_id=2148, codec_bos_id=2149, position_id_per_seconds=13,
        codec_language_id=LANGUAGES | (DIALECTS if custom else {}),
        spk_id=dict(SPEAKERS) if custom else {},
        spk_is_dialect={s: SPEAKER_DIALECTS.get(s, False) for s in SPEAKERS} if custom else {},
        code_predictor_config=predictor | dict(vocab_size=2048, num_code_groups=16, max_position_embeddings=65536),
    )  # fmt: skip
    config = dict(
        architectures=["Qwen3TTSForConditionalGeneration"], model_type="qwen3_tts",
        tokenizer_type="qwen3_tts_tokenizer_12hz", tts_model_type=model_type,
        tts_model_size={"0.6b": "0b6", "1.7b": "1b7"}.get(shape, shape),
        im_start_token_id=151644, im_end_token_id=151645, tts_pad_token_id=151671,
        tts_bos_token_id=151672, tts_eos_token_id=151673, talker_config=talker,
        # The transformers version keeps the official loader off its tokenizer-regex rewrite
        # branch only for versions <= 4.57.2 (MODEL.md §6.4); tests compare ids anyway.
        transformers_version="4.57.3",
    )  # fmt: skip
    if model_type == "base":
        config["speaker_encoder_config"] = (
            dict(enc_dim=h, sample_rate=24000, enc_channels=[32, 32, 32, 32, 96], enc_attention_channels=16,
                 enc_se_channels=16, enc_res2net_scale=4)
            if tiny else dict(enc_dim=h, sample_rate=24000)
        )  # fmt: skip
    generation = dict(
        do_sample=True, top_k=50, top_p=1.0, temperature=0.9, repetition_penalty=1.05,
        subtalker_dosample=True, subtalker_top_k=50, subtalker_top_p=1.0, subtalker_temperature=0.9,
        max_new_tokens=8192,
    )  # fmt: skip
    return {
        "config.json": config,
        "generation_config.json": generation,
        "speech_tokenizer/config.json": codec_config_dict(tiny),
    }


def codec_config_dict(tiny: bool) -> dict[str, Any]:
    """speech_tokenizer/config.json: the released codec (MODEL.md §1.1) or a narrow variant
    that keeps every rate (1920 samples per frame, 72-frame window) and shrinks the widths."""
    decoder: dict[str, Any]
    encoder: dict[str, Any]
    if tiny:
        decoder = dict(
            latent_dim=64, codebook_dim=32, codebook_size=2048, decoder_dim=64, hidden_size=32,
            intermediate_size=64, head_dim=8, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
        )  # fmt: skip
        encoder = dict(
            num_filters=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            head_dim=8, intermediate_size=64, codebook_dim=16, vector_quantization_hidden_dimension=16,
            upsample_groups=32,
        )  # fmt: skip
    else:
        decoder = dict(
            latent_dim=1024, codebook_dim=512, codebook_size=2048, decoder_dim=1536, hidden_size=512,
            intermediate_size=1024, head_dim=64, num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=8,
        )  # fmt: skip
        encoder = dict(
            num_filters=64, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
            head_dim=64, intermediate_size=2048, codebook_dim=256, vector_quantization_hidden_dimension=256,
        )  # fmt: skip
    decoder |= dict(
        attention_bias=False, hidden_act="silu", layer_scale_initial_scale=0.01, max_position_embeddings=8000,
        num_quantizers=16, num_semantic_quantizers=1, rms_norm_eps=1e-5, rope_theta=10000,
        semantic_codebook_size=4096, sliding_window=72, upsample_rates=[8, 5, 4, 3], upsampling_ratios=[2, 2],
    )  # fmt: skip
    encoder |= dict(
        model_type="mimi", audio_channels=1, kernel_size=7, residual_kernel_size=3, last_kernel_size=3,
        num_residual_layers=1, compress=2, upsampling_ratios=[8, 6, 5, 4], hidden_act="gelu", norm_eps=1e-5,
        layer_scale_initial_scale=0.01, rope_theta=10000, max_position_embeddings=8000, sliding_window=250,
        num_quantizers=32, num_semantic_quantizers=1, codebook_size=2048, pad_mode="constant",
        use_causal_conv=True, sampling_rate=24000, frame_rate=12.5, dilation_growth_rate=2, trim_right_ratio=1.0,
        use_conv_shortcut=False, normalize=False, attention_bias=False, use_streaming=False,
    )  # fmt: skip
    return dict(
        architectures=["Qwen3TTSTokenizerV2Model"], model_type="qwen3_tts_tokenizer_12hz",
        encoder_valid_num_quantizers=16, input_sample_rate=24000, output_sample_rate=24000,
        decode_upsample_rate=1920, encode_downsample_rate=1920, decoder_config=decoder, encoder_config=encoder,
        transformers_version="4.57.3",
    )  # fmt: skip


def parse_random_spec(spec: str) -> tuple[str, str]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "random":
        raise CheckpointError(f"bad random model spec {spec!r}; expected random:<shape>[:<type>]")
    return parts[1].lower(), (parts[2].lower() if len(parts) == 3 else "custom_voice")


def _random_checkpoint(spec: str, seed: int) -> Checkpoint:
    from engine.text import write_tokenizer_files

    shape, model_type = parse_random_spec(spec)
    dicts = random_config_dicts(shape, model_type)
    log.warning("%s: RANDOM weights. The audio is noise; use this for plumbing and benchmarks only.", spec)
    return Checkpoint(
        name=spec,
        config=ModelConfig.from_dict(dicts["config.json"]),
        generation=GenerationConfig.from_dict(dicts["generation_config.json"]),
        codec=SpeechTokenizerConfig.from_dict(dicts["speech_tokenizer/config.json"]),
        path=None,
        tokenizer_dir=_cached_tokenizer_dir(write_tokenizer_files),
        random_seed=seed,
    )


def _cached_tokenizer_dir(writer: Any) -> Path:
    root = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "qwen3-tts-realtime"
        / "qwen2-tokenizer"
    )
    if not (root / "merges.txt").is_file():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        writer(tmp)
        try:
            tmp.rename(root)
        except OSError:  # another process won the race: its files are equivalent
            pass
    return root


def write_config_files(dest: Path, dicts: dict[str, dict[str, Any]]) -> None:
    for rel, data in dicts.items():
        f = dest / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(data, indent=2), encoding="utf-8")
    (dest / "preprocessor_config.json").write_text(
        json.dumps({"processor_class": "Qwen3TTSProcessor"}), encoding="utf-8"
    )
    (dest / "speech_tokenizer" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "chunk_length_s": None, "feature_extractor_type": "EncodecFeatureExtractor", "feature_size": 1,
                "overlap": None, "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True,
                "sampling_rate": 24000,
            }
        ),
        encoding="utf-8",
    )  # fmt: skip
