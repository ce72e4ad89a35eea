"""The model phases of one engine step, in scheduler terms: which stream feeds what, and what
happens to a stream when its tokens and audio come back. The tensors live in the backend.

Each phase runs in the worker thread without the lock while the backend computes, and takes the
lock only to write stream state afterwards. A phase writes stream state only after its last
backend call, so a phase that raises leaves nothing behind (see `Engine._guarded`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.backend import Backend, PrefillRow, StepRow
from engine.config import ModelConfig
from engine.errors import EngineError
from engine.prompt import Prefill, PromptError, build_prefill
from engine.sampling import MIN_NEW_TOKENS
from engine.stats import EngineStats
from engine.stream import AudioChunk, State, Stream, Utterance

log = logging.getLogger(__name__)


@dataclass
class Work:
    """Worker-side state of a stream (only the worker thread touches it)."""

    row_state: Any  # the backend's RowState: generator, repetition set, hidden, next input
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
    frame_ready: bool = False  # the frame is complete: the talker may step
    pending: list[np.ndarray] = field(default_factory=list)  # frames [16] not yet decoded
    pending_start: int = 0  # frame index of pending[0]
    chunks: int = 0  # chunks emitted in the utterance
    done_reason: str | None = None  # the utterance has ended: "eos" | "max_frames" | "budget"
    started_at: float | None = None
    stalled_since: float | None = None  # waiting for text since (talker stall)


def work(s: Stream) -> Work:
    return s.engine_data  # type: ignore[no-any-return]


class Phases:
    """Mixed into `Engine`: the phases of `Engine.step` (attributes set by Engine.__init__)."""

    backend: Backend
    cfg: ModelConfig
    stats: EngineStats
    sample_rate: int
    max_queued_chunks: int
    budget_frames_per_token: float | None
    budget_base_frames: int
    prefill_tokens_per_step: int
    _role: list[int]
    _cond: threading.Condition
    _active: list[Stream]

    def _maybe_finish(self, s: Stream) -> None:  # defined by Engine
        raise NotImplementedError

    def _startable(self, s: Stream) -> bool:  # defined by Engine
        raise NotImplementedError

    # ---- running a phase ------------------------------------------------------------------------

    def _guarded(self, items: list[Any], fn: Any) -> None:
        """Run one batched phase over `items` (streams, or (stream, prefill) pairs).

        If it raises, the failure is traced to its rows: every item is retried alone, with the
        random generators rewound to where the batch found them (so the retry samples exactly
        what the batched call would have), and only the items that fail alone are failed. A
        phase writes stream state only after its last tensor op, and KV / codec state only at
        positions a retry overwrites, so a failed batch leaves nothing behind.
        """
        states = [work(_stream_of(it)).row_state for it in items]
        saved = self.backend.rng_states(states) if len(items) > 1 else []
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
            self.backend.restore_rng(states, saved)
            for it in items:
                if _stream_of(it).state in (State.RUNNING, State.WAITING):
                    self._guarded([it], fn)
            return
        stream = _stream_of(items[0])
        log.error("engine phase %s failed for stream %d", fn.__name__, stream.id, exc_info=error)
        with self._cond:
            stream.finish(State.FAILED, f"internal error while generating ({type(error).__name__})")
            self.stats.failed += 1

    # ---- prefill --------------------------------------------------------------------------------

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
                s.finish(State.FAILED, str(e))
                self.stats.failed += 1
                continue
            if picked and tokens + len(pre.slots) > self.prefill_tokens_per_step:
                break
            picked.append((s, pre))
            tokens += len(pre.slots)
        return picked

    def _prefill(self, batch: list[tuple[Stream, Prefill]]) -> None:  # items: (stream, prefill)
        """Prefill new utterances together: one forward over [B, longest prompt]."""
        t0 = time.perf_counter()
        streams = [s for s, _ in batch]
        works = [work(s) for s in streams]
        self._ensure_capacity(max(len(pre.slots) for _, pre in batch) + 1)
        items = [
            PrefillRow(
                state=w.row_state, row=w.row, codec_row=w.codec_row, slots=pre.slots, voice=s.options.voice
            )
            for (s, pre), w in zip(batch, works, strict=True)
        ]
        c0 = self.backend.prefill(items)
        with self._cond:
            now = time.monotonic()
            for (s, pre), w, code in zip(batch, works, c0, strict=True):
                w.utterance, w.length = s.utterances[0], len(pre.slots)
                w.consumed, w.eos_fed = pre.consumed, pre.eos_fed
                w.frame, w.tokens, w.pending, w.pending_start, w.chunks = 0, 0, [], 0, 0
                w.done_reason, w.frame_ready, w.c0 = None, False, None
                if s.state is State.WAITING:
                    s.state = State.RUNNING
                if w.started_at is None:
                    w.started_at = now
                if s.state is State.RUNNING:
                    self._accept_c0(s, code)
        self.stats.prefills += len(batch)
        self.stats.prefill_ms += (time.perf_counter() - t0) * 1000.0

    # ---- code predictor -------------------------------------------------------------------------

    def _predict_codes(self, streams: list[Stream]) -> None:
        works = [work(s) for s in streams]
        frames = self.backend.predict_codes([w.row_state for w in works], [w.c0 for w in works])  # type: ignore[misc]
        with self._cond:
            for i, (s, w) in enumerate(zip(streams, works, strict=True)):
                if s.state is not State.RUNNING:
                    continue
                w.pending.append(frames[i])
                w.frame += 1
                w.c0 = None
                w.frame_ready = True
                s.metrics.frames += 1
                if w.frame >= s.options.max_frames:
                    w.done_reason = "max_frames"
                elif w.utterance is not None and w.frame >= self._frame_budget(w.utterance):
                    w.done_reason = "budget"
        self.stats.cp_batches += 1
        self.stats.cp_rows += len(streams)

    def _frame_budget(self, utt: Utterance) -> float:
        """The most frames an utterance may run: its text cannot need more (see scheduler doc)."""
        if self.budget_frames_per_token is None:
            return float("inf")
        return self.budget_base_frames + self.budget_frames_per_token * utt.target_ids

    # ---- talker ---------------------------------------------------------------------------------

    def _talker_step(self, streams: list[Stream]) -> None:
        t0 = time.perf_counter()
        works = [work(s) for s in streams]
        rows = [w.row for w in works]
        r0, r1 = min(rows), max(rows) + 1
        lengths = [work(s).length for s in self._active[r0:r1]]
        self._ensure_capacity(max(lengths) + 1)
        items: list[StepRow] = []
        fed: list[str] = []
        for w in works:
            utt = w.utterance
            assert utt is not None
            if w.consumed < len(utt.ids):
                text_id, kind = utt.ids[w.consumed], "text"
            elif not w.eos_fed:
                text_id, kind = self.cfg.tts_eos_id, "eos"
            else:
                text_id, kind = self.cfg.tts_pad_id, "pad"
            fed.append(kind)
            items.append(
                StepRow(state=w.row_state, row=w.row, text_id=text_id, block_eos=w.tokens < MIN_NEW_TOKENS)
            )
        c0 = self.backend.talker_step((r0, r1), lengths, items)
        with self._cond:
            for i, (s, w) in enumerate(zip(streams, works, strict=True)):
                w.length += 1
                w.frame_ready = False
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

    def _accept_c0(self, s: Stream, c0: int) -> None:
        """Record a sampled codebook-0 token (lock held)."""
        w = work(s)
        w.tokens += 1
        if c0 == self.cfg.talker.codec_eos_id:
            w.done_reason = "eos"
            return
        w.c0 = c0

    def _ensure_capacity(self, needed: int) -> None:
        cap = self.backend.kv_capacity
        if needed <= cap:
            return
        limit = self.cfg.talker.transformer.max_position_embeddings
        if needed > limit:
            raise EngineError(f"utterance exceeds the model's {limit} positions")
        while cap < needed:
            cap *= 2
        self.backend.grow_kv(min(cap, limit))

    # ---- codec ----------------------------------------------------------------------------------

    def _chunk_due(self, s: Stream) -> bool:
        w = work(s)
        if s.state is not State.RUNNING or w.utterance is None:
            return False
        if w.done_reason is not None:
            return True  # flush the rest (possibly zero frames) and close the utterance
        return len(w.pending) >= self._chunk_size(s)

    def _chunk_size(self, s: Stream) -> int:
        sched = s.options.chunk_schedule
        return sched[min(work(s).chunks, len(sched) - 1)]

    def _frames_due(self, s: Stream) -> int:
        w = work(s)
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
            codes = np.stack([np.stack(work(s).pending[:n], axis=1) for s in group])  # [B, 16, n]
            audio = list(self.backend.decode([work(s).codec_row for s in group], codes))
        with self._cond:
            for i, s in enumerate(group):
                self._emit(s, audio[i] if n > 0 else np.zeros(0, dtype=np.float32), n)

    def _emit(self, s: Stream, samples: np.ndarray, n: int) -> None:
        """Deliver one chunk; close the utterance if it ended (lock held)."""
        w = work(s)
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
        if not s.deliver(chunk):
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
        w = work(s)
        ended = s.utterances.popleft()
        if not ended.complete:
            # The model ended the utterance (EOS or the frame cap) while its text was still open:
            # text it never read, and text still to come, continue in a new utterance.
            s.continue_utterance(ended, w.consumed)
        s.metrics.utterances += 1
        if w.done_reason in ("budget", "max_frames"):
            s.metrics.truncated += 1
            self.stats.truncated += 1
            log.info("stream %d: utterance %d ended by %s", s.id, ended.index, w.done_reason)
        if w.started_at is not None:
            s.metrics.generate_ms = (now - w.started_at) * 1000.0 - s.metrics.stall_ms
        w.utterance, w.c0, w.frame_ready, w.length = None, None, False, 0
        if last:
            s.finish(State.DONE)
            self.stats.completed += 1
        else:
            s.state = State.WAITING
            self._maybe_finish(s)


def _has_more_text(s: Stream, current: Utterance) -> bool:
    return any(u is not current and (u.target_ids > 0 or u.complete) for u in s.utterances)


def _stream_of(item: Any) -> Stream:
    return item[0] if isinstance(item, tuple) else item
