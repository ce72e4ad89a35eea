"""One WebSocket session of the native protocol: contexts, ordering, cancel, marks, metrics.

The session never touches the model: each context is one engine `Stream`; its audio arrives
through the stream's async iterator. Everything the session sends goes through one bounded
outgoing queue drained by a single writer task, which is what makes the ordering rules hold:

- per context, events are queued in audio order by the context's pump task, so `mark`,
  `context.flushed` and `context.done` follow exactly the audio queued before them;
- after `context.cancel` the context is flagged; the writer drops every audio frame of a
  flagged context that is still queued, then sends `context.cancelled`, so no audio frame of
  that stream follows it. The engine delivers nothing after `Stream.cancel()` returns;
- `audio_ms` in events is the audio actually handed to the socket before the event.

A slow client makes the writer wait on the socket; the bounded queue then blocks the pumps,
the engine's per-stream queues fill and those streams sit out steps: backpressure reaches the
model without affecting other sessions. A client that stops reading altogether would hold its
streams forever that way, so every send has a deadline (`write_timeout`): a send that cannot
complete in time ends the session (close 4013) and cancels its streams. Nothing else buffers
output: the queue is the session's only send buffer, and the transport's own buffer is bounded
by its flow control (a send waits while it is full).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from engine import (
    AudioChunk,
    Engine,
    EngineError,
    InvalidTextError,
    Marker,
    OverloadedError,
    PromptError,
    SamplingError,
    State,
    Stream,
    StreamError,
    VoiceError,
)
from engine import SamplingParams as EngineSampling
from realtime import protocol as P
from realtime.audio import AudioEncoder

log = logging.getLogger(__name__)

SendText = Callable[[str], Awaitable[None]]
SendBytes = Callable[[bytes], Awaitable[None]]

MAX_CONSECUTIVE_ERRORS = 64  # a client this far off the protocol is closed (4000)
# Errors that mean the client is not speaking the protocol at all (as opposed to refusals of
# well-formed requests, such as too_many_contexts, which a correct client can trigger).
GARBAGE = frozenset(
    {
        P.ErrorCode.INVALID_JSON,
        P.ErrorCode.INVALID_MESSAGE,
        P.ErrorCode.UNKNOWN_TYPE,
        P.ErrorCode.MESSAGE_TOO_LARGE,
    }
)
FINISHED_IDS_KEPT = 4096  # ids of finished contexts remembered to refuse reuse
DEFAULT_WRITE_TIMEOUT = P.DEFAULT_WRITE_TIMEOUT  # seconds one send may take before the session ends


class ClientGone(Exception):
    """Raised by the send callbacks when the socket is already closed (the client left): the
    writer stops quietly, as for a normal disconnect."""


@dataclass
class Context:
    id: str
    stream_no: int
    stream: Stream
    encoder: AudioEncoder
    config: P.SessionConfig
    text_bytes: int = 0
    seq: int = 0
    sent_samples: int = 0  # at the output rate, handed to the socket
    state: Literal["open", "ending", "cancelled", "done", "failed"] = "open"
    pump: asyncio.Task[None] | None = None

    @property
    def sent_ms(self) -> float:
        return P.samples_to_ms(self.sent_samples, self.encoder.sample_rate)

    @property
    def finished(self) -> bool:
        return self.state in ("cancelled", "done", "failed")


@dataclass
class _Out:
    """One item of the outgoing queue; JSON events are rendered by the writer at send time so
    their `audio_ms` counts exactly the audio sent before them."""

    kind: Literal["json", "audio", "mark", "flushed", "done", "cancelled", "fatal"]
    ctx: Context | None = None
    payload: bytes = b""
    samples: int = 0
    text: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Session:
    """Drive one client connection. `run()` returns when the session is over."""

    def __init__(
        self,
        engine: Engine,
        send_text: SendText,
        send_bytes: SendBytes,
        *,
        model_name: str,
        limits: P.Limits = P.DEFAULT_LIMITS,
        defaults: P.SessionConfig | None = None,
        voices: list[str] | None = None,
        resolve_alias: Callable[[str], str] | None = None,
        out_queue_size: int = 256,
        out_queue_bytes: int = 1024 * 1024,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        on_event: Callable[[str, Any], None] | None = None,
    ):
        if not write_timeout > 0:
            raise ValueError(f"write_timeout must be positive, got {write_timeout!r}")
        self.engine = engine
        self.id = "s_" + secrets.token_hex(8)
        self.limits = limits
        self._send_text, self._send_bytes = send_text, send_bytes
        self._model_name = model_name
        voice = engine.default_voice()
        self.config = defaults or P.SessionConfig(voice=voice)
        if self.config.voice is None and voice is not None:
            self.config = P.SessionConfig(**{**self.config.__dict__, "voice": voice})
        self.voices = voices if voices is not None else engine.voices
        self.languages = [lang for lang in engine.languages if lang != "auto"]
        self._alias = resolve_alias or (lambda name: name)
        self.contexts: dict[str, Context] = {}
        self._finished_ids: dict[str, None] = {}
        self._stream_numbers = itertools.count()
        # The session's send buffer, bounded in items and in audio bytes (a client may ask for
        # 64-frame chunks of 48 kHz float: 1 MB each).
        self._out: asyncio.Queue[_Out | None] = asyncio.Queue(maxsize=out_queue_size)
        self._out_bytes, self._max_out_bytes = 0, out_queue_bytes
        self._out_room = asyncio.Event()
        self._out_room.set()
        self._errors_in_a_row = 0
        self._closing = False
        self.write_timeout = write_timeout
        self._writer_gone = False  # the writer stopped: nothing queued will be sent any more
        # Why the writer stopped early: the client left, or it stopped reading (write timeout).
        self.ended_by: Literal["client_gone", "write_timeout"] | None = None
        self.close_code: int | None = None
        self._on_event = on_event or (lambda name, value: None)

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> asyncio.Task[None]:
        """Send session.created and start the writer."""
        writer = asyncio.create_task(self._writer(), name=f"{self.id}-writer")
        created = P.SessionCreated(
            session_id=self.id, model=self._model_name, config=self.config, limits=self.limits,
            voices=tuple(self.voices), languages=tuple(self.languages), engine=_engine_info(self.engine),
        )  # fmt: skip
        await self._put(_Out("json", text=created.to_json()))
        return writer

    async def handle(self, data: str | bytes) -> bool:
        """Handle one client frame. Returns False once the session should close."""
        try:
            msg = P.parse_client_message(data, limits=self.limits, voices=None, languages=None)
            await self._dispatch(msg)
            self._errors_in_a_row = 0
        except P.ProtocolError as e:
            self._on_event("error", e.code.value)
            if e.code in GARBAGE:
                self._errors_in_a_row += 1
            if self._errors_in_a_row > MAX_CONSECUTIVE_ERRORS:
                await self.fatal(P.ErrorCode.INVALID_MESSAGE, "too many invalid messages in a row", 4000)
                return False
            await self._put(_Out("json", text=e.to_event().to_json()))
        return not self._closing

    async def disconnect(self) -> None:
        """The socket is gone: cancel everything at once (PROTOCOL.md: a drop cancels).
        Idempotent; every engine stream of the session is released when it returns."""
        self._closing = True
        for ctx in list(self.contexts.values()):
            ctx.stream.close()
            ctx.state = "cancelled"
        for ctx in list(self.contexts.values()):
            if ctx.pump is not None:
                ctx.pump.cancel()
        await asyncio.gather(*(c.pump for c in self.contexts.values() if c.pump), return_exceptions=True)
        self.contexts.clear()

    async def finish(self) -> None:
        """Close the writer after everything queued was sent."""
        await self._put(None)

    async def fatal(self, code: P.ErrorCode, message: str, close: int) -> None:
        self._closing = True
        self.close_code = close
        event = P.ErrorEvent(code=code, message=message, fatal=True)
        await self._put(_Out("fatal", text=event.to_json()))

    # ---- dispatch -------------------------------------------------------------------------

    async def _dispatch(self, msg: P.ClientMessage) -> None:
        if isinstance(msg, P.SessionUpdate):
            new = self.config.merged(msg.config)
            self._check_config(new, msg.event_id, None)
            self.config = new
        elif isinstance(msg, P.ContextCreate):
            if msg.context_id in self.contexts or msg.context_id in self._finished_ids:
                raise P.ProtocolError(
                    P.ErrorCode.CONTEXT_CLOSED, f"context {msg.context_id!r} already exists; use a new id",
                    msg.event_id, msg.context_id,
                )  # fmt: skip
            await self._open(msg.context_id, self.config.merged(msg.config), msg.event_id)
        elif isinstance(msg, P.TextAppend):
            ctx = self.contexts.get(msg.context_id)
            if ctx is None:
                ctx = await self._open(msg.context_id, self.config, msg.event_id)
            self._check_writable(ctx, msg.event_id)
            text_bytes = P.check_text_budget(ctx.text_bytes, msg, self.limits)
            try:
                ctx.stream.push_text(msg.text)
            except InvalidTextError:  # the parser refuses such text first; this is a backstop
                raise P.ProtocolError(
                    P.ErrorCode.INVALID_MESSAGE, "text is not valid Unicode", msg.event_id, ctx.id
                ) from None
            ctx.text_bytes = text_bytes
        elif isinstance(msg, P.TextFlush):
            ctx = self._existing(msg.context_id, msg.event_id)
            self._check_writable(ctx, msg.event_id)
            ctx.stream.flush()
        elif isinstance(msg, P.TextEnd):
            ctx = self._existing(msg.context_id, msg.event_id)
            self._check_writable(ctx, msg.event_id)
            ctx.state = "ending"
            ctx.stream.end()
        elif isinstance(msg, P.ContextCancel):
            targets = list(self.contexts.values()) if msg.context_id is None else [self._cancel_target(msg)]
            for ctx in targets:
                if ctx is not None:
                    await self._cancel(ctx)
        elif isinstance(msg, P.Mark):
            ctx = self._existing(msg.context_id, msg.event_id)
            ctx.stream.mark(msg.name)
        elif isinstance(msg, P.Ping):
            await self._put(_Out("json", text=P.Pong(id=msg.id).to_json()))
        elif isinstance(msg, P.SessionClose):
            self._closing = True
            for ctx in list(self.contexts.values()):
                if ctx.state == "open":
                    ctx.state = "ending"
                    ctx.stream.end()
            await asyncio.gather(
                *(c.pump for c in list(self.contexts.values()) if c.pump), return_exceptions=True
            )
            if self.close_code is None:  # the writer may have ended the session meanwhile
                self.close_code = P.CLOSE_NORMAL

    def _existing(self, context_id: str, event_id: P.EventId) -> Context:
        ctx = self.contexts.get(context_id)
        if ctx is not None:
            return ctx
        if context_id in self._finished_ids:
            raise P.ProtocolError(
                P.ErrorCode.CONTEXT_CLOSED, f"context {context_id!r} has finished", event_id, context_id
            )
        raise P.ProtocolError(
            P.ErrorCode.INVALID_MESSAGE, f"no open context {context_id!r}", event_id, context_id
        )

    def _cancel_target(self, msg: P.ContextCancel) -> Context | None:
        assert msg.context_id is not None
        ctx = self.contexts.get(msg.context_id)
        if ctx is None and msg.context_id not in self._finished_ids:
            raise P.ProtocolError(
                P.ErrorCode.INVALID_MESSAGE,
                f"no open context {msg.context_id!r}",
                msg.event_id,
                msg.context_id,
            )
        return ctx  # cancelling a finished context is a no-op (cancel is idempotent)

    def _check_writable(self, ctx: Context, event_id: P.EventId) -> None:
        if ctx.state != "open":
            what = "was cancelled" if ctx.state == "cancelled" else "has ended"
            raise P.ProtocolError(
                P.ErrorCode.CONTEXT_CLOSED, f"context {ctx.id!r} {what}; a new turn needs a new context_id",
                event_id, ctx.id,
            )  # fmt: skip

    def _check_config(self, cfg: P.SessionConfig, event_id: P.EventId, context_id: str | None) -> None:
        """Validate what only the engine knows (voices, languages) before a context needs it."""
        try:
            if cfg.voice is not None:
                self.engine.resolve_voice(self._alias(cfg.voice))
            else:
                self.engine.resolve_voice(None)
        except VoiceError as e:
            raise P.ProtocolError(P.ErrorCode.INVALID_VOICE, str(e), event_id, context_id) from None
        lang = (cfg.language or "auto").strip().lower()
        lang = P.LANGUAGE_ALIASES.get(lang, lang)
        if lang != "auto" and lang not in self.languages:
            raise P.ProtocolError(
                P.ErrorCode.INVALID_LANGUAGE,
                f"unknown language {cfg.language!r}; this model offers: auto, {', '.join(self.languages)}",
                event_id, context_id,
            )  # fmt: skip

    async def _open(self, context_id: str, cfg: P.SessionConfig, event_id: P.EventId) -> Context:
        if context_id in self._finished_ids:
            raise P.ProtocolError(
                P.ErrorCode.CONTEXT_CLOSED,
                f"context {context_id!r} has finished; use a new id",
                event_id,
                context_id,
            )
        open_now = sum(1 for c in self.contexts.values() if not c.finished)
        if open_now >= self.limits.max_contexts:
            raise P.ProtocolError(
                P.ErrorCode.TOO_MANY_CONTEXTS,
                f"{open_now} contexts are open (limit {self.limits.max_contexts}); end or cancel one first",
                event_id, context_id,
            )  # fmt: skip
        self._check_config(cfg, event_id, context_id)
        lang = (cfg.language or "auto").strip().lower()
        out = cfg.output
        encoder = AudioEncoder(out.encoding, out.sample_rate, input_rate=self.engine.sample_rate)
        s = cfg.sampling
        try:
            sampling = EngineSampling.from_generation_config(self.engine.checkpoint.generation).with_overrides(
                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                seed=s.seed,
            )  # fmt: skip
            stream = self.engine.open_stream(
                voice=self._alias(cfg.voice) if cfg.voice else None,
                language=P.LANGUAGE_ALIASES.get(lang, lang),
                instructions=cfg.instructions,
                sampling=sampling,
                chunk_schedule=cfg.chunk_schedule,
                idle_flush_ms=cfg.text.idle_flush_ms or None,
                owner=self.id,  # the engine shares its rows fairly between sessions
            )
        except SamplingError as e:
            raise P.ProtocolError(P.ErrorCode.INVALID_SAMPLING, str(e), event_id, context_id) from None
        except VoiceError as e:
            raise P.ProtocolError(P.ErrorCode.INVALID_VOICE, str(e), event_id, context_id) from None
        except PromptError as e:
            raise P.ProtocolError(P.ErrorCode.INVALID_LANGUAGE, str(e), event_id, context_id) from None
        except OverloadedError as e:
            raise P.ProtocolError(P.ErrorCode.OVERLOADED, str(e), event_id, context_id) from None
        except EngineError as e:
            raise P.ProtocolError(P.ErrorCode.INVALID_MESSAGE, str(e), event_id, context_id) from None
        # Registered at once: from here on disconnect() releases the stream on every path.
        ctx = Context(
            id=context_id, stream_no=next(self._stream_numbers) % 65536, stream=stream, encoder=encoder,
            config=cfg,
        )  # fmt: skip
        self.contexts[context_id] = ctx
        started = P.ContextStarted(
            context_id=context_id, stream=ctx.stream_no, encoding=out.encoding, sample_rate=out.sample_rate
        )
        await self._put(_Out("json", text=started.to_json()))
        ctx.pump = asyncio.create_task(self._pump(ctx), name=f"{self.id}-{context_id}")
        self._on_event("context", 1)
        return ctx

    async def _cancel(self, ctx: Context) -> None:
        if ctx.finished:
            return
        ctx.state = "cancelled"
        ctx.stream.cancel()  # no chunk of this stream is delivered after this returns
        ctx.encoder.reset()
        await self._put(_Out("cancelled", ctx=ctx))

    # ---- audio path -----------------------------------------------------------------------

    async def _pump(self, ctx: Context) -> None:
        """Turn the context's engine stream into queued frames and events, in audio order."""
        try:
            async for item in ctx.stream:
                if ctx.state == "cancelled":
                    break
                if isinstance(item, Marker):
                    await self._put(_Out("mark", ctx=ctx, text=str(item.tag)))
                    continue
                await self._queue_chunk(ctx, item)
        except StreamError as e:
            if ctx.state != "cancelled":
                ctx.state = "failed"
                log.error("context %s of %s failed: %s", ctx.id, self.id, e)
                event = P.ErrorEvent(
                    code=P.ErrorCode.INTERNAL, message="generation failed", context_id=ctx.id, fatal=True
                )
                self.close_code = P.CLOSE_INTERNAL
                self._closing = True
                await self._put(_Out("fatal", ctx=ctx, text=event.to_json()))
            return
        if ctx.state != "cancelled" and ctx.stream.state is State.DONE:
            await self._put(_Out("done", ctx=ctx))

    async def _queue_chunk(self, ctx: Context, chunk: AudioChunk) -> None:
        closing = chunk.last_in_utterance or chunk.last
        offset = ctx.encoder.sample_offset
        payload = ctx.encoder.encode(chunk.samples, last=closing)
        n = len(payload) // ctx.encoder.bytes_per_sample
        if payload or chunk.last or chunk.last_in_utterance:  # the flags must reach the client
            flags = dict(first=ctx.seq == 0, last=chunk.last, utterance_end=chunk.last_in_utterance)
            frame = P.pack_audio_frame(ctx.stream_no, ctx.seq, offset, payload, **flags)
            ctx.seq += 1
            await self._put(_Out("audio", ctx=ctx, payload=frame, samples=n))
        if chunk.last_in_utterance and not chunk.last:
            await self._put(_Out("flushed", ctx=ctx))

    async def _put(self, item: _Out | None) -> None:
        if item is not None and item.payload:
            while self._out_bytes >= self._max_out_bytes and not self._writer_gone:
                self._out_room.clear()
                await self._out_room.wait()
            if not self._writer_gone:
                self._out_bytes += len(item.payload)
        if self._writer_gone:
            return  # nobody will send it: the session is ending
        await self._out.put(item)

    async def _get(self) -> _Out | None:
        item = await self._out.get()
        if item is not None and item.payload:
            self._out_bytes -= len(item.payload)
            if self._out_bytes < self._max_out_bytes:
                self._out_room.set()
        return item

    async def _send(self, send: Callable[[Any], Awaitable[None]], data: str | bytes) -> None:
        """One send with the write deadline (asyncio.TimeoutError past it)."""
        await asyncio.wait_for(send(data), self.write_timeout)

    async def _writer(self) -> None:
        """The only coroutine that sends. Returns when the session is over, the client left,
        or a send missed its deadline (then `ended_by` says which)."""
        try:
            await self._write_queued()
        except ClientGone:
            self.ended_by = "client_gone"
            self._stop_streams()
        except asyncio.TimeoutError:
            self.ended_by = "write_timeout"
            self.close_code = P.CLOSE_WRITE_TIMEOUT
            self._stop_streams()
        finally:
            # Unblock every producer waiting for room in the queue; later puts are dropped.
            self._writer_gone = True
            self._out_room.set()
            while not self._out.empty():
                self._out.get_nowait()

    async def _write_queued(self) -> None:
        """Render and send queued items in order."""
        while True:
            item = await self._get()
            if item is None:
                return
            ctx = item.ctx
            if item.kind == "audio":
                assert ctx is not None
                if ctx.state == "cancelled":
                    continue  # dropped: the client asked for silence
                await self._send(self._send_bytes, item.payload)
                ctx.sent_samples += item.samples
                self._on_event("audio_bytes", len(item.payload))
                continue
            if ctx is not None and ctx.state == "cancelled" and item.kind in ("mark", "flushed", "done"):
                continue
            if item.kind == "json" or item.kind == "fatal":
                await self._send(self._send_text, item.text)
            elif item.kind == "mark":
                assert ctx is not None
                mark = P.MarkEvent(context_id=ctx.id, name=item.text, audio_ms=ctx.sent_ms)
                await self._send(self._send_text, mark.to_json())
            elif item.kind == "flushed":
                assert ctx is not None
                flushed = P.ContextFlushed(context_id=ctx.id, audio_ms=ctx.sent_ms)
                await self._send(self._send_text, flushed.to_json())
            elif item.kind == "done":
                assert ctx is not None
                ctx.state = "done"
                m = ctx.stream.metrics
                metrics = P.ContextMetrics(
                    first_text_to_first_audio_ms=m.first_text_to_first_audio_ms, audio_ms=ctx.sent_ms,
                    generate_ms=m.generate_ms, frames=m.frames, stall_ms=m.stall_ms, utterances=m.utterances,
                    truncated=m.truncated,
                )  # fmt: skip
                done = P.ContextDone(context_id=ctx.id, audio_ms=ctx.sent_ms, metrics=metrics)
                await self._send(self._send_text, done.to_json())
                self._retire(ctx)
                if m.first_text_to_first_audio_ms is not None:
                    self._on_event("first_audio_ms", m.first_text_to_first_audio_ms)
            elif item.kind == "cancelled":
                assert ctx is not None
                cancelled = P.ContextCancelled(context_id=ctx.id, audio_ms=ctx.sent_ms)
                await self._send(self._send_text, cancelled.to_json())
                self._retire(ctx)
            if item.kind == "fatal":
                if ctx is not None:
                    self._retire(ctx)
                return

    def _stop_streams(self) -> None:
        """Nobody can receive this session's audio any more: stop generating it now, not when
        the socket handler gets to disconnect() (it may be waiting for the pumps to finish)."""
        self._closing = True
        for ctx in list(self.contexts.values()):
            ctx.stream.close()

    def _retire(self, ctx: Context) -> None:
        if self.contexts.get(ctx.id) is ctx:
            del self.contexts[ctx.id]
        self._finished_ids[ctx.id] = None
        while len(self._finished_ids) > FINISHED_IDS_KEPT:
            self._finished_ids.pop(next(iter(self._finished_ids)))
        self._on_event("context", -1)

    @property
    def closing(self) -> bool:
        return self._closing

    async def wait_contexts(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.gather(
                *(c.pump for c in list(self.contexts.values()) if c.pump), return_exceptions=True
            )


def _engine_info(engine: Engine) -> dict[str, str]:
    """Backend, device and precision, as session.created and /health report them."""
    backend = engine.backend.describe()
    return {k: str(backend[k]) for k in ("backend", "device", "precision") if k in backend}
