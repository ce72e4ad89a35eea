"""What a stream is opened with: fixed for its lifetime (they live in every utterance's prefill)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.backend import ResolvedVoice
from engine.errors import EngineError
from engine.prompt import TextMode, instruct_ids, prefill_needs, queue_prefix, resolve_language
from engine.sampling import SamplingParams

if TYPE_CHECKING:
    from engine.config import GenerationConfig, ModelConfig
    from engine.text import TextTokenizer
    from engine.voices import Voices

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SCHEDULE = (1, 2, 4, 8)
MAX_CHUNK_FRAMES = 64


@dataclass(frozen=True)
class StreamOptions:
    voice_name: str | None
    voice: ResolvedVoice
    language: str
    lang_id: int | None
    instruct: tuple[int, ...] | None
    sampling: SamplingParams
    chunk_schedule: tuple[int, ...]
    idle_flush_ms: int | None
    text_mode: TextMode
    max_frames: int

    @property
    def queue_prefix(self) -> tuple[int, ...]:
        return tuple(queue_prefix(self.voice.spec))

    @property
    def start_tokens(self) -> int | None:
        """Committed text tokens a new utterance needs before it can start: 1 normally, more for
        an ICL clone (its prefill aligns text with the reference audio), None in full-text mode
        (the utterance waits for flush/end)."""
        need = prefill_needs(self.voice.spec, self.text_mode)
        return None if need < 0 else need - len(self.queue_prefix)


def check_schedule(schedule: Sequence[int]) -> tuple[int, ...]:
    out = tuple(schedule)
    if not out or any(
        isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHUNK_FRAMES for n in out
    ):
        raise EngineError(f"chunk_schedule must be a non-empty list of integers in 1..{MAX_CHUNK_FRAMES}")
    return out


def build_options(
    cfg: ModelConfig,
    generation: GenerationConfig,
    tokenizer: TextTokenizer,
    voices: Voices,
    *,
    voice: str | ResolvedVoice | None,
    language: str,
    instructions: str | None,
    sampling: SamplingParams | None,
    seed: int | None,
    chunk_schedule: Sequence[int],
    idle_flush_ms: int | None,
    text_mode: TextMode,
    max_frames: int | None,
) -> StreamOptions:
    """Validate what `Engine.open_stream` was given; every error names the bad argument."""
    if isinstance(voice, ResolvedVoice):
        resolved = voice
        voice_name = voice.spec.name if voice.spec else None
    else:
        voice_name = voice if voice is not None else voices.default()
        resolved = voices.resolve(voice_name)
    lang_id = resolve_language(cfg, language, resolved.spec)
    params = sampling or SamplingParams.from_generation_config(generation)
    if seed is not None:
        params = params.with_overrides(seed=seed)
    params.validate()
    instruct = _instruct_ids(cfg, tokenizer, instructions)
    cap = generation.max_frames if max_frames is None else int(max_frames)
    if cap <= 0:
        raise EngineError(f"max_frames must be positive, got {max_frames}")
    if text_mode not in ("streaming", "full"):
        raise EngineError(f"text_mode must be 'streaming' or 'full', got {text_mode!r}")
    return StreamOptions(
        voice_name=voice_name,
        voice=resolved,
        language=language,
        lang_id=lang_id,
        instruct=tuple(instruct) if instruct else None,
        sampling=params,
        chunk_schedule=check_schedule(chunk_schedule),
        idle_flush_ms=idle_flush_ms,
        text_mode=text_mode,
        max_frames=cap,
    )


def _instruct_ids(cfg: ModelConfig, tokenizer: TextTokenizer, instructions: str | None) -> list[int] | None:
    if not instructions or not instructions.strip():
        return None
    if cfg.model_type == "base" or (cfg.model_type == "custom_voice" and cfg.model_size == "0b6"):
        # The official wrappers drop instructions for these models (not trained with them).
        log.info("instructions ignored: %s %s models take none", cfg.model_size, cfg.model_type)
        return None
    return instruct_ids(cfg, tokenizer.encode("user\n" + instructions), tokenizer.encode("\n"))
