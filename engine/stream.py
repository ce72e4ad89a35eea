"""One utterance stream: text in (push_text / flush / end / cancel), audio chunks out.

The producer side (push_text...) is called from any thread (usually the asyncio event loop);
the engine's worker thread is the only one that touches model state. Both meet under the
engine's lock: text goes into per-utterance id queues, chunks come back through a queue that a
sync consumer iterates with `for chunk in stream` and an asyncio consumer with `async for`.

Semantics (MODEL.md §3, PROTOCOL.md):
- an utterance starts when its first stable text token exists (prefill needs only that one);
- a stream whose next text token has not arrived **stalls**: it sits out the talker step and
  its model state is untouched (feeding `tts_pad` instead would be out of distribution);
- `flush()` feeds `tts_eos` once, lets the utterance finish, and later text starts a new
  utterance with the same voice; `end()` is flush plus close; `cancel()` stops at once and no
  chunk is delivered after it returns.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.text import TextCommitter

if TYPE_CHECKING:
    from engine.options import StreamOptions


class StreamError(RuntimeError):
    """Misuse of a stream (text after end, use after cancel...) or a failure while generating."""


class StreamClosedError(StreamError):
    """Text was pushed to a stream after `end()` or `cancel()`."""


class InvalidTextError(StreamError, ValueError):
    """Text that is not valid Unicode (e.g. a lone surrogate); refused, the stream is unchanged."""


class State(enum.Enum):
    QUEUED = "queued"  # holds no engine row: waiting for text (parked) or for a free row
    WAITING = "waiting"  # has a slot; the current utterance has not been prefilled yet
    RUNNING = "running"  # generating the current utterance
    DONE = "done"  # ended normally, every chunk delivered to the queue
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True)
class AudioChunk:
    """float32 mono PCM at the codec rate (24 kHz) for frames [frame, frame + frames)."""

    samples: np.ndarray
    utterance: int  # 0-based utterance index within the stream
    frame: int  # first frame of this chunk within the utterance
    frames: int
    first: bool  # first chunk of the stream
    last_in_utterance: bool  # the utterance ended with this chunk (may carry 0 frames)
    last: bool  # the stream ended with this chunk
    end_reason: str | None = None  # for the last chunk of an utterance: "eos" | "max_frames"
    codes: np.ndarray | None = None  # [frames, 16] the codec codes this audio was decoded from


@dataclass(frozen=True)
class Marker:
    """A caller's tag, delivered in order after the audio queued before `Stream.mark()`."""

    tag: Any


@dataclass
class StreamMetrics:
    first_text_to_first_audio_ms: float | None = None
    audio_ms: float = 0.0
    generate_ms: float = 0.0
    stall_ms: float = 0.0
    frames: int = 0
    utterances: int = 0
    queued_ms: float = 0.0
    truncated: int = 0  # utterances the engine ended itself (text budget or frame cap), not by EOS

    @property
    def rtf(self) -> float | None:
        return self.generate_ms / self.audio_ms if self.audio_ms else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "first_text_to_first_audio_ms": _round(self.first_text_to_first_audio_ms),
            "audio_ms": _round(self.audio_ms),
            "generate_ms": _round(self.generate_ms),
            "rtf": _round(self.rtf, 4),
            "frames": self.frames,
            "stall_ms": _round(self.stall_ms),
            "utterances": self.utterances,
            "truncated": self.truncated,
        }


def check_text(text: str) -> None:
    """Refuse text that cannot be encoded as UTF-8 (lone surrogates from JSON escapes such as
    "\\ud800"): the tokenizer would fail on it inside the engine."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidTextError(
            f"text is not valid Unicode (an unpaired surrogate at character {e.start})"
        ) from None


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


@dataclass
class Utterance:
    """The text-track queue of one utterance as the worker consumes it."""

    index: int
    ids: list[int] = field(default_factory=list)  # queue prefix (ICL reference text) + committed target ids
    complete: bool = False  # flushed/ended: no more ids will come
    target_ids: int = 0  # committed target-text ids (without the prefix)


_END = object()


class _ChunkQueue:
    """Chunks from the worker thread to one consumer, sync or asyncio. Guarded by the engine lock."""

    def __init__(self, lock: threading.Condition):
        self._lock = lock
        self._items: collections.deque[Any] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Any) -> None:
        """Called with the engine lock held."""
        self._items.append(item)
        self._lock.notify_all()
        if self._loop is not None and self._event is not None:
            try:
                self._loop.call_soon_threadsafe(self._event.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening
                pass

    def clear(self) -> None:
        self._items.clear()

    def get(self, timeout: float | None = None) -> Any:
        with self._lock:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._items:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("no audio within the timeout")
                self._lock.wait(remaining)
            item = self._items.popleft()
            self._lock.notify_all()  # the worker may be waiting for queue space
            return item

    async def aget(self) -> Any:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._loop is not loop:
                    self._loop, self._event = loop, asyncio.Event()
                if self._items:
                    item = self._items.popleft()
                    self._lock.notify_all()
                    return item
                assert self._event is not None
                self._event.clear()
                event = self._event
            await event.wait()


class Stream:
    """A text-to-speech stream. Create it with `Engine.open_stream()`."""

    def __init__(
        self, lock: threading.Condition, stream_id: int, options: StreamOptions, committer: TextCommitter
    ):
        # `lock` is the engine's: the worker reads text and queues chunks under it, and its
        # notify wakes the worker when text arrives.
        self.id = stream_id
        self.options = options
        self.metrics = StreamMetrics()
        self._lock = lock
        self._committer = committer
        self._chunks = _ChunkQueue(lock)
        self.state = State.QUEUED
        self.error: str | None = None
        self._ended = False  # end() called: no more text
        self.closed_for_text = False
        self._prefix = list(options.queue_prefix)
        self.utterances: collections.deque[Utterance] = collections.deque([self._new_utterance(0)])
        self._next_utterance = 1
        # bookkeeping shared with the worker (under the engine lock)
        self.created_at = time.monotonic()
        self.first_text_at: float | None = None
        self.last_text_at = self.created_at
        self.stalled_since: float | None = None
        self.emitted_any = False
        self.engine_data: Any = None  # the scheduler's per-stream state

    # ---- producer API ---------------------------------------------------------------------

    def push_text(self, delta: str) -> None:
        """Append a text delta (concatenated verbatim: keep spaces and punctuation)."""
        if not isinstance(delta, str):
            raise TypeError(f"push_text expects str, got {type(delta).__name__}")
        check_text(delta)
        with self._lock:
            self._check_open()
            now = time.monotonic()
            if delta.strip() and self.first_text_at is None:
                self.first_text_at = now
            if delta:
                self.last_text_at = now
            ids = self._committer.push(delta)
            if ids:
                self._add_ids(ids)
            self._lock.notify_all()

    def flush(self) -> None:
        """Speak everything received so far, end the utterance; later text starts a new one."""
        with self._lock:
            self._check_open()
            self.flush_locked()
            self._lock.notify_all()

    def end(self) -> None:
        """No more text: flush, finish speaking, then the stream ends."""
        with self._lock:
            if self._ended:
                return
            self._check_open()
            self.flush_locked()
            self._ended = True
            self.closed_for_text = True
            self._lock.notify_all()

    def cancel(self) -> None:
        """Stop now (barge-in). No chunk of this stream is delivered after this returns."""
        with self._lock:
            if self.state in (State.DONE, State.CANCELLED, State.FAILED):
                return
            self.state = State.CANCELLED
            self.closed_for_text = True
            self._chunks.clear()
            self._chunks.put(_END)
            self._lock.notify_all()

    def mark(self, tag: Any) -> None:
        """Queue `tag` behind every chunk already queued: iteration yields a `Marker` there."""
        with self._lock:
            if self.state is State.CANCELLED:
                return
            self._chunks.put(Marker(tag))

    def close(self) -> None:
        """Release the stream: cancel it unless it already finished. Idempotent."""
        if not self.finished:
            self.cancel()

    # A stream is a resource (an engine row while it has work): `with engine.open_stream() as s`
    # releases it on every path out of the block, exceptions included.
    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # ---- consumer API ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[AudioChunk | Marker]:
        while True:
            item = self._chunks.get()
            if item is _END:
                self._raise_if_failed()
                return
            yield item

    def chunks(self, timeout: float | None = None) -> Iterator[AudioChunk]:
        """The audio chunks only (markers skipped), with a per-chunk timeout for tests and tools."""
        while True:
            item = self._chunks.get(timeout)
            if item is _END:
                self._raise_if_failed()
                return
            if isinstance(item, AudioChunk):
                yield item

    async def __aiter__(self) -> AsyncIterator[AudioChunk | Marker]:
        while True:
            item = await self._chunks.aget()
            if item is _END:
                self._raise_if_failed()
                return
            yield item

    def read_all(self, timeout: float | None = 600.0) -> np.ndarray:
        """Every sample of the stream concatenated (blocks until the stream ends)."""
        parts = [c.samples for c in self.chunks(timeout)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    @property
    def tokens_to_start(self) -> int | None:
        """Text tokens an utterance needs before audio can start (see StreamOptions.start_tokens)."""
        return self.options.start_tokens

    @property
    def finished(self) -> bool:
        return self.state in (State.DONE, State.CANCELLED, State.FAILED)

    @property
    def queued_chunks(self) -> int:
        return len(self._chunks)

    # ---- worker-side API (the engine's worker thread, engine lock held) ----------------------
    # The scheduler drives a stream through these and the public state above, nothing else.

    def _check_open(self) -> None:
        if self.state is State.CANCELLED:
            raise StreamClosedError(f"stream {self.id} was cancelled; open a new stream for new text")
        if self.state is State.FAILED:
            raise StreamClosedError(f"stream {self.id} failed: {self.error}")
        if self.closed_for_text:
            raise StreamClosedError(f"stream {self.id} has ended; open a new stream for new text")

    def _new_utterance(self, index: int) -> Utterance:
        return Utterance(index=index, ids=list(self._prefix))

    def _add_ids(self, ids: list[int]) -> None:
        utt = self.utterances[-1]
        utt.ids.extend(ids)
        utt.target_ids += len(ids)

    def flush_locked(self) -> None:
        ids = self._committer.flush()
        if ids:
            self._add_ids(ids)
        current = self.utterances[-1]
        if current.target_ids == 0:
            return  # nothing to speak: flushing an empty utterance is a no-op
        current.complete = True
        self.utterances.append(self._new_utterance(self._next_utterance))
        self._next_utterance += 1

    def continue_utterance(self, ended: Utterance, consumed: int) -> None:
        """Open the next utterance with the queue entries the ended one never fed (lock held)."""
        leftover = ended.ids[max(consumed, len(self._prefix)) :]
        nxt = self._new_utterance(self._next_utterance)
        self._next_utterance += 1
        nxt.ids.extend(leftover)
        nxt.target_ids = len(leftover)
        self.utterances.appendleft(nxt)

    def idle_flush_deadline(self) -> float | None:
        """When text waiting unspoken is to be flushed (monotonic seconds); None: no such text."""
        ms = self.options.idle_flush_ms
        if not ms or self.closed_for_text or self.state not in (State.QUEUED, State.WAITING, State.RUNNING):
            return None
        if not (self._committer.has_pending or self.utterances[-1].target_ids > 0):
            return None
        return self.last_text_at + ms / 1000.0

    def idle_flush_due(self, now: float) -> bool:
        """Text is waiting unspoken and none has arrived for idle_flush_ms."""
        deadline = self.idle_flush_deadline()
        return deadline is not None and now >= deadline

    @property
    def text_ended(self) -> bool:
        return self._ended

    def deliver(self, chunk: AudioChunk) -> bool:
        """Queue a chunk unless the stream was cancelled meanwhile. Lock held."""
        if self.state is State.CANCELLED:
            return False
        self._chunks.put(chunk)
        return True

    def finish(self, state: State, error: str | None = None) -> None:
        if self.state is State.CANCELLED:
            return
        self.state = state
        self.error = error
        self.closed_for_text = True
        self._chunks.put(_END)

    def _raise_if_failed(self) -> None:
        if self.state is State.FAILED:
            raise StreamError(f"stream {self.id} failed: {self.error}")

    def __repr__(self) -> str:
        return f"<Stream {self.id} {self.state.value} voice={self.options.voice_name!r}>"
