"""Prefill layouts of the dual-track talker input (MODEL.md §2), independent of any backend.

Every talker position gets one vector: a text-track part (a text id through the text
projection) plus a codec-track part (a codec-embedding row, the voice's x-vector, or a
reference frame's summed code embeddings). A layout is a list of `Slot`s saying which parts each
position has; a backend turns it into embeddings. Keeping this free of tensors is what lets the
torch and MLX backends share it.

Text modes:
- "streaming" (the official `non_streaming_mode=False`): the prefill holds only the FIRST text
  token; token k+1 is added to decode step k, then `tts_eos` once, then `tts_pad`. This is what
  makes incremental text exact, and what every stream of this engine uses by default.
- "full" (`non_streaming_mode=True`, the official wrappers' default for CustomVoice and
  VoiceDesign): the whole text and `tts_eos` sit in the prefill; every step adds `tts_pad`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.config import ModelConfig

TextMode = Literal["streaming", "full"]
TEXT_MODES: tuple[str, ...] = ("streaming", "full")


class PromptError(ValueError):
    """A request does not fit the model (unknown language, a voice this model cannot use...)."""


@dataclass(frozen=True)
class Slot:
    """One prefill position: the sum of the parts that are set."""

    text: int | None = None  # text id, fed through text_projection(text_embedding(id))
    codec: int | None = None  # row of talker.codec_embedding
    speaker: bool = False  # the voice's x-vector (Base models)
    ref_frame: int | None = None  # ICL: index of a reference frame (16 summed code embeddings)


@dataclass(frozen=True)
class VoiceSpec:
    """What the prefill's speaker slot holds; resolved by the voice registry."""

    name: str
    speaker_id: int | None = None  # CustomVoice preset: a codec-embedding row
    has_xvector: bool = False  # Base: an x-vector goes in the speaker slot
    dialect: str | None = None  # preset dialect speakers override chinese/auto
    # ICL voice clone: reference transcript ids and the number of reference frames
    ref_text_ids: tuple[int, ...] | None = None
    ref_frames: int = 0

    @property
    def icl(self) -> bool:
        return self.ref_text_ids is not None and self.ref_frames > 0


def resolve_language(cfg: ModelConfig, language: str, voice: VoiceSpec | None) -> int | None:
    """Codec language id, or None for "auto"; dialect speakers override chinese/auto."""
    lang = (language or "auto").strip().lower()
    table = cfg.talker.codec_language_id
    if lang == "auto":
        lang_id = None
    elif lang in table and "dialect" not in lang:
        lang_id = table[lang]
    else:
        raise PromptError(f"unknown language {language!r}; this model offers: {', '.join(cfg.languages)}")
    if voice is not None and voice.dialect and lang in ("chinese", "auto"):
        lang_id = table[voice.dialect]
    return lang_id


def control_codes(cfg: ModelConfig, lang_id: int | None) -> list[int]:
    """The think/language prefix K of the codec track (MODEL.md §2.2)."""
    t = cfg.talker
    if lang_id is None:
        return [t.codec_nothink_id, t.codec_think_bos_id, t.codec_think_eos_id]
    return [t.codec_think_id, t.codec_think_bos_id, lang_id, t.codec_think_eos_id]


def role_ids(cfg: ModelConfig, assistant_ids: list[int]) -> list[int]:
    """`<|im_start|>assistant\\n` as ids (assistant_ids = tokenizer.encode("assistant\\n"))."""
    return [cfg.im_start_id, *assistant_ids]


def instruct_ids(cfg: ModelConfig, user_and_instruct_ids: list[int], newline_ids: list[int]) -> list[int]:
    """`<|im_start|>user\\n{instruct}<|im_end|>\\n` from tokenizer.encode("user\\n" + instruct)."""
    return [cfg.im_start_id, *user_and_instruct_ids, cfg.im_end_id, *newline_ids]


@dataclass(frozen=True)
class Prefill:
    """A prefill layout and how much of the text-track queue it consumed.

    The text-track queue of a stream is `queue_prefix(voice)` followed by the committed target
    ids. Decode step k adds queue[consumed + k] while there is one, then `tts_eos` once (unless
    `eos_fed`), then `tts_pad`.
    """

    slots: list[Slot]
    consumed: int
    eos_fed: bool


def queue_prefix(voice: VoiceSpec | None) -> list[int]:
    """Text-track ids that precede the target text: the ICL reference transcript."""
    return list(voice.ref_text_ids) if voice is not None and voice.icl and voice.ref_text_ids else []


def prefill_needs(voice: VoiceSpec | None, mode: TextMode) -> int:
    """Queue entries (prefix included) needed before the prefill when the text is not complete.

    Streaming needs the first target id; ICL streaming needs the codec_bos + reference frames
    to be matched by text (MODEL.md §3.3, point 6); full mode always needs the end of text.
    """
    prefix = len(queue_prefix(voice))
    if mode == "full":
        return -1  # never before the end of text
    if voice is not None and voice.icl:
        return max(prefix + 1, voice.ref_frames + 1)
    return prefix + 1


def build_prefill(
    cfg: ModelConfig,
    *,
    role: list[int],
    instruct: list[int] | None,
    voice: VoiceSpec | None,
    lang_id: int | None,
    queue: list[int],
    mode: TextMode,
    text_complete: bool,
) -> Prefill:
    """The prefill layout for a stream whose text-track queue currently holds `queue`.

    `text_complete` says whether the queue is the whole text (then `tts_eos` may go into the
    prefill); otherwise the queue must hold at least `prefill_needs()` entries.
    """
    t = cfg.talker
    pad, bos, eos = cfg.tts_pad_id, cfg.tts_bos_id, cfg.tts_eos_id
    if len(queue) <= len(queue_prefix(voice)):
        raise PromptError("empty text: nothing to speak")
    if mode not in TEXT_MODES:
        raise PromptError(f"unknown text mode {mode!r}")
    if not text_complete and (mode == "full" or len(queue) < prefill_needs(voice, mode)):
        raise PromptError(f"the {mode} prefill needs more text (or the end of the text)")

    speaker_slot: Slot | None = None
    if voice is not None and voice.speaker_id is not None:
        speaker_slot = Slot(codec=voice.speaker_id)
    elif voice is not None and voice.has_xvector:
        speaker_slot = Slot(speaker=True)

    slots: list[Slot] = [Slot(text=i) for i in (instruct or [])]
    slots += [Slot(text=i) for i in role]
    # Control block: codec track K ‖ [spk] ‖ codec_pad under text pad ... pad, bos.
    control = [Slot(codec=c) for c in control_codes(cfg, lang_id)]
    if speaker_slot is not None:
        control.append(speaker_slot)
    control.append(Slot(codec=t.codec_pad_id))
    for i, c in enumerate(control):
        slots.append(Slot(text=bos if i == len(control) - 1 else pad, codec=c.codec, speaker=c.speaker))

    if voice is not None and voice.icl:
        # ICL block (`generate_icl_prompt`): the text track ref_text ‖ target ‖ eos against the
        # codec track codec_bos ‖ reference frames.
        codec_track = [Slot(codec=t.codec_bos_id)] + [Slot(ref_frame=i) for i in range(voice.ref_frames)]
        if mode == "full":
            slots += [Slot(text=i, codec=t.codec_pad_id) for i in (*queue, eos)]
            slots += [Slot(text=pad, codec=c.codec, ref_frame=c.ref_frame) for c in codec_track]
            return Prefill(slots, len(queue), eos_fed=True)
        n = len(codec_track)
        if len(queue) >= n:  # enough text: the rest of the queue follows in the decode steps
            slots += [
                Slot(text=x, codec=c.codec, ref_frame=c.ref_frame)
                for x, c in zip(queue, codec_track, strict=False)
            ]
            return Prefill(slots, n, eos_fed=False)
        # The whole text and its eos fit under the reference: pad the text track.
        track = [*queue, eos] + [pad] * (n - len(queue) - 1)
        slots += [
            Slot(text=x, codec=c.codec, ref_frame=c.ref_frame)
            for x, c in zip(track, codec_track, strict=False)
        ]
        return Prefill(slots, len(queue), eos_fed=True)

    if mode == "streaming":
        slots.append(Slot(text=queue[0], codec=t.codec_bos_id))
        return Prefill(slots, 1, eos_fed=False)
    # full: all text + eos over codec_pad, then pad over codec_bos
    slots += [Slot(text=i, codec=t.codec_pad_id) for i in (*queue, eos)]
    slots.append(Slot(text=pad, codec=t.codec_bos_id))
    return Prefill(slots, len(queue), eos_fed=True)
