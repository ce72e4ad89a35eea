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
import os
import threading
import time
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.backend import Backend, ResolvedVoice, load_backend
from engine.checkpoint import Checkpoint, load_checkpoint
from engine.errors import EngineError, OverloadedError, VoiceError
from engine.options import DEFAULT_CHUNK_SCHEDULE, build_options, check_schedule
from engine.phases import Phases, Work, work
from engine.prompt import (
    TextMode,
    prefill_needs,
    role_ids,
)
from engine.sampling import SamplingParams
from engine.stats import EngineStats
from engine.stream import AudioChunk, State, Stream
from engine.text import TextCommitter, TextTokenizer
from engine.voices import ClonedVoice, Voices

__all__ = ["Engine", "EngineError", "OverloadedError", "ResolvedVoice", "VoiceError"]

log = logging.getLogger(__name__)


class Engine(Phases):
    """Loads a checkpoint and serves many streams at once from one worker thread.

    Args:
        model: a `Checkpoint`, or a spec for `load_checkpoint` (directory, hub id, random:...).
        backend: "torch", "mlx", or None for the platform's default (`engine.backend`).
        device: where the backend runs (torch: cuda if present, else cpu; mlx: gpu if present).
        precision: "fp32" (exact against the official package), "bf16", "int8" or "auto" (the
            fastest mode this device and CPU run well; see the backend's precision module).
            None: the TTS_PRECISION environment variable, else "auto".
        dtype: the older spelling of precision for torch (torch.float32 / torch.bfloat16).
        max_streams: KV-cache rows, i.e. streams generating at the same time.
        max_queued_streams: streams waiting for a row; more are refused with OverloadedError.
        max_queued_chunks: per-stream output bound; a stream whose consumer lags this far
            behind sits out steps (backpressure) instead of growing memory or blocking others.
        kv_capacity: initial KV positions per row; grows (doubling) when a stream needs more.
        prefill_tokens_per_step: prompt positions prefilled together in one step (at least one
            stream always goes): bounds how long newcomers hold up running streams. Default 64
            on CPU (prefill is compute-bound there), 2048 on a GPU.
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
        backend: str | None = None,
        device: str | None = None,
        precision: str | None = None,
        dtype: Any = None,
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
        if budget_frames_per_token is not None and (budget_frames_per_token <= 0 or budget_base_frames < 0):
            raise EngineError(
                "the frame budget needs budget_frames_per_token > 0 and budget_base_frames >= 0"
            )
        precision = precision or os.environ.get("TTS_PRECISION") or "auto"
        self.checkpoint = model if isinstance(model, Checkpoint) else load_checkpoint(model)
        self.cfg = self.checkpoint.config
        self.tokenizer = TextTokenizer.from_dir(self.checkpoint.tokenizer_dir)
        self.backend: Backend = load_backend(
            backend, self.checkpoint, max_streams=max_streams, kv_capacity=kv_capacity, device=device,
            precision=precision, dtype=dtype,
        )  # fmt: skip
        self.device = self.backend.device
        self.precision = self.backend.precision
        self.max_streams = max_streams
        self.max_queued_streams = max_queued_streams
        self.max_queued_chunks = max_queued_chunks
        self.default_chunk_schedule = check_schedule(default_chunk_schedule)
        self.default_idle_flush_ms = default_idle_flush_ms
        on_cpu = self.device.startswith("cpu")
        self.prefill_tokens_per_step = prefill_tokens_per_step or (64 if on_cpu else 2048)
        self.budget_frames_per_token = budget_frames_per_token
        self.budget_base_frames = budget_base_frames
        self.stall_reclaim_ms = stall_reclaim_ms
        self.samples_per_frame = self.checkpoint.codec.decoder.samples_per_frame
        self.sample_rate = self.checkpoint.codec.sample_rate
        self._role = role_ids(self.cfg, self.tokenizer.encode("assistant\n"))
        self.voice_book = Voices(self.cfg, self.tokenizer, self.backend, voices_db, self.sample_rate)

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

    def describe(self) -> dict[str, Any]:
        """What runs: model, backend, device, precision (for /health and the CLI)."""
        return {"model": self.checkpoint.name, "model_type": self.cfg.model_type, **self.backend.describe()}

    @property
    def voices(self) -> list[str]:
        """Preset speakers, then registered clone voices (by id)."""
        return self.voice_book.names

    def describe_voices(self) -> list[dict[str, object]]:
        return self.voice_book.describe()

    @property
    def voice_store(self) -> Any:
        return self.voice_book.store

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
        return self.voice_book.create(
            name, audio, sample_rate=sample_rate, ref_text=ref_text, x_vector_only=x_vector_only,
            max_seconds=max_seconds,
        )  # fmt: skip

    def delete_voice(self, key: str) -> bool:
        return self.voice_book.delete(key)

    @property
    def languages(self) -> list[str]:
        return self.cfg.languages

    @property
    def model_type(self) -> str:
        return self.cfg.model_type

    def default_voice(self) -> str | None:
        return self.voice_book.default()

    def resolve_voice(self, name: str | None) -> ResolvedVoice:
        """A preset speaker, a cloned voice, or no voice (VoiceDesign / plain Base)."""
        return self.voice_book.resolve(name)

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
        options = build_options(
            self.cfg, self.checkpoint.generation, self.tokenizer, self.voice_book, voice=voice,
            language=language, instructions=instructions, sampling=sampling, seed=seed,
            chunk_schedule=chunk_schedule if chunk_schedule is not None else self.default_chunk_schedule,
            idle_flush_ms=idle_flush_ms if idle_flush_ms is not None else self.default_idle_flush_ms,
            text_mode=text_mode, max_frames=max_frames,
        )  # fmt: skip
        with self._cond:
            if len(self._queued) >= self.max_queued_streams:
                self.stats.refused += 1
                raise OverloadedError(
                    f"{len(self._active)} streams generating and {len(self._queued)} queued: try again later"
                )
            stream = Stream(self._cond, self._next_id, options, TextCommitter(self.tokenizer))
            stream.engine_data = Work(
                row_state=self.backend.new_row_state(options.sampling),
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
        deadlines = [d for s in (*self._active, *self._queued) if (d := s.idle_flush_deadline()) is not None]
        if not deadlines:
            return 0.5
        return max(0.001, min(deadlines) - time.monotonic())

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
            if work(s).c0 is not None and s.state is State.RUNNING and not self._backlogged(s)
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

    # ---- housekeeping (lock held) -------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for s in list(self._active):
            if s.finished:
                self._release(s)
        for s in (*self._active, *self._queued):
            if s.idle_flush_due(now):
                s.flush_locked()
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
            if s.state is State.WAITING and work(s).utterance is None:
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
            held[work(s).owner] = held.get(work(s).owner, 0) + 1
        best: Stream | None = None
        best_key = (0, False)
        for s in self._queued:
            if s.state is State.QUEUED and self._startable(s):
                key = (held.get(work(s).owner, 0), s.emitted_any)
                if best is None or key < best_key:
                    best, best_key = s, key
        return best

    def _reclaim_stalled(self, now: float) -> None:
        """Flush streams stalled mid-utterance for `stall_reclaim_ms` while others wait for a row:
        the utterance ends with the text it has, and the row comes back when it is spoken."""
        if self.stall_reclaim_ms is None:
            return
        for s in self._active:
            w = work(s)
            if (
                s.state is State.RUNNING
                and w.stalled_since is not None
                and (now - w.stalled_since) * 1000.0 >= self.stall_reclaim_ms
                and not s.closed_for_text
            ):
                log.info(
                    "stream %d stalled %.0f ms while others wait: flushed",
                    s.id,
                    (now - w.stalled_since) * 1e3,
                )
                s.flush_locked()
                w.stalled_since = None

    def _admit(self, s: Stream, now: float) -> None:
        w = work(s)
        w.row = len(self._active)
        w.codec_row = self._free_codec_rows.pop()
        self.backend.reset_codec_row(w.codec_row)
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
        w = work(s)
        idx = self._active.index(s)
        last = self._active[-1]
        if last is not s:
            lw = work(last)
            self.backend.move_kv_row(lw.row, w.row, lw.length)
            lw.row = w.row
            self._active[idx] = last
        self._active.pop()
        self._free_codec_rows.append(w.codec_row)
        w.row = w.codec_row = -1
        w.length = 0

    def _maybe_finish(self, s: Stream) -> None:
        """A stream with no utterance left to speak and no more text coming is done."""
        w = work(s)
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
        s.deliver(chunk)
        s.finish(State.DONE)
        self.stats.completed += 1

    def _backlogged(self, s: Stream) -> bool:
        return s.queued_chunks >= self.max_queued_chunks

    def _ready_for_talker(self, s: Stream) -> bool:
        """The frame is complete and the next text-track input is known (else: stall)."""
        w = work(s)
        if s.state is not State.RUNNING or not w.frame_ready or w.done_reason or self._backlogged(s):
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
