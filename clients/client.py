"""An asyncio client for the native streaming protocol (``tts.v1``, ``design/PROTOCOL.md``).

One :class:`TTSClient` is one WebSocket session. A background reader task owns the socket's
receive side and demultiplexes everything it reads: JSON events by ``context_id``, binary audio
frames by the ``stream`` number announced in ``context.started``. Each :class:`ContextHandle`
gets its own queue, so several contexts share one socket and each consumer iterates only its
own audio and events::

    async with TTSClient.connect("ws://127.0.0.1:8000/v1/tts/stream", voice="ryan") as client:
        ctx = client.context()
        for word in ["Hello", " world."]:
            await ctx.append(word)
        await ctx.end()
        async for item in ctx:
            if isinstance(item, AudioChunk):
                play(item.samples, item.sample_rate)

Timestamps are taken by the reader when a frame comes off the socket (``time.perf_counter()``),
not when a consumer gets round to it, so client-side latency numbers do not depend on how fast
the application iterates.

The client is also a conformance checker: every frame is checked against the protocol's rules
as it arrives (``seq`` counts from 0 per context, ``sample_offset`` is continuous, the
first/last flags sit on the ends, no audio after a context's terminal event, ``audio_ms`` in
events equals the audio received before them). Violations are always recorded in
``ContextHandle.violations`` / ``TTSClient.violations``; with ``strict=True`` (the default) the
affected context's iterator also raises :class:`ProtocolViolation`.

Exceptions::

    ClientError              base of everything this module raises on purpose
     ├── ConnectError        the handshake failed (network, HTTP status, timeout)
     │    └── AuthenticationError   HTTP 401: missing or wrong API key
     ├── ServerError         an ``error`` event: ``code`` (stable string), ``message``, ``fatal``
     ├── ProtocolViolation   the server broke a rule of PROTOCOL.md (a server bug)
     ├── ConnectionLost      the socket closed before a context finished
     └── ContextStateError   local misuse: text after ``end()``/``cancel()``, a second consumer
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field, fields
from types import TracebackType
from typing import Any, ClassVar, Final, Literal, TypeAlias

import numpy as np
import numpy.typing as npt
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.typing import Subprotocol

from realtime.audio import BYTES_PER_SAMPLE, decode_pcm
from realtime.protocol import AUDIO_KIND, SUBPROTOCOL, AudioFlags, AudioHeader, FlagsView, FrameError

log = logging.getLogger(__name__)

FloatArray: TypeAlias = npt.NDArray[np.float32]

# Audio frames can be large (a 64-frame chunk of f32 at 48 kHz is ~1.2 MB); the server is trusted
# to respect its own chunk limits, so the client only guards against absurd frames.
DEFAULT_MAX_FRAME_BYTES: Final = 16 * 1024 * 1024
# Tolerance when comparing an event's audio_ms with the audio received: the server rounds
# milliseconds to 3 decimals.
AUDIO_MS_TOLERANCE: Final = 0.01

# session.update fields a caller may pass flat (as keyword arguments) and where they go on the wire.
_FLAT_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "voice": ("voice",),
    "language": ("language",),
    "instructions": ("instructions",),
    "encoding": ("output", "encoding"),
    "sample_rate": ("output", "sample_rate"),
    "chunk_schedule": ("chunk_schedule",),
    "chunk_size": ("chunk_size",),
    "temperature": ("sampling", "temperature"),
    "top_k": ("sampling", "top_k"),
    "top_p": ("sampling", "top_p"),
    "repetition_penalty": ("sampling", "repetition_penalty"),
    "seed": ("sampling", "seed"),
    "idle_flush_ms": ("text", "idle_flush_ms"),
}
_NESTED_FIELDS: Final = ("output", "sampling", "text")


# --------------------------------------------------------------------------------------------
# Exceptions


class ClientError(Exception):
    """Base class of the errors this client raises."""


class ConnectError(ClientError):
    """The WebSocket handshake failed; ``status`` is the HTTP status when the server answered."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthenticationError(ConnectError):
    """The server refused the API key (HTTP 401 before the upgrade)."""


class ServerError(ClientError):
    """An ``error`` event from the server. Switch on ``code`` (stable), never on ``message``."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        context_id: str | None = None,
        event_id: str | int | None = None,
        fatal: bool = False,
    ) -> None:
        where = f" (context {context_id!r})" if context_id else ""
        super().__init__(f"{code}: {message}{where}")
        self.code = code
        self.message = message
        self.context_id = context_id
        self.event_id = event_id
        self.fatal = fatal


class ProtocolViolation(ClientError):
    """The server broke a rule of the protocol (seq order, sample_offset gap, audio after the end...)."""


class ConnectionLost(ClientError):
    """The socket closed while a context was still running (``code``/``reason`` of the close)."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class ContextStateError(ClientError):
    """The caller used a context in a state that does not allow it (text after end, cancel...)."""


# --------------------------------------------------------------------------------------------
# What the client yields


@dataclass(frozen=True)
class AudioChunk(FlagsView):
    """One binary audio frame, decoded to float32 mono at the context's output rate."""

    type: ClassVar[str] = "audio"
    context_id: str
    stream: int
    seq: int
    sample_offset: int  # first sample of this chunk from the context start, at sample_rate
    flags: AudioFlags
    samples: FloatArray
    sample_rate: int
    encoding: str
    received_at: float  # time.perf_counter() when the frame came off the socket

    @property
    def duration_ms(self) -> float:
        return len(self.samples) * 1000.0 / self.sample_rate

    @property
    def end_offset(self) -> int:
        """``sample_offset`` of the chunk that should follow this one."""
        return self.sample_offset + len(self.samples)


@dataclass(frozen=True)
class MarkEvent:
    """A client ``mark`` echoed after the audio queued before it; ``audio_ms`` is its position."""

    type: ClassVar[str] = "mark"
    context_id: str
    name: str
    audio_ms: float
    received_at: float


@dataclass(frozen=True)
class FlushedEvent:
    """The end of an utterance (``text.flush`` or an idle flush); the context stays open."""

    type: ClassVar[str] = "context.flushed"
    context_id: str
    audio_ms: float
    received_at: float


@dataclass(frozen=True)
class Metrics:
    """The server's measurements for one context (``context.done``), durations in ms."""

    first_text_to_first_audio_ms: float | None = None
    audio_ms: float = 0.0
    generate_ms: float = 0.0
    rtf: float | None = None
    frames: int = 0
    stall_ms: float = 0.0
    utterances: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)  # fields added by newer servers

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Metrics:
        known = {f.name for f in fields(cls)}
        ttfa, rtf = d.get("first_text_to_first_audio_ms"), d.get("rtf")
        return cls(
            first_text_to_first_audio_ms=None if ttfa is None else float(ttfa),
            audio_ms=float(d.get("audio_ms") or 0.0),
            generate_ms=float(d.get("generate_ms") or 0.0),
            rtf=None if rtf is None else float(rtf),
            frames=int(d.get("frames") or 0),
            stall_ms=float(d.get("stall_ms") or 0.0),
            utterances=int(d.get("utterances") or 0),
            extra={k: v for k, v in d.items() if k not in known},
        )


@dataclass(frozen=True)
class DoneEvent:
    """The context ended normally; nothing of it follows."""

    type: ClassVar[str] = "context.done"
    context_id: str
    audio_ms: float
    metrics: Metrics
    received_at: float


@dataclass(frozen=True)
class CancelledEvent:
    """The context was cancelled; no audio of it follows (PROTOCOL.md guarantees it)."""

    type: ClassVar[str] = "context.cancelled"
    context_id: str
    audio_ms: float
    received_at: float


@dataclass(frozen=True)
class ErrorEvent:
    """A non-fatal ``error`` about a context (e.g. ``text_too_large``); the context goes on."""

    type: ClassVar[str] = "error"
    code: str
    message: str
    context_id: str | None
    event_id: str | int | None
    fatal: bool
    received_at: float

    def to_exception(self) -> ServerError:
        return ServerError(
            self.code, self.message, context_id=self.context_id, event_id=self.event_id, fatal=self.fatal
        )


ContextItem: TypeAlias = AudioChunk | MarkEvent | FlushedEvent | DoneEvent | CancelledEvent | ErrorEvent


@dataclass(frozen=True)
class SessionInfo:
    """``session.created``: what the server will do by default, and what it offers."""

    session_id: str
    protocol: str
    model: str
    config: Mapping[str, Any]
    encoding: str
    sample_rate: int
    limits: Mapping[str, Any]
    voices: tuple[str, ...]
    languages: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SessionInfo:
        audio = d.get("audio") or {}
        return cls(
            session_id=str(d.get("session_id", "")),
            protocol=str(d.get("protocol", "")),
            model=str(d.get("model", "")),
            config=dict(d.get("config") or {}),
            encoding=str(audio.get("encoding", "pcm_s16le")),
            sample_rate=int(audio.get("sample_rate", 24000)),
            limits=dict(d.get("limits") or {}),
            voices=tuple(d.get("voices") or ()),
            languages=tuple(d.get("languages") or ()),
        )


@dataclass
class ContextResult:
    """Everything one context produced, from :meth:`ContextHandle.collect`."""

    context_id: str
    audio: FloatArray
    sample_rate: int
    chunks: list[AudioChunk]
    events: list[MarkEvent | FlushedEvent | ErrorEvent]
    done: DoneEvent | None
    cancelled: CancelledEvent | None
    first_text_at: float | None
    first_audio_at: float | None
    violations: list[str]

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate

    @property
    def first_audio_ms(self) -> float | None:
        """Client-side latency: first text sent to first audio frame received."""
        if self.first_text_at is None or self.first_audio_at is None:
            return None
        return (self.first_audio_at - self.first_text_at) * 1000.0


def config_message(**config: Any) -> dict[str, Any]:
    """``session.update``-shaped fields from flat keyword arguments.

    ``encoding``/``sample_rate`` go into ``output``, sampling knobs into ``sampling``,
    ``idle_flush_ms`` into ``text``; the nested dicts may also be given whole. Unknown names are
    a ``TypeError`` here because the server ignores unknown fields, so a typo would silently do
    nothing.
    """
    out: dict[str, Any] = {}
    for name, value in config.items():
        if name in _NESTED_FIELDS:
            if value is not None:
                out.setdefault(name, {}).update(dict(value))
            continue
        path = _FLAT_FIELDS.get(name)
        if path is None:
            known = ", ".join(sorted([*_FLAT_FIELDS, *_NESTED_FIELDS]))
            raise TypeError(f"unknown session option {name!r}; expected one of: {known}")
        if value is None and name not in ("instructions", "seed"):
            continue  # None means "not given"; for these two it is a real value (clear it)
        if isinstance(value, tuple):
            value = list(value)
        if len(path) == 1:
            out[path[0]] = value
        else:
            out.setdefault(path[0], {})[path[1]] = value
    return out


# --------------------------------------------------------------------------------------------
# Per-context handle


class _Raise:
    """A queue item that makes the consumer raise ``exc`` (a violation or a lost connection)."""

    def __init__(self, exc: BaseException, terminal: bool) -> None:
        self.exc = exc
        self.terminal = terminal


_QueueItem: TypeAlias = "ContextItem | _Raise"
ContextState: TypeAlias = Literal["new", "open", "ending", "cancelling", "done", "cancelled", "failed"]
_TERMINAL: Final = ("done", "cancelled", "failed")


class ContextHandle:
    """One context (one turn of speech) on a :class:`TTSClient`; create it with ``client.context()``.

    Producer side: :meth:`append`, :meth:`flush`, :meth:`end`, :meth:`cancel`, :meth:`mark`.
    Consumer side: ``async for item in handle`` yields :data:`ContextItem` values in the order
    the server sent them and stops after ``DoneEvent`` or ``CancelledEvent``; a fatal error
    raises :class:`ServerError`, a dropped socket :class:`ConnectionLost`. One consumer per
    handle. Items queue up unbounded until consumed, so a caller that never iterates should not
    keep a long context open.
    """

    def __init__(self, client: TTSClient, context_id: str, overrides: dict[str, Any]) -> None:
        self._client = client
        self.id = context_id
        self._overrides = overrides
        self.state: ContextState = "new"
        self.stream: int | None = None
        self.encoding: str | None = None
        self.sample_rate: int | None = None
        self.first_text_at: float | None = None
        self.first_audio_at: float | None = None
        self.samples_received = 0
        self.chunks_received = 0
        self.done: DoneEvent | None = None
        self.cancelled: CancelledEvent | None = None
        self.error: ServerError | None = None
        self.failure: BaseException | None = None  # why the context failed (ServerError, ConnectionLost)
        self.violations: list[str] = []
        self._queue: asyncio.Queue[_QueueItem] = asyncio.Queue()
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._open_lock = asyncio.Lock()
        self._exhausted = False
        self._iterating = False
        # conformance state, updated by the reader
        self._next_seq = 0
        self._next_offset = 0
        self._saw_last = False
        self._terminal_seen = False

    def __repr__(self) -> str:
        return f"<ContextHandle {self.id!r} {self.state} stream={self.stream}>"

    # ---- state ----------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.state in _TERMINAL

    @property
    def started(self) -> bool:
        """``context.started`` has arrived (the server opened the context)."""
        return self.stream is not None

    @property
    def first_audio_ms(self) -> float | None:
        """Client-side latency: first text sent to first audio frame received (None until both)."""
        if self.first_text_at is None or self.first_audio_at is None:
            return None
        return (self.first_audio_at - self.first_text_at) * 1000.0

    @property
    def audio_ms(self) -> float:
        """Audio received so far, in ms."""
        return self.samples_received * 1000.0 / self.sample_rate if self.sample_rate else 0.0

    # ---- producer -------------------------------------------------------------------------

    async def open(self, *, timeout: float | None = 30.0) -> None:
        """Send ``context.create`` (with this handle's overrides) and wait for ``context.started``.

        Optional without overrides (the first ``append`` opens the context). With overrides the
        first ``append`` calls it, which costs one round trip: call it before the first text
        arrives (e.g. when the LLM turn starts) to keep that round trip out of the latency.
        Raises :class:`ServerError` when the server refuses the context.
        """
        async with self._open_lock:
            if self.state != "new":
                if not self._started.done():
                    await self._wait_started(timeout)
                return
            self.state = "open"
            await self._client._send({"type": "context.create", "context_id": self.id, **self._overrides})
        await self._wait_started(timeout)

    async def _wait_started(self, timeout: float | None) -> None:
        await asyncio.wait_for(asyncio.shield(self._started), timeout)

    async def append(self, text: str) -> None:
        """Send a text delta (concatenated verbatim by the server: keep spaces and punctuation)."""
        if self.state == "new" and self._overrides:
            await self.open()
        self._check_writable("append text to")
        if self.first_text_at is None and text:
            self.first_text_at = time.perf_counter()
        self.state = "open"
        await self._client._send({"type": "text.append", "context_id": self.id, "text": text})

    async def flush(self) -> None:
        """Speak everything sent so far as one utterance; the context stays open."""
        await self._ensure_open()
        self._check_writable("flush")
        await self._client._send({"type": "text.flush", "context_id": self.id})

    async def end(self) -> None:
        """No more text: the server finishes speaking and then sends ``context.done``."""
        await self._ensure_open()
        self._check_writable("end")
        self.state = "ending"
        await self._client._send({"type": "text.end", "context_id": self.id})

    async def mark(self, name: str) -> None:
        """Ask for a ``mark`` event; the server sends it after the audio it had queued when the
        mark arrived (not after the audio of text still being generated), with ``audio_ms``."""
        await self._ensure_open()
        if self.finished:
            if isinstance(self.failure, ClientError):
                raise self.failure
            raise ContextStateError(f"context {self.id!r} is {self.state}")
        await self._client._send({"type": "mark", "context_id": self.id, "name": name})

    async def cancel(self) -> None:
        """Barge-in: the server stops at once; iteration ends with a ``CancelledEvent``.

        A no-op once the context finished. A handle that never reached the server ends locally
        (iteration stops without events).
        """
        if self.finished or self.state == "cancelling":
            return
        if self.state == "new":
            self.state = "cancelled"
            self._queue.put_nowait(_Raise(StopAsyncIteration(), terminal=True))
            return
        self.state = "cancelling"
        await self._client._send({"type": "context.cancel", "context_id": self.id})

    async def _ensure_open(self) -> None:
        if self.state == "new":
            await self.open()

    def _check_writable(self, what: str) -> None:
        if self.state == "failed" and isinstance(self.failure, ClientError):
            raise self.failure  # the cause is more useful than "it is failed"
        if self.state not in ("new", "open"):
            raise ContextStateError(
                f"cannot {what} context {self.id!r}: it is {self.state}; use a new context"
            )

    # ---- consumer -------------------------------------------------------------------------

    def __aiter__(self) -> ContextHandle:
        return self

    async def __anext__(self) -> ContextItem:
        if self._exhausted:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, _Raise):
            if item.terminal:
                self._exhausted = True
            raise item.exc
        if isinstance(item, (DoneEvent, CancelledEvent)):
            self._exhausted = True
        return item

    async def audio(self) -> AsyncIterator[AudioChunk]:
        """Only the audio chunks (events are skipped; errors still raise)."""
        async for item in self:
            if isinstance(item, AudioChunk):
                yield item

    async def collect(self, *, timeout: float | None = None) -> ContextResult:
        """Consume the context to its end and return all of its audio and events."""
        if self._iterating:
            raise ContextStateError(f"context {self.id!r} already has a consumer")
        self._iterating = True
        chunks: list[AudioChunk] = []
        events: list[MarkEvent | FlushedEvent | ErrorEvent] = []

        async def drain() -> None:
            async for item in self:
                if isinstance(item, AudioChunk):
                    chunks.append(item)
                elif isinstance(item, (MarkEvent, FlushedEvent, ErrorEvent)):
                    events.append(item)

        try:
            await asyncio.wait_for(drain(), timeout)
        finally:
            self._iterating = False
        audio = np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32)
        return ContextResult(
            context_id=self.id, audio=audio.astype(np.float32, copy=False),
            sample_rate=self.sample_rate or self._client.session.sample_rate, chunks=chunks, events=events,
            done=self.done, cancelled=self.cancelled, first_text_at=self.first_text_at,
            first_audio_at=self.first_audio_at, violations=list(self.violations),
        )  # fmt: skip

    async def __aenter__(self) -> ContextHandle:
        if self._overrides:
            await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """On an exception the context is cancelled (best effort), so the server stops working."""
        if exc_type is not None and not self.finished:
            with contextlib.suppress(ClientError):
                await self.cancel()

    # ---- reader side (called by TTSClient) --------------------------------------------------

    def _violation(self, message: str) -> None:
        text = f"context {self.id!r}: {message}"
        self.violations.append(text)
        self._client._record_violation(text, self)

    def _deliver(self, item: ContextItem) -> None:
        self._queue.put_nowait(item)

    def _fail(self, exc: BaseException) -> None:
        """End the context with an exception (fatal error, lost connection)."""
        if self.finished:
            return
        self.state = "failed"
        self.failure = exc
        if isinstance(exc, ServerError):
            self.error = exc
        if not self._started.done():
            self._started.set_exception(exc)
            self._started.exception()  # mark retrieved: nobody may be waiting on open()
        self._queue.put_nowait(_Raise(exc, terminal=True))

    def _on_started(self, stream: int, encoding: str, sample_rate: int) -> None:
        if self.started:
            self._violation("a second context.started")
        self.stream, self.encoding, self.sample_rate = stream, encoding, sample_rate
        if self.state == "new":
            self.state = "open"  # the server opened it (a raw text.append sent by someone else)
        if not self._started.done():
            self._started.set_result(None)

    def _check_audio_ms(self, event: str, audio_ms: float) -> None:
        if self.sample_rate and abs(audio_ms - self.audio_ms) > AUDIO_MS_TOLERANCE:
            self._violation(f"{event} reports audio_ms={audio_ms} but {self.audio_ms:.3f} ms were received")

    def _on_audio(self, header: AudioHeader, payload: bytes, now: float) -> None:
        assert self.encoding is not None and self.sample_rate is not None
        if self._terminal_seen:
            self._violation(f"audio frame seq={header.seq} after the context's terminal event")
            return  # never hand audio of a finished context to the consumer
        if self._saw_last:
            self._violation(f"audio frame seq={header.seq} after the frame flagged last")
        width = BYTES_PER_SAMPLE[self.encoding]
        if len(payload) % width:
            self._violation(
                f"payload of {len(payload)} bytes is not a whole number of {self.encoding} samples"
            )
            payload = payload[: len(payload) - len(payload) % width]
        if header.seq != self._next_seq:
            self._violation(f"seq {header.seq} where {self._next_seq} was expected")
        if header.sample_offset != self._next_offset:
            self._violation(
                f"sample_offset {header.sample_offset} at seq {header.seq} where {self._next_offset} was expected"
            )
        if header.first != (header.seq == 0):
            self._violation(f"first-chunk flag is {header.first} on seq {header.seq}")
        samples = decode_pcm(payload, self.encoding)
        self._next_seq = header.seq + 1
        self._next_offset = header.sample_offset + len(samples)
        self._saw_last = self._saw_last or header.last
        if self.first_audio_at is None and len(samples):
            self.first_audio_at = now
        self.samples_received += len(samples)
        self.chunks_received += 1
        self._deliver(
            AudioChunk(
                context_id=self.id, stream=header.stream, seq=header.seq, sample_offset=header.sample_offset,
                flags=header.flags, samples=samples, sample_rate=self.sample_rate, encoding=self.encoding,
                received_at=now,
            )
        )  # fmt: skip

    def _on_event(self, obj: Mapping[str, Any], now: float) -> None:
        kind = obj.get("type")
        if self._terminal_seen and kind != "error":
            self._violation(f"{kind} after the context's terminal event")
            return
        audio_ms = float(obj.get("audio_ms") or 0.0)
        if kind == "mark":
            self._check_audio_ms("mark", audio_ms)
            self._deliver(MarkEvent(self.id, str(obj.get("name", "")), audio_ms, now))
        elif kind == "context.flushed":
            self._check_audio_ms("context.flushed", audio_ms)
            self._deliver(FlushedEvent(self.id, audio_ms, now))
        elif kind == "context.done":
            self._terminal_seen = True
            self._check_audio_ms("context.done", audio_ms)
            if self.chunks_received and not self._saw_last:
                self._violation("context.done without a frame flagged last")
            metrics = Metrics.from_dict(obj.get("metrics") or {})
            self.done = DoneEvent(self.id, audio_ms, metrics, now)
            self.state = "done"
            self._deliver(self.done)
        elif kind == "context.cancelled":
            self._terminal_seen = True
            self._check_audio_ms("context.cancelled", audio_ms)
            self.cancelled = CancelledEvent(self.id, audio_ms, now)
            self.state = "cancelled"
            self._deliver(self.cancelled)

    def _on_error(self, event: ErrorEvent) -> None:
        # A context that was never started does not exist on the server: the error ends it.
        if event.fatal or not self.started:
            self._terminal_seen = True
            self._fail(event.to_exception())
        else:
            self._deliver(event)


# --------------------------------------------------------------------------------------------
# The session


class _Connector:
    """``TTSClient.connect(...)``: awaitable (returns the client) and an async context manager."""

    def __init__(self, factory: Callable[[], Awaitable[TTSClient]]) -> None:
        self._factory = factory
        self._client: TTSClient | None = None

    def __await__(self) -> Generator[Any, None, TTSClient]:
        return self._factory().__await__()

    async def __aenter__(self) -> TTSClient:
        self._client = await self._factory()
        return self._client

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._client is not None
        await self._client.close(graceful=exc_type is None)


class TTSClient:
    """One WebSocket session of the native protocol. Create it with :meth:`connect`."""

    def __init__(self, ws: ClientConnection, session: SessionInfo, *, strict: bool = True) -> None:
        self._ws = ws
        self.session = session
        self.strict = strict
        self.contexts: dict[str, ContextHandle] = {}
        self.errors: list[ErrorEvent] = []  # session-level errors not tied to a context or request
        self.violations: list[str] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self._streams: dict[int, ContextHandle] = {}
        self._pending: dict[str | int, asyncio.Future[Any]] = {}  # event_id / ping id -> waiter
        self._ids = itertools.count(1)
        self._fatal: ServerError | None = None
        self._closed = False
        self._reader = asyncio.create_task(self._read_loop(), name=f"tts-client-{session.session_id}")

    @classmethod
    def connect(
        cls,
        url: str,
        api_key: str | None = None,
        *,
        strict: bool = True,
        open_timeout: float = 10.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        **session_config: Any,
    ) -> _Connector:
        """Connect, read ``session.created`` and apply ``session_config`` (``session.update``).

        ``session_config`` takes the flat names of :func:`config_message` (``voice``,
        ``language``, ``encoding``, ``sample_rate``, ``chunk_schedule``, ``temperature``,
        ``seed``, ``idle_flush_ms``...). A refused configuration raises :class:`ServerError`
        here instead of failing the first context later. Use as ``async with`` (closes with
        ``session.close`` on a normal exit, drops the socket, which cancels everything, on an
        exception) or ``await`` it and call :meth:`close`.
        """
        update = config_message(**session_config)  # TypeError for typos before any I/O

        async def factory() -> TTSClient:
            client = await cls._open(
                url, api_key, strict=strict, open_timeout=open_timeout, max_size=max_frame_bytes
            )
            if update:
                try:
                    await client._update(update)
                except BaseException:
                    await client.close(graceful=False)
                    raise
            return client

        return _Connector(factory)

    @classmethod
    async def _open(
        cls, url: str, api_key: str | None, *, strict: bool, open_timeout: float, max_size: int
    ) -> TTSClient:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        try:
            ws = await ws_connect(
                url, subprotocols=[Subprotocol(SUBPROTOCOL)], additional_headers=headers, max_size=max_size,
                open_timeout=open_timeout, compression=None,
            )  # fmt: skip
        except websockets.InvalidStatus as e:
            status = e.response.status_code
            if status == 401:
                raise AuthenticationError(f"{url}: the server refused the API key (HTTP 401)", status) from e
            raise ConnectError(f"{url}: handshake refused with HTTP {status}", status) from e
        except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as e:
            raise ConnectError(f"{url}: cannot connect: {e}") from e
        try:
            first = await asyncio.wait_for(ws.recv(), open_timeout)
        except (TimeoutError, websockets.ConnectionClosed) as e:
            await ws.close()
            raise ConnectError(f"{url}: no session.created from the server: {e!r}") from e
        obj = _parse_json(first)
        if obj is None or obj.get("type") != "session.created":
            await ws.close()
            if obj is not None and obj.get("type") == "error":  # e.g. overloaded, model loading
                raise ServerError(str(obj.get("code")), str(obj.get("message")), fatal=bool(obj.get("fatal")))
            raise ProtocolViolation(f"the first message was not session.created: {str(first)[:200]!r}")
        return cls(ws, SessionInfo.from_dict(obj), strict=strict)

    async def __aenter__(self) -> TTSClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close(graceful=exc_type is None)

    # ---- requests -------------------------------------------------------------------------

    def context(self, context_id: str | None = None, **overrides: Any) -> ContextHandle:
        """A new context handle; ``overrides`` (same names as ``connect``) apply to it only.

        Nothing is sent until :meth:`ContextHandle.open` or the first ``append``.
        """
        if context_id is None:
            context_id = f"ctx-{next(self._ids)}"
            while context_id in self.contexts:
                context_id = f"ctx-{next(self._ids)}"
        elif context_id in self.contexts:
            raise ContextStateError(f"context id {context_id!r} was already used in this session")
        handle = ContextHandle(self, context_id, config_message(**overrides))
        self.contexts[context_id] = handle
        if self._fatal is not None:
            handle._fail(self._fatal)
        return handle

    async def update(self, **config: Any) -> None:
        """``session.update``: new defaults for contexts created afterwards. Raises
        :class:`ServerError` if refused (the server answers in order, so a refusal arrives
        before the pong this call waits for)."""
        await self._update(config_message(**config))

    async def _update(self, fields: dict[str, Any]) -> None:
        event_id = f"u{next(self._ids)}"
        waiter = self._waiter(event_id)
        try:
            await self._send({"type": "session.update", "event_id": event_id, **fields})
            await self.ping()
            if waiter.done():
                waiter.result()  # raises the ServerError
        finally:
            self._pending.pop(event_id, None)
            waiter.cancel()

    async def ping(self, *, timeout: float | None = 30.0) -> float:
        """Round trip of a ``ping``/``pong`` in seconds (also proves earlier messages were handled)."""
        pid = f"p{next(self._ids)}"
        waiter = self._waiter(pid)
        t0 = time.perf_counter()
        try:
            await self._send({"type": "ping", "id": pid})
            await asyncio.wait_for(waiter, timeout)
        finally:
            self._pending.pop(pid, None)
        return time.perf_counter() - t0

    async def cancel_all(self) -> None:
        """``context.cancel`` without an id: every open context of the session."""
        for handle in self.contexts.values():
            if handle.state not in (*_TERMINAL, "new"):
                handle.state = "cancelling"
        await self._send({"type": "context.cancel"})

    async def close(self, *, graceful: bool = True, timeout: float = 60.0) -> None:
        """``session.close``: the server finishes every open context, then closes (1000).

        ``graceful=False`` just drops the connection, which the server treats as a cancel of
        everything. Handles keep what they already received and can still be iterated.
        """
        if self._closed:
            return
        self._closed = True
        if graceful and self._fatal is None:
            with contextlib.suppress(ClientError):
                await self._send({"type": "session.close"})
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), timeout)
            except TimeoutError:
                log.warning("server did not close the session within %.0f s; dropping it", timeout)
        await self._ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    @property
    def closed(self) -> bool:
        return self._closed or self._reader.done()

    # ---- internals ------------------------------------------------------------------------

    def _waiter(self, key: str | int) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        return fut

    async def _send(self, message: dict[str, Any]) -> None:
        if self._fatal is not None:
            raise self._fatal
        try:
            await self._ws.send(json.dumps(message, separators=(",", ":"), ensure_ascii=False))
        except websockets.ConnectionClosed as e:
            raise ConnectionLost(f"the connection is closed ({e})", self.close_code, self.close_reason) from e

    def _record_violation(self, text: str, handle: ContextHandle | None) -> None:
        self.violations.append(text)
        log.warning("protocol violation: %s", text)
        if self.strict and handle is not None and not handle._exhausted:
            handle._queue.put_nowait(_Raise(ProtocolViolation(text), terminal=False))

    async def _read_loop(self) -> None:
        try:
            async for message in self._ws:
                now = time.perf_counter()
                if isinstance(message, bytes):
                    self._on_binary(message, now)
                else:
                    self._on_text(message, now)
        except websockets.ConnectionClosedError:
            pass  # reported below from close_code
        except Exception:  # a bug here must not leave consumers waiting forever
            log.exception("tts client reader failed")
        finally:
            self._on_closed()

    def _on_closed(self) -> None:
        self.close_code = self._ws.close_code
        self.close_reason = self._ws.close_reason or ""
        exc: ClientError = self._fatal or ConnectionLost(
            f"connection closed (code {self.close_code}{', ' + self.close_reason if self.close_reason else ''})",
            self.close_code,
            self.close_reason,
        )
        for handle in self.contexts.values():
            if not handle.finished and not handle._exhausted:
                handle._fail(exc)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: a waiter may already have given up

    def _on_binary(self, data: bytes, now: float) -> None:
        try:
            header = AudioHeader.unpack(data)
        except FrameError as e:
            self._record_violation(str(e), None)
            return
        if header.kind != AUDIO_KIND:
            return  # a frame kind from a later protocol version
        handle = self._streams.get(header.stream)
        if handle is None:
            self._record_violation(
                f"audio for stream {header.stream}, which no context.started announced", None
            )
            return
        handle._on_audio(header, data[16:], now)

    def _on_text(self, text: str, now: float) -> None:
        obj = _parse_json(text)
        if obj is None:
            self._record_violation(f"a text frame that is not a JSON object: {text[:200]!r}", None)
            return
        kind = obj.get("type")
        cid = obj.get("context_id")
        if kind == "pong":
            pid = obj.get("id")
            fut = self._pending.get(pid) if isinstance(pid, (str, int)) else None
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if kind == "error":
            self._on_error(obj, now)
            return
        if not isinstance(cid, str):
            return  # an event type this client does not know: ignored (forward compatibility)
        handle = self.contexts.get(cid)
        if handle is None:  # the server opened a context this client did not ask for
            self._record_violation(f"{kind} for unknown context {cid!r}", None)
            return
        if kind == "context.started":
            stream = int(obj.get("stream", -1))
            old = self._streams.get(stream)
            if old is not None and not old._terminal_seen:
                handle._violation(f"stream {stream} is still used by context {old.id!r}")
            self._streams[stream] = handle
            handle._on_started(stream, str(obj.get("encoding")), int(obj.get("sample_rate", 0)))
        else:
            handle._on_event(obj, now)

    def _on_error(self, obj: Mapping[str, Any], now: float) -> None:
        cid = obj.get("context_id")
        event = ErrorEvent(
            code=str(obj.get("code", "")), message=str(obj.get("message", "")),
            context_id=cid if isinstance(cid, str) else None, event_id=obj.get("event_id"),
            fatal=bool(obj.get("fatal")), received_at=now,
        )  # fmt: skip
        waiter = self._pending.get(event.event_id) if event.event_id is not None else None
        if waiter is not None and not waiter.done():
            waiter.set_exception(event.to_exception())
        if event.fatal:
            self._fatal = event.to_exception()
            for handle in self.contexts.values():
                handle._fail(self._fatal)
            return
        target = self.contexts.get(event.context_id) if event.context_id else None
        if target is not None:
            target._on_error(event)
        elif waiter is None:
            self.errors.append(event)
            log.warning("server error: %s: %s", event.code, event.message)


def _parse_json(data: str | bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(data)
    except (ValueError, TypeError):
        return None
    return obj if isinstance(obj, dict) else None
