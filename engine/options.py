"""What a stream is opened with: fixed for its lifetime (they live in every utterance's prefill)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.backend import ResolvedVoice
from engine.errors import EngineError
from engine.prompt import TextMode, prefill_needs, queue_prefix
from engine.sampling import SamplingParams

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
