"""The engine: one worker thread owns the model and steps every ready stream together.

Each iteration of the worker (`Engine.step`):
1. housekeeping under the lock: drop cancelled streams and free their slots, apply idle
   flushes, admit queued streams into free slots, finish streams whose text ended;
2. prefill at most one waiting stream whose utterance has enough text (one step's worth of
   work, so a newcomer never holds the others up for longer);
3. code predictor: every stream whose frame has its codebook-0 code gets codebooks 1..15, in
   one batched pass. This needs no text, so a stream's audio for frame k goes out even while
   it waits for the text token of step k;
4. codec: every stream whose next chunk is due (its `chunk_schedule`) is decoded, batched by
   chunk size, and the chunks are queued for the consumer;
5. talker: every stream whose next text-track input is known steps once, in one batched
   forward over its KV-cache rows; a stream whose next text token has not arrived **stalls**.

Rows: a stream holds one row of the talker's static KV cache (and one codec row) only while it
has work: from the moment its utterance can be prefilled until that utterance ends. A stream
without startable text (a context that was opened but not fed, or one between utterances) is
*parked* in the queue and holds nothing; nothing of an utterance outlives it but the stream's
random generator, so parking between utterances changes no audio. When rows are scarce, a free
row goes to the ready stream whose owner (a session) holds the fewest rows, first come first
served among equals; a stream that stalls mid-utterance for `stall_reclaim_ms` while others
wait is flushed (as an idle flush would) so its row comes back. Rows of live streams are kept
compact (0..n-1) by moving the last row into a freed one, so a step runs on a contiguous row
range without gathering caches; rows in the range that sit the step out are computed and
discarded (their writes land past their own length).

Failures: a batched phase that raises is retried row by row (random generators rewound first,
so the retry samples what the batch would have), and only the rows that still fail are failed.

Runaway generation: a model that never emits end-of-audio is stopped by a budget of
`budget_base_frames + budget_frames_per_token x committed text tokens` frames per utterance
(the text-track reads one token per frame, so the budget cannot trip while text is still
being read, however long the client pauses); such an utterance ends with reason "budget".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engine.checkpoint import Checkpoint, load_checkpoint
from engine.prompt import (
    Prefill,
    PromptError,
    Slot,
    TextMode,
    VoiceSpec,
    build_prefill,
    instruct_ids,
    prefill_needs,
    queue_prefix,
    resolve_language,
    role_ids,
)
from engine.sampling import MIN_NEW_TOKENS, RowSampler, SamplingParams, suppress_mask, talker_processors
from engine.stream import AudioChunk, State, Stream, Utterance
from engine.text import TextCommitter, TextTokenizer
from engine.voices import ClonedVoice, VoiceStore

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SCHEDULE = (1, 2, 4, 8)
MAX_CHUNK_FRAMES = 64


class EngineError(RuntimeError):
    """Base class of the engine's request errors."""


class VoiceError(EngineError, ValueError):
    """Unknown voice, or a voice this model cannot use."""


class OverloadedError(EngineError):
    """Too many open streams: the admission queue is full."""


@dataclass(frozen=True)
class ResolvedVoice:
    spec: VoiceSpec | None
    xvector: Tensor | None = None  # [H] for Base clones
    ref_codes: Tensor | None = None  # [n_ref, 16] for ICL clones


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


@dataclass
class _Work:
    """Worker-side state of a stream (only the worker thread touches it)."""

    generator: torch.Generator
    owner: Hashable  # fairness group: a session id, or the stream itself
    row: int = -1  # KV-cache row while admitted, else -1 (parked / queued)
    codec_row: int = -1
    admitted_once: bool = False
    length: int = 0  # positions in this row's KV cache
    utterance: Utterance | None = None
    consumed: int = 0  # text-track queue entries fed
    eos_fed: bool = False
    frame: int = 0  # frames completed in the utterance
    tokens: int = 0  # codebook-0 tokens sampled in the utterance (EOS rule)
    c0: int | None = None  # codebook-0 of frame `frame`, waiting for the code predictor
    hidden: Tensor | None = None  # [H] talker hidden that produced c0
    frame_embed: Tensor | None = None  # [H] input of the next talker step (without text)
    seen: Tensor | None = None  # bool [V]: codebook-0 ids generated in the utterance
    pending: list[np.ndarray] = field(default_factory=list)  # frames [16] not yet decoded
    pending_start: int = 0  # frame index of pending[0]
    chunks: int = 0  # chunks emitted in the utterance
    done_reason: str | None = None  # the utterance has ended: "eos" | "max_frames" | "budget"
    started_at: float | None = None
    stalled_since: float | None = None  # waiting for text since (talker stall)


class Engine:
    """Loads a checkpoint and serves many streams at once from one worker thread.

    Args:
        model: a `Checkpoint`, or a spec for `load_checkpoint` (directory, hub id, random:...).
        device / dtype: where and how the model runs (default: cuda+bf16 if present, else cpu+fp32).
        max_streams: KV-cache rows, i.e. streams generating at the same time.
        max_queued_streams: streams waiting for a row; more are refused with OverloadedError.
        max_queued_chunks: per-stream output bound; a stream whose consumer lags this far
            behind sits out steps (backpressure) instead of growing memory or blocking others.
        kv_capacity: initial KV positions per row; grows (doubling) when a stream needs more.
        prefill_tokens_per_step: prompt positions prefilled together in one step (at least one
            stream always goes): bounds how long newcomers hold up running streams. Default 64
            on CPU (prefill is compute-bound there), 2048 on CUDA.
        voices_db: SQLite file for cloned voices (Base models); None keeps presets only.
        budget_frames_per_token / budget_base_frames: the runaway bound of one utterance, in
            codec frames (80 ms): base + per_token x committed text tokens. Default 12 and 50:
            about 1 s per text token (speech runs ~3.5 frames per token) plus 4 s. None for
            per_token disables the budget (the frame cap `max_frames` still applies).
        stall_reclaim_ms: a stream stalled mid-utterance (waiting for text) this long while
            other streams wait for a row is flushed, which returns its row. None disables.
        start: start the worker thread (tests may drive `step()` by hand instead).
    """

    def __init__(
        self,
        model: Checkpoint | str,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_streams: int = 8,
        max_queued_streams: int = 256,
        max_queued_chunks: int = 64,
        kv_capacity: int = 512,
        default_chunk_schedule: Sequence[int] = DEFAULT_CHUNK_SCHEDULE,
        default_idle_flush_ms: int | None = None,
        prefill_tokens_per_step: int | None = None,
        voices_db: str | Path | None = None,
        budget_frames_per_token: float | None = 12.0,
        budget_base_frames: int = 50,
        stall_reclaim_ms: float | None = 5000.0,
        start: bool = True,
    ):
        from engine.torch.codec import CodecStreams
        from engine.torch.model import TalkerCache
        from engine.torch.weights import load_codec_decoder, load_talker

        self.checkpoint = model if isinstance(model, Checkpoint) else load_checkpoint(model)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.cfg = self.checkpoint.config
        self.tokenizer = TextTokenizer.from_dir(self.checkpoint.tokenizer_dir)
        # Grouped column blocks make small-batch GEMMs use every CPU thread (see FusedLinear).
        self.talker = load_talker(self.checkpoint, self.device, self.dtype).to_inference(
            groups=1 if self.device.type == "cuda" else 32
        )
        self.codec = load_codec_decoder(self.checkpoint, self.device, self.dtype)
        self.max_streams = max_streams
        self.max_queued_streams = max_queued_streams
        self.max_queued_chunks = max_queued_chunks
        self.default_chunk_schedule = _check_schedule(default_chunk_schedule)
        self.default_idle_flush_ms = default_idle_flush_ms
        self.prefill_tokens_per_step = prefill_tokens_per_step or (2048 if self.device.type == "cuda" else 64)
        if budget_frames_per_token is not None and (budget_frames_per_token <= 0 or budget_base_frames < 0):
            raise EngineError(
                "the frame budget needs budget_frames_per_token > 0 and budget_base_frames >= 0"
            )
        self.budget_frames_per_token = budget_frames_per_token
        self.budget_base_frames = budget_base_frames
        self.stall_reclaim_ms = stall_reclaim_ms
        self.samples_per_frame = self.checkpoint.codec.decoder.samples_per_frame
        self.sample_rate = self.checkpoint.codec.sample_rate
        tcfg = self.cfg.talker
        self.cache = TalkerCache(tcfg.transformer, max_streams, kv_capacity, self.device, self.dtype)
        self.codec_streams = CodecStreams(self.codec, max_streams, device=self.device, dtype=self.dtype)
        self._suppress = suppress_mask(tcfg.vocab_size, tcfg.codec_eos_id, self.device)
        self._role = role_ids(self.cfg, self.tokenizer.encode("assistant\n"))
        self._newline = self.tokenizer.encode("\n")

        self.voice_store: VoiceStore | None = None
        if voices_db is not None and self.cfg.speaker_encoder is not None:
            self.voice_store = VoiceStore(voices_db, family=f"xvec{self.cfg.speaker_encoder.enc_dim}")
        self._clone_lock = threading.Lock()
        self._clone_models: tuple[Any, Any] | None = None

        self._cond = threading.Condition()
        self._next_id = 0
        self._queued: list[Stream] = []  # no row: parked, or ready and waiting for one (fairness order)
        self._active: list[Stream] = []  # index == KV row
        self._free_codec_rows = list(range(max_streams))
        self._closed = False
        self._thread: threading.Thread | None = None
        self.stats = EngineStats()
        if start:
            self.start()

    # ---- public API -------------------------------------------------------------------------

    @property
    def voices(self) -> list[str]:
        """Preset speakers, then registered clone voices (by id)."""
        clones = [v.id for v in self.voice_store.list()] if self.voice_store is not None else []
        return [*self.cfg.speakers, *clones]

    def describe_voices(self) -> list[dict[str, object]]:
        presets: list[dict[str, object]] = [{"id": n, "name": n, "type": "preset"} for n in self.cfg.speakers]
        clones = [v.describe() for v in self.voice_store.list()] if self.voice_store is not None else []
        return presets + clones

    # ---- voice cloning (Base models) ------------------------------------------------------------

    def create_voice(
        self,
        name: str,
        audio: Any,
        *,
        sample_rate: int | None = None,
        ref_text: str | None = None,
        x_vector_only: bool = False,
        max_seconds: float = 60.0,
    ) -> ClonedVoice:
        """Register a cloned voice from reference audio: a file path, encoded bytes (wav, flac,
        ogg, mp3...) or a float array with `sample_rate`. With `ref_text` the voice clones in
        ICL mode; `x_vector_only` keeps just the speaker embedding. Thread-safe; runs in the
        caller's thread (the encoders are not the generation model)."""
        from engine.torch.speaker import extract_xvector, load_audio, prepare_audio

        if self.cfg.model_type != "base" or self.cfg.speaker_encoder is None:
            raise VoiceError(
                # No checkpoint name here: for a local checkpoint it is a server path.
                f"voice cloning needs a Base model (Qwen3-TTS-12Hz-*-Base); this server runs a "
                f"{self.cfg.model_type} model"
            )
        if self.voice_store is None:
            raise VoiceError("this engine has no voice store (start it with a voices database)")
        # The transcript is used verbatim, as the official package does: a trailing newline (a
        # transcript read from a file) changes the prompt's ids and so the audio.
        text = ref_text if ref_text is not None and ref_text.strip() else None
        if not x_vector_only and text is None:
            raise VoiceError(
                "ICL voice cloning needs the transcript of the reference audio (ref_text); "
                "or ask for an x-vector-only voice"
            )
        if isinstance(audio, np.ndarray):
            if sample_rate is None:
                raise VoiceError("a raw audio array needs its sample_rate")
            wav = prepare_audio(audio, sample_rate, self.sample_rate, max_seconds=max_seconds)
        else:
            wav = load_audio(audio, self.sample_rate, max_seconds=max_seconds)
        speaker_encoder, codec_encoder = self._load_clone_models()
        with torch.no_grad():
            xvector = extract_xvector(speaker_encoder, wav).float().cpu().numpy()
            codes = None
            if not x_vector_only:
                codes = codec_encoder.encode(torch.from_numpy(wav)[None].to(self.device))[0].cpu().numpy()
        seconds = len(wav) / self.sample_rate
        return self.voice_store.add(name, xvector, codes, None if x_vector_only else text, seconds)

    def delete_voice(self, key: str) -> bool:
        return self.voice_store.delete(key) if self.voice_store is not None else False

    def _load_clone_models(self) -> tuple[Any, Any]:
        from engine.torch.weights import load_codec_encoder, load_speaker_encoder

        with self._clone_lock:
            if self._clone_models is None:
                self._clone_models = (
                    load_speaker_encoder(self.checkpoint, self.device),
                    load_codec_encoder(self.checkpoint, self.device),
                )
            return self._clone_models

    @property
    def languages(self) -> list[str]:
        return self.cfg.languages

    @property
    def model_type(self) -> str:
        return self.cfg.model_type

    def default_voice(self) -> str | None:
        speakers = self.cfg.speakers
        if not speakers:
            return None
        return "ryan" if "ryan" in speakers else speakers[0]

    def resolve_voice(self, name: str | None) -> ResolvedVoice:
        """A preset speaker of a CustomVoice model, or no voice (VoiceDesign / plain Base)."""
        if name is None or name == "":
            if self.cfg.model_type == "custom_voice":
                raise VoiceError(
                    f"this CustomVoice model needs a voice; choose one of: {', '.join(self.voices)}"
                )
            return ResolvedVoice(spec=None)
        key = name.strip().lower()
        if key in self.cfg.talker.spk_id:
            spec = VoiceSpec(
                name=key,
                speaker_id=self.cfg.talker.spk_id[key],
                dialect=self.cfg.talker.spk_is_dialect.get(key),
            )
            return ResolvedVoice(spec=spec)
        clone = self.voice_store.get(name.strip()) if self.voice_store is not None else None
        if clone is not None:
            return self._clone_voice(clone)
        offered = ", ".join(self.voices) if self.voices else "none (this model has no preset voices)"
        raise VoiceError(f"unknown voice {name!r}; this model offers: {offered}")

    def _clone_voice(self, clone: ClonedVoice) -> ResolvedVoice:
        xvec = torch.from_numpy(clone.xvector)
        if xvec.shape[0] != self.cfg.talker.transformer.hidden_size:
            raise VoiceError(f"voice {clone.id!r} was made for another model size")
        icl = clone.ref_codes is not None and clone.ref_text is not None
        ref_ids: tuple[int, ...] | None = None
        codes: Tensor | None = None
        if icl:
            assert clone.ref_text is not None and clone.ref_codes is not None
            # `<|im_start|>assistant\n{ref_text}<|im_end|>\n` -> ids[3:-2] (MODEL.md §2.1)
            ref_ids = tuple(self.tokenizer.encode("assistant\n" + clone.ref_text)[2:])
            codes = torch.from_numpy(clone.ref_codes.astype(np.int64))
        spec = VoiceSpec(
            name=clone.id,
            has_xvector=True,
            ref_text_ids=ref_ids,
            ref_frames=0 if codes is None else len(codes),
        )
        return ResolvedVoice(spec=spec, xvector=xvec, ref_codes=codes)

    def open_stream(
        self,
        *,
        voice: str | ResolvedVoice | None = None,
        language: str = "auto",
        instructions: str | None = None,
        sampling: SamplingParams | None = None,
        seed: int | None = None,
        chunk_schedule: Sequence[int] | None = None,
        idle_flush_ms: int | None = None,
        text_mode: TextMode = "streaming",
        max_frames: int | None = None,
        owner: Hashable | None = None,
    ) -> Stream:
        """Open a stream. Voice/language/instructions are fixed for its lifetime (they live in
        the prefill of every utterance). `owner` groups streams for fairness (a session id): rows
        are shared out between owners, so one owner cannot starve the others (None: its own)."""
        if self._closed:
            raise EngineError("the engine is closed")
        if isinstance(voice, ResolvedVoice):
            resolved = voice
            voice_name = voice.spec.name if voice.spec else None
        else:
            voice_name = voice if voice is not None else self.default_voice()
            resolved = self.resolve_voice(voice_name)
        lang_id = resolve_language(self.cfg, language, resolved.spec)
        params = sampling or SamplingParams.from_generation_config(self.checkpoint.generation)
        if seed is not None:
            params = params.with_overrides(seed=seed)
        params.validate()
        instruct = self._instruct_ids(instructions)
        schedule = (
            _check_schedule(chunk_schedule) if chunk_schedule is not None else self.default_chunk_schedule
        )
        cap = self.checkpoint.generation.max_frames if max_frames is None else int(max_frames)
        if cap <= 0:
            raise EngineError(f"max_frames must be positive, got {max_frames}")
        if text_mode not in ("streaming", "full"):
            raise EngineError(f"text_mode must be 'streaming' or 'full', got {text_mode!r}")
        options = StreamOptions(
            voice_name=voice_name,
            voice=resolved,
            language=language,
            lang_id=lang_id,
            instruct=tuple(instruct) if instruct else None,
            sampling=params,
            chunk_schedule=schedule,
            idle_flush_ms=idle_flush_ms if idle_flush_ms is not None else self.default_idle_flush_ms,
            text_mode=text_mode,
            max_frames=cap,
        )
        with self._cond:
            if len(self._queued) >= self.max_queued_streams:
                self.stats.refused += 1
                raise OverloadedError(
                    f"{len(self._active)} streams generating and {len(self._queued)} queued: try again later"
                )
            stream = Stream(self, self._next_id, options, TextCommitter(self.tokenizer))
            stream.engine_data = _Work(
                generator=params.generator(self.device),
                owner=owner if owner is not None else ("stream", stream.id),
            )
            self._next_id += 1
            self._queued.append(stream)
            self.stats.opened += 1
            self._cond.notify_all()
        return stream

    def synthesize(self, text: str, **options: Any) -> np.ndarray:
        """Whole text in, whole audio out (float32, `sample_rate`)."""
        stream = self.open_stream(**options)
        stream.push_text(text)
        stream.end()
        if self._thread is None:
            while not stream.finished:
                self.step()
        return stream.read_all()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tts-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Cancel every stream and stop the worker."""
        with self._cond:
            self._closed = True
            for s in [*self._active, *self._queued]:
                s.cancel()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def active_streams(self) -> int:
        return len(self._active)

    @property
    def queued_streams(self) -> int:
        """Streams without a row: ready ones waiting for a row, and parked ones (no text yet)."""
        return len(self._queued)

    @property
    def waiting_streams(self) -> int:
        """Streams that have text to speak but no row (the backlog that rows are short of)."""
        return sum(1 for s in self._queued if s.state is State.QUEUED and self._startable(s))

    # ---- worker -------------------------------------------------------------------------------

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                if self._closed and not self._active and not self._queued:
                    return
            try:
                worked = self.step()
            except Exception:  # a bug must not kill the worker: the step already failed its streams
                log.exception("engine step failed")
                time.sleep(0.01)  # and must not spin if it keeps failing
                worked = True
            if not worked:
                with self._cond:
                    if self._closed:
                        if not self._active and not self._queued:
                            return
                    self._cond.wait(timeout=self._idle_timeout())

    def _idle_timeout(self) -> float:
        """Sleep until the next idle-flush deadline (or a notify from a producer). Only streams
        with unspoken text have one: an idle context must not wake the worker every millisecond."""
        deadlines = [d for s in (*self._active, *self._queued) if (d := s._idle_flush_deadline()) is not None]
        if not deadlines:
            return 0.5
        return max(0.001, min(deadlines) - time.monotonic())

    @torch.no_grad()
    def step(self) -> bool:
        """One scheduling iteration. Returns whether any model work was done."""
        with self._cond:
            self._housekeeping()
            prefills = self._pick_prefills()
            active = list(self._active)
        worked = False
        if prefills:
            self._guarded(prefills, self._prefill)
            worked = True
        cp_rows = [
            s
            for s in active
            if s.engine_data.c0 is not None and s.state is State.RUNNING and not self._backlogged(s)
        ]
        if cp_rows:
            self._guarded(cp_rows, self._predict_codes)
            worked = True
        due = [s for s in active if self._chunk_due(s)]
        for group in self._chunk_groups(due).values():
            # One guarded call per chunk size: a group emits its chunks as soon as it is decoded,
            # so a retry after a failure must never decode a group that already went out.
            self._guarded(group, self._decode_chunks)
            worked = True
        with self._cond:
            step_rows = [s for s in active if self._ready_for_talker(s)]
        if step_rows:
            self._guarded(step_rows, self._talker_step)
            worked = True
        return worked

    def _guarded(self, items: list[Any], fn: Any) -> None:
        """Run one batched phase over `items` (streams, or (stream, prefill) pairs).

        If it raises, the failure is traced to its rows: every item is retried alone, with the
        random generators rewound to where the batch found them (so the retry samples exactly
        what the batched call would have), and only the items that fail alone are failed. A
        phase writes stream state only after its last tensor op, and KV / codec state only at
        positions a retry overwrites, so a failed batch leaves nothing behind.
        """
        gens = [_stream_of(it).engine_data.generator for it in items]
        saved = [g.get_state() for g in gens] if len(items) > 1 else []
        t0 = time.perf_counter()
        try:
            fn(items)
            self.stats.phase_ms[fn.__name__] = (
                self.stats.phase_ms.get(fn.__name__, 0.0) + (time.perf_counter() - t0) * 1000.0
            )
            return
        except Exception as e:
            error = e
        if len(items) > 1:
            log.warning(
                "engine phase %s failed for a batch of %d (%s); retrying row by row",
                fn.__name__, len(items), type(error).__name__,
            )  # fmt: skip
            for g, state in zip(gens, saved, strict=True):
                g.set_state(state)
            for it in items:
                if _stream_of(it).state in (State.RUNNING, State.WAITING):
                    self._guarded([it], fn)
            return
        stream = _stream_of(items[0])
        log.error("engine phase %s failed for stream %d", fn.__name__, stream.id, exc_info=error)
        with self._cond:
            stream._finish(State.FAILED, f"internal error while generating ({type(error).__name__})")
            self.stats.failed += 1

    # ---- housekeeping (lock held) -------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for s in list(self._active):
            if s.finished:
                self._release(s)
        for s in (*self._active, *self._queued):
            if s._idle_flush_due(now):
                s._flush_locked()
                s.last_text_at = now
            self._maybe_finish(s)
        for s in list(self._active):
            if s.state is State.DONE:
                self._release(s)
        finished = [s for s in self._queued if s.finished]  # cancelled, failed or ended while parked
        if finished:
            self._queued = [s for s in self._queued if not s.finished]
            self.stats.closed += len(finished)
        waiting = any(self._startable(s) for s in self._queued)
        for s in list(self._active):
            # Between utterances a stream keeps nothing in its rows: give them back when it has
            # nothing to start, or when another stream is waiting for a row.
            if s.state is State.WAITING and s.engine_data.utterance is None:
                if not self._startable(s) or (waiting and len(self._active) >= self.max_streams):
                    self._park(s)
        if waiting and len(self._active) >= self.max_streams:
            self._reclaim_stalled(now)
        while len(self._active) < self.max_streams:
            nxt = self._next_admission()
            if nxt is None:
                break
            self._queued.remove(nxt)
            self._admit(nxt, now)

    def _startable(self, s: Stream) -> bool:
        """The stream's next utterance can be prefilled now (it has work for a row)."""
        if s.state not in (State.QUEUED, State.WAITING) or self._backlogged(s):
            return False
        utt = s.utterances[0]
        if utt.target_ids == 0:
            return False
        need = prefill_needs(s.options.voice.spec, s.options.text_mode)
        return utt.complete or (need >= 0 and len(utt.ids) >= need)

    def _next_admission(self) -> Stream | None:
        """The ready stream whose owner holds the fewest rows; among those, one still waiting
        for its first audio (a listener hears silence) before one that is already speaking
        (its client has audio buffered); then first come, first served."""
        held: dict[Hashable, int] = {}
        for s in self._active:
            held[s.engine_data.owner] = held.get(s.engine_data.owner, 0) + 1
        best: Stream | None = None
        best_key = (0, False)
        for s in self._queued:
            if s.state is State.QUEUED and self._startable(s):
                key = (held.get(s.engine_data.owner, 0), s.emitted_any)
                if best is None or key < best_key:
                    best, best_key = s, key
        return best

    def _reclaim_stalled(self, now: float) -> None:
        """Flush streams stalled mid-utterance for `stall_reclaim_ms` while others wait for a row:
        the utterance ends with the text it has, and the row comes back when it is spoken."""
        if self.stall_reclaim_ms is None:
            return
        for s in self._active:
            w: _Work = s.engine_data
            if (
                s.state is State.RUNNING
                and w.stalled_since is not None
                and (now - w.stalled_since) * 1000.0 >= self.stall_reclaim_ms
                and not s._closed_for_text
            ):
                log.info(
                    "stream %d stalled %.0f ms while others wait: flushed",
                    s.id,
                    (now - w.stalled_since) * 1e3,
                )
                s._flush_locked()
                w.stalled_since = None

    def _admit(self, s: Stream, now: float) -> None:
        w: _Work = s.engine_data
        w.row = len(self._active)
        w.codec_row = self._free_codec_rows.pop()
        self.codec_streams.reset(w.codec_row)
        if not w.admitted_once:
            s.metrics.queued_ms = (now - s.created_at) * 1000.0
            w.admitted_once = True
            self.stats.admitted += 1
        s.state = State.WAITING
        self._active.append(s)

    def _park(self, s: Stream) -> None:
        """Take a stream's rows back between utterances; it waits in the queue for more text."""
        self._free_rows(s)
        s.state = State.QUEUED
        self._queued.append(s)

    def _release(self, s: Stream) -> None:
        """A finished stream gives its rows back."""
        self._free_rows(s)
        self.stats.closed += 1

    def _free_rows(self, s: Stream) -> None:
        """Free a stream's rows; move the last active row into the hole to stay compact."""
        w: _Work = s.engine_data
        idx = self._active.index(s)
        last = self._active[-1]
        if last is not s:
            lw: _Work = last.engine_data
            self.cache.move_row(lw.row, w.row, lw.length)
            lw.row = w.row
            self._active[idx] = last
        self._active.pop()
        self._free_codec_rows.append(w.codec_row)
        w.row = w.codec_row = -1
        w.length = 0

    def _maybe_finish(self, s: Stream) -> None:
        """A stream with no utterance left to speak and no more text coming is done."""
        w: _Work = s.engine_data
        if s.state not in (State.WAITING, State.QUEUED) or w.utterance is not None or not s.text_ended:
            return
        head = s.utterances[0]
        if head.complete or head.target_ids > 0:
            return
        # The text ended after the last utterance closed (or there was none): an empty chunk
        # carries the end-of-stream flag, so every stream ends with exactly one `last` chunk.
        chunk = AudioChunk(
            samples=np.zeros(0, dtype=np.float32), utterance=max(0, head.index - 1), frame=w.pending_start,
            frames=0, first=not s.emitted_any, last_in_utterance=False, last=True,
            codes=np.zeros((0, 16), dtype=np.int64),
        )  # fmt: skip
        s._deliver(chunk)
        s._finish(State.DONE)
        self.stats.completed += 1

    def _pick_prefills(self) -> list[tuple[Stream, Prefill]]:
        """Waiting streams whose utterance can start, with their prefill layouts, within this
        step's token budget (always at least one, so a long prompt still gets its turn)."""
        picked: list[tuple[Stream, Prefill]] = []
        tokens = 0
        # Streams still waiting for their first audio go first (sorted() is stable).
        for s in sorted(self._active, key=lambda s: s.emitted_any):
            if s.state is not State.WAITING or not self._startable(s):
                continue
            utt = s.utterances[0]
            opts = s.options
            try:
                pre = build_prefill(
                    self.cfg, role=self._role, instruct=list(opts.instruct) if opts.instruct else None,
                    voice=opts.voice.spec, lang_id=opts.lang_id, queue=list(utt.ids), mode=opts.text_mode,
                    text_complete=utt.complete,
                )  # fmt: skip
            except PromptError as e:  # fail this stream once, not every step
                s._finish(State.FAILED, str(e))
                self.stats.failed += 1
                continue
            if picked and tokens + len(pre.slots) > self.prefill_tokens_per_step:
                break
            picked.append((s, pre))
            tokens += len(pre.slots)
        return picked

    def _backlogged(self, s: Stream) -> bool:
        return s.queued_chunks >= self.max_queued_chunks

    def _ready_for_talker(self, s: Stream) -> bool:
        """The frame is complete and the next text-track input is known (else: stall)."""
        w: _Work = s.engine_data
        if s.state is not State.RUNNING or w.frame_embed is None or w.done_reason or self._backlogged(s):
            return False
        utt = w.utterance
        assert utt is not None
        ready = w.consumed < len(utt.ids) or utt.complete
        now = time.monotonic()
        if ready:
            if w.stalled_since is not None:
                s.metrics.stall_ms += (now - w.stalled_since) * 1000.0
                w.stalled_since = None
        elif w.stalled_since is None:
            w.stalled_since = now
        return ready

    # ---- model phases (worker thread, lock not held) -------------------------------------------

    def _prefill(self, batch: list[tuple[Stream, Prefill]]) -> None:  # items: (stream, prefill)
        """Prefill new utterances together: one forward over [B, longest prompt]."""
        from engine.torch.model import PrefillStore

        t0 = time.perf_counter()
        streams = [s for s, _ in batch]
        works: list[_Work] = [s.engine_data for s in streams]
        embeds = [self.embed_slots(pre.slots, s.options.voice)[0] for s, pre in batch]  # [P_i, H]
        lengths = [e.shape[0] for e in embeds]
        p_max = max(lengths)
        self._ensure_capacity(p_max + 1)
        x = torch.zeros(len(batch), p_max, embeds[0].shape[-1], device=self.device, dtype=self.dtype)
        for i, e in enumerate(embeds):  # right-padded: pad positions write KV past the prompt,
            x[i, : e.shape[0]] = e  # where the stream's own decode steps overwrite them
        positions = torch.arange(p_max, device=self.device).expand(len(batch), -1)
        rows = torch.tensor([w.row for w in works], device=self.device)
        h = self.talker.forward_hidden(x, positions, PrefillStore(self.cache, rows))
        last = h[torch.arange(len(batch), device=self.device), torch.tensor(lengths, device=self.device) - 1]
        for (s, pre), w, n in zip(batch, works, lengths, strict=True):
            w.utterance, w.length = s.utterances[0], n
            w.consumed, w.eos_fed = pre.consumed, pre.eos_fed
            w.frame, w.tokens, w.pending, w.pending_start, w.chunks = 0, 0, [], 0, 0
            w.done_reason, w.frame_embed = None, None
            w.seen = torch.zeros(self.cfg.talker.vocab_size, dtype=torch.bool, device=self.device)
            self.codec_streams.reset(w.codec_row)
            if s.options.voice.ref_codes is not None:
                # ICL: the codec hears the reference first, as the official decode of ref+generated does.
                self.codec_streams.prime(w.codec_row, s.options.voice.ref_codes.T.to(self.device))
        for i, w in enumerate(works):
            w.hidden = last[i]
        c0 = self._sample_talker(streams, last)
        with self._cond:
            now = time.monotonic()
            for s, w, code in zip(streams, works, c0, strict=True):
                if s.state is State.WAITING:
                    s.state = State.RUNNING
                if w.started_at is None:
                    w.started_at = now
                if s.state is State.RUNNING:
                    self._accept_c0(s, code)
        self.stats.prefills += len(batch)
        self.stats.prefill_ms += (time.perf_counter() - t0) * 1000.0

    def embed_slots(self, slots: list[Slot], voice: ResolvedVoice) -> Tensor:
        return self.talker.embed_slots(slots, voice.xvector, voice.ref_codes)

    def _predict_codes(self, streams: list[Stream]) -> None:
        works: list[_Work] = [s.engine_data for s in streams]
        hidden = torch.stack([w.hidden for w in works])  # type: ignore[misc]
        c0 = torch.tensor([w.c0 for w in works], device=self.device)
        e0 = self.talker.embed_codec(c0)  # [B, H]
        params = [_sub_params(s.options.sampling) for s in streams]
        sampler = RowSampler(params, [w.generator for w in works], self.device)
        codes, embs = self.talker.code_predictor.predict(hidden, e0, lambda g, logits: sampler(logits))
        frame_embed = torch.cat((e0[:, None], embs), dim=1).sum(1)  # [B, H]: as the official sums
        frames = torch.cat((c0[:, None], codes), dim=1).cpu().numpy()  # [B, 16]
        with self._cond:
            for i, (s, w) in enumerate(zip(streams, works, strict=True)):
                if s.state is not State.RUNNING:
                    continue
                w.pending.append(frames[i])
                w.frame += 1
                w.c0 = None
                w.frame_embed = frame_embed[i]
                s.metrics.frames += 1
                if w.frame >= s.options.max_frames:
                    w.done_reason = "max_frames"
                elif w.utterance is not None and w.frame >= self._frame_budget(w.utterance):
                    w.done_reason = "budget"
        self.stats.cp_batches += 1
        self.stats.cp_rows += len(streams)

    def _frame_budget(self, utt: Utterance) -> float:
        """The most frames an utterance may run: its text cannot need more (see module doc)."""
        if self.budget_frames_per_token is None:
            return float("inf")
        return self.budget_base_frames + self.budget_frames_per_token * utt.target_ids

    def _talker_step(self, streams: list[Stream]) -> None:
        t0 = time.perf_counter()
        works: list[_Work] = [s.engine_data for s in streams]
        rows = [w.row for w in works]
        r0, r1 = min(rows), max(rows) + 1
        span = self._active[r0:r1]
        self._ensure_capacity(max(s.engine_data.length for s in span) + 1)
        text_ids: list[int] = []
        fed: list[str] = []
        for w in works:
            utt = w.utterance
            assert utt is not None
            if w.consumed < len(utt.ids):
                text_ids.append(utt.ids[w.consumed])
                fed.append("text")
            elif not w.eos_fed:
                text_ids.append(self.cfg.tts_eos_id)
                fed.append("eos")
            else:
                text_ids.append(self.cfg.tts_pad_id)
                fed.append("pad")
        addend = self.talker.embed_text(torch.tensor(text_ids, device=self.device)[:, None])[:, 0]  # [B, H]
        x = torch.zeros(r1 - r0, 1, addend.shape[-1], device=self.device, dtype=self.dtype)
        sel = torch.tensor([r - r0 for r in rows], device=self.device)
        x[sel, 0] = torch.stack([w.frame_embed for w in works]) + addend  # type: ignore[misc]
        positions = torch.tensor([[s.engine_data.length] for s in span], device=self.device)
        h = self.talker.forward_hidden(x, positions, self.cache.bind(slice(r0, r1), positions))
        h_rows = h[sel, 0]  # [B, H]
        c0 = self._sample_talker(streams, h_rows)
        with self._cond:
            for i, (s, w) in enumerate(zip(streams, works, strict=True)):
                w.length += 1
                w.frame_embed = None
                w.hidden = h_rows[i]
                if fed[i] == "text":
                    w.consumed += 1
                elif fed[i] == "eos":
                    w.eos_fed = True
                if s.state is State.RUNNING:
                    self._accept_c0(s, c0[i])
        self.stats.talker_batches += 1
        self.stats.talker_rows += len(streams)
        self.stats.talker_span += r1 - r0
        elapsed = time.perf_counter() - t0
        self.stats.step_ms += elapsed * 1000.0
        self.stats.step_seconds.observe(elapsed)
        self.stats.batch_size.observe(len(streams))

    def _sample_talker(self, streams: list[Stream], hidden: Tensor) -> list[int]:
        works: list[_Work] = [s.engine_data for s in streams]
        logits = self.talker.codec_head(hidden)  # [B, V]
        seen = torch.stack([w.seen for w in works])  # type: ignore[misc]
        penalty = torch.tensor([s.options.sampling.repetition_penalty for s in streams], device=self.device)
        block = torch.tensor([w.tokens < MIN_NEW_TOKENS for w in works], device=self.device)
        scores = talker_processors(logits, seen, penalty, block, self._suppress, self.cfg.talker.codec_eos_id)
        params = [(p.temperature, p.top_k, p.top_p) for p in (s.options.sampling for s in streams)]
        sampler = RowSampler(params, [w.generator for w in works], self.device)
        return sampler(scores).tolist()

    def _accept_c0(self, s: Stream, c0: int) -> None:
        """Record a sampled codebook-0 token (lock held)."""
        w: _Work = s.engine_data
        w.tokens += 1
        if c0 == self.cfg.talker.codec_eos_id:
            w.done_reason = "eos"
            return
        assert w.seen is not None
        w.seen[c0] = True
        w.c0 = c0

    def _chunk_due(self, s: Stream) -> bool:
        w: _Work = s.engine_data
        if s.state is not State.RUNNING or w.utterance is None:
            return False
        if w.done_reason is not None:
            return True  # flush the rest (possibly zero frames) and close the utterance
        return len(w.pending) >= self._chunk_size(s)

    def _chunk_size(self, s: Stream) -> int:
        sched = s.options.chunk_schedule
        w: _Work = s.engine_data
        return sched[min(w.chunks, len(sched) - 1)]

    def _frames_due(self, s: Stream) -> int:
        w: _Work = s.engine_data
        return len(w.pending) if w.done_reason else self._chunk_size(s)

    def _chunk_groups(self, streams: list[Stream]) -> dict[int, list[Stream]]:
        """Due streams by chunk size: each group decodes in one batched codec call."""
        groups: dict[int, list[Stream]] = {}
        for s in streams:
            groups.setdefault(self._frames_due(s), []).append(s)
        return groups

    def _decode_chunks(self, group: list[Stream]) -> None:
        """Decode and emit the due chunk of every stream of `group` (all due the same size)."""
        n = self._frames_due(group[0])
        audio: list[np.ndarray] = []
        if n > 0:
            codes = torch.tensor(
                np.stack([np.stack(s.engine_data.pending[:n], axis=1) for s in group]), device=self.device
            )  # [B, 16, n]
            rows = [s.engine_data.codec_row for s in group]
            wav = self.codec_streams.decode(rows, codes).float().cpu().numpy()
            audio = list(wav)
        with self._cond:
            for i, s in enumerate(group):
                self._emit(s, audio[i] if n > 0 else np.zeros(0, dtype=np.float32), n)

    def _emit(self, s: Stream, samples: np.ndarray, n: int) -> None:
        """Deliver one chunk; close the utterance if it ended (lock held)."""
        w: _Work = s.engine_data
        utt = w.utterance
        assert utt is not None
        frames = np.stack(w.pending[:n]) if n else np.zeros((0, 16), dtype=np.int64)
        del w.pending[:n]
        closing = w.done_reason is not None and not w.pending
        last = closing and s.text_ended and not _has_more_text(s, utt)
        now = time.monotonic()
        chunk = AudioChunk(
            samples=samples.astype(np.float32, copy=False), utterance=utt.index, frame=w.pending_start,
            frames=n, first=not s.emitted_any, last_in_utterance=closing, last=last,
            end_reason=w.done_reason if closing else None, codes=frames,
        )  # fmt: skip
        if not s._deliver(chunk):
            return
        if n and not s.emitted_any and s.first_text_at is not None:
            s.metrics.first_text_to_first_audio_ms = (now - s.first_text_at) * 1000.0
            self.stats.first_audio_seconds.observe(s.metrics.first_text_to_first_audio_ms / 1000.0)
        if n:
            s.emitted_any = True
        s.metrics.audio_ms += 1000.0 * len(samples) / self.sample_rate
        w.pending_start += n
        w.chunks += 1
        if closing:
            self._end_utterance(s, last, now)

    def _end_utterance(self, s: Stream, last: bool, now: float) -> None:
        w: _Work = s.engine_data
        ended = s.utterances.popleft()
        if not ended.complete:
            # The model ended the utterance (EOS or the frame cap) while its text was still open:
            # text it never read, and text still to come, continue in a new utterance.
            s._continue_utterance(ended, w.consumed)
        s.metrics.utterances += 1
        if w.done_reason in ("budget", "max_frames"):
            s.metrics.truncated += 1
            self.stats.truncated += 1
            log.info("stream %d: utterance %d ended by %s", s.id, ended.index, w.done_reason)
        if w.started_at is not None:
            s.metrics.generate_ms = (now - w.started_at) * 1000.0 - s.metrics.stall_ms
        w.utterance, w.c0, w.hidden, w.frame_embed, w.length = None, None, None, None, 0
        if last:
            s._finish(State.DONE)
            self.stats.completed += 1
        else:
            s.state = State.WAITING
            self._maybe_finish(s)

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.cache.capacity:
            return
        limit = self.cfg.talker.transformer.max_position_embeddings
        if needed > limit:
            raise EngineError(f"utterance exceeds the model's {limit} positions")
        cap = self.cache.capacity
        while cap < needed:
            cap *= 2
        self.cache.grow(min(cap, limit))

    def _instruct_ids(self, instructions: str | None) -> list[int] | None:
        if not instructions or not instructions.strip():
            return None
        cfg = self.cfg
        if cfg.model_type == "base" or (cfg.model_type == "custom_voice" and cfg.model_size == "0b6"):
            # The official wrappers drop instructions for these models (not trained with them).
            log.info("instructions ignored: %s %s models take none", cfg.model_size, cfg.model_type)
            return None
        return instruct_ids(cfg, self.tokenizer.encode("user\n" + instructions), self._newline)


def _stream_of(item: Any) -> Stream:
    return item[0] if isinstance(item, tuple) else item


def _has_more_text(s: Stream, current: Utterance) -> bool:
    return any(u is not current and (u.target_ids > 0 or u.complete) for u in s.utterances)


def _sub_params(p: SamplingParams) -> tuple[float, int, float]:
    return (p.subtalker_temperature, p.subtalker_top_k, p.subtalker_top_p)


def _check_schedule(schedule: Sequence[int]) -> tuple[int, ...]:
    out = tuple(schedule)
    if not out or any(
        isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHUNK_FRAMES for n in out
    ):
        raise EngineError(f"chunk_schedule must be a non-empty list of integers in 1..{MAX_CHUNK_FRAMES}")
    return out


class Buckets:
    """A cumulative histogram (Prometheus-style buckets), kept without any metrics library."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.bounds) and value > self.bounds[i]:
            i += 1
        self.counts[i] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            acc += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
        return out


@dataclass
class EngineStats:
    """Counters for /metrics and benchmarks (updated by the worker)."""

    opened: int = 0
    admitted: int = 0
    closed: int = 0
    completed: int = 0
    failed: int = 0
    refused: int = 0
    truncated: int = 0  # utterances ended by the engine (text budget / frame cap), not by EOS
    prefills: int = 0
    prefill_ms: float = 0.0
    cp_batches: int = 0
    cp_rows: int = 0
    talker_batches: int = 0
    talker_rows: int = 0
    talker_span: int = 0
    step_ms: float = 0.0
    phase_ms: dict[str, float] = field(default_factory=dict)  # wall time per phase (_prefill, ...)
    batch_size: Buckets = field(default_factory=lambda: Buckets((1, 2, 4, 8, 16, 32, 64)))
    step_seconds: Buckets = field(
        default_factory=lambda: Buckets((0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56))
    )
    first_audio_seconds: Buckets = field(
        default_factory=lambda: Buckets((0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30))
    )
