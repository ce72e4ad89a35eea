"""HTTP and WebSocket routes (ASGI, Starlette) around one engine.

The model loads in a background thread when the app starts: `/health` answers 503 while it
loads and 200 once it is ready, so an orchestrator can hold traffic until then. Model work never
runs on the event loop: sessions only talk to engine streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from engine import BackendError, CheckpointError, ConfigError, Engine, EngineError
from realtime import protocol as P
from realtime import voices_api
from realtime.compat import openai as oa
from realtime.session import DEFAULT_WRITE_TIMEOUT, ClientGone, Session

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
# The transport's frame limit. Messages between the protocol's max_message_bytes (256 KiB) and
# this get a precise, non-fatal message_too_large; only larger ones are closed by the transport
# (1009), because reading them would mean buffering them.
WS_MAX_SIZE = 16 * 1024 * 1024
DEFAULT_SOCKET_SEND_BUFFER = 64 * 1024


@dataclass
class ServerSettings:
    model: str = "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice"
    device: str | None = None
    backend: str | None = None  # "torch" | "mlx" | None: the platform's default
    precision: str | None = None  # "fp32" | "bf16" | "int8" | "auto"; None: $TTS_PRECISION or auto
    api_key: str | None = None
    max_sessions: int = 64
    max_streams: int = 8  # streams generating at once (the engine's batch rows)
    voices_db: str | None = None  # SQLite store of cloned voices (Base models)
    limits: P.Limits = field(default_factory=P.Limits)
    # Seconds one send to a WebSocket client may take; past it the session is closed (4013) and
    # its streams are cancelled, so a client that stops reading cannot hold engine rows.
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    # Browser origins allowed to open a WebSocket besides same-origin and localhost pages
    # ("*": any). Requests without an Origin header (non-browser clients) are always allowed.
    allowed_origins: tuple[str, ...] = ()
    ws_max_size: int = WS_MAX_SIZE
    # Kernel send buffer of each WebSocket connection (bytes; None: the OS default). Linux
    # autotunes it up to 4 MiB, ~90 s of 24 kHz audio: a client that stops reading would make
    # the engine generate all of that before any send blocks and the write timeout can notice.
    # 64 KiB still carries 48 kHz float audio over a 300 ms round trip.
    socket_send_buffer: int | None = DEFAULT_SOCKET_SEND_BUFFER
    # Runaway bound of one utterance (Engine): base + per_token x text tokens, in codec frames.
    budget_frames_per_token: float | None = 12.0
    budget_base_frames: int = 50


class EngineHolder:
    """Loads the engine off the event loop; sessions wait for `ready`."""

    def __init__(
        self,
        settings: ServerSettings,
        engine: Engine | None = None,
        factory: Callable[[], Engine] | None = None,
    ):
        self.settings = settings
        self.engine: Engine | None = engine
        self.error: str | None = None
        self._factory = factory or (
            lambda: Engine(
                settings.model,
                backend=settings.backend,
                device=settings.device,
                precision=settings.precision,
                max_streams=settings.max_streams,
                voices_db=settings.voices_db,
                budget_frames_per_token=settings.budget_frames_per_token,
                budget_base_frames=settings.budget_base_frames,
            )
        )
        self._thread: threading.Thread | None = None
        self.loaded_at: float | None = time.time() if engine is not None else None
        self._owns_engine = engine is None  # an engine passed in belongs to the caller
        # Called (from the loading thread) when the model cannot load: `run` stops the server
        # then, rather than keep serving a /health of 500.
        self.on_failure: Callable[[], None] | None = None

    def start(self) -> None:
        if self.engine is None and self._thread is None:
            self._thread = threading.Thread(target=self._load, name="engine-load", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        try:
            self.engine = self._factory()
            self.loaded_at = time.time()
            log.info("model %s loaded", self.settings.model)
        except (BackendError, CheckpointError, ConfigError, EngineError, OSError) as e:
            # A wrong path, a model missing offline, a corrupt checkpoint: one line says it all.
            log.error("cannot load model %s: %s", self.settings.model, " ".join(str(e).split()))
            self.error = f"{type(e).__name__}: {e}"
        except Exception as e:
            log.exception("cannot load model %s", self.settings.model)
            self.error = f"{type(e).__name__}: {e}"
        if self.error is not None and self.on_failure is not None:
            self.on_failure()

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def close(self) -> None:
        if self.engine is not None and self._owns_engine:
            self.engine.close()


class _EngineCollector(Collector):
    """Exports the engine's counters and histograms at scrape time (the engine stays
    independent of Prometheus)."""

    def __init__(self, holder: EngineHolder):
        self.holder = holder

    def collect(self) -> Any:
        engine = self.holder.engine
        if engine is None:
            return
        st = engine.stats
        g = GaugeMetricFamily("tts_streams", "Engine streams by state", labels=["state"])
        g.add_metric(["generating"], engine.active_streams)
        g.add_metric(["queued"], engine.queued_streams)
        yield g
        for name, doc, hist in (
            ("tts_batch_size", "Streams per batched talker step", st.batch_size),
            ("tts_step_seconds", "Wall time of one batched talker step", st.step_seconds),
            ("tts_first_audio_seconds", "First text to first audio, per stream", st.first_audio_seconds),
        ):
            h = HistogramMetricFamily(name, doc)
            h.add_metric([], hist.cumulative(), hist.total)
            yield h
        c = GaugeMetricFamily("tts_streams_total", "Streams by outcome since start", labels=["outcome"])
        for outcome in ("opened", "completed", "failed", "refused"):
            c.add_metric([outcome], getattr(st, outcome))
        yield c
        yield CounterMetricFamily(
            "tts_utterances_truncated",
            "Utterances the engine ended itself because the model never emitted end-of-audio",
            value=st.truncated,
        )  # exported as tts_utterances_truncated_total


def create_app(settings: ServerSettings | None = None, *, engine: Engine | None = None) -> Starlette:
    """The ASGI app. Pass `engine` to serve an already loaded engine (tests, embedding)."""
    settings = settings or ServerSettings()
    holder = EngineHolder(settings, engine)
    registry = CollectorRegistry()
    sessions = Gauge("tts_sessions", "Open WebSocket sessions", registry=registry)
    errors = Counter("tts_protocol_errors", "Protocol errors sent to clients", ["code"], registry=registry)
    session_first_audio = Histogram(
        "tts_context_first_audio_seconds", "First text to first audio per context (as reported in context.done)",
        buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30), registry=registry,
    )  # fmt: skip
    registry.register(_EngineCollector(holder))
    state: dict[str, int] = {"sessions": 0}

    def authorized(headers: Any, query: Any) -> bool:
        if not settings.api_key:
            return True
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else query.get("token", "")
        return bool(token) and hmac.compare_digest(token.encode(), settings.api_key.encode())

    # ---- WebSocket: the native protocol --------------------------------------------------

    async def ws_stream(websocket: WebSocket) -> None:
        origin = websocket.headers.get("origin")
        if not origin_allowed(origin, websocket.headers.get("host"), settings.allowed_origins):
            log.info(
                "refused a WebSocket from origin %r (see --allow-origin)", origin[:200] if origin else origin
            )
            await websocket.send_denial_response(
                JSONResponse(
                    {"error": {"code": "forbidden_origin", "message": "this origin may not open a session"}},
                    403,
                )
            )
            return
        if not authorized(websocket.headers, websocket.query_params):
            await websocket.send_denial_response(
                JSONResponse({"error": {"code": "unauthorized", "message": "missing or wrong API key"}}, 401)
            )
            return
        subprotocols = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=P.SUBPROTOCOL if P.SUBPROTOCOL in subprotocols else None)
        if not holder.ready or state["sessions"] >= settings.max_sessions:
            reason = "the model is still loading" if not holder.ready else "too many sessions"
            event = P.ErrorEvent(
                code=P.ErrorCode.OVERLOADED, message=f"{reason}; try again later", fatal=True
            )
            try:
                await asyncio.wait_for(websocket.send_text(event.to_json()), settings.write_timeout)
            except (asyncio.TimeoutError, *_GONE):
                pass  # the close below still ends the connection
            await close_websocket(websocket, P.close_code(P.ErrorCode.OVERLOADED), settings.write_timeout)
            return
        assert holder.engine is not None
        state["sessions"] += 1
        sessions.inc()

        def on_event(name: str, value: Any) -> None:
            if name == "error":
                errors.labels(code=value).inc()
            elif name == "first_audio_ms":
                session_first_audio.observe(value / 1000.0)

        send_text, send_bytes = _senders(websocket)
        session = Session(
            holder.engine, send_text, send_bytes, model_name=settings.model, limits=settings.limits,
            resolve_alias=oa.alias_resolver(holder.engine), write_timeout=settings.write_timeout,
            on_event=on_event,
        )  # fmt: skip
        try:
            await run_session(websocket, session)
        finally:
            state["sessions"] -= 1
            sessions.dec()

    # ---- HTTP ----------------------------------------------------------------------------

    async def health(request: Request) -> Response:
        if holder.error:
            return JSONResponse({"status": "error", "error": holder.error}, status_code=500)
        if not holder.ready:
            return JSONResponse({"status": "loading", "model": settings.model}, status_code=503)
        assert holder.engine is not None
        return JSONResponse(
            {
                "status": "ok", "model": settings.model, "model_type": holder.engine.model_type,
                "device": str(holder.engine.device), **holder.engine.backend.describe(),
                "sessions": state["sessions"],
                "streams": holder.engine.active_streams, "queued_streams": holder.engine.queued_streams,
            }
        )  # fmt: skip

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    def guard(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def wrapped(request: Request) -> Response:
            if not authorized(request.headers, request.query_params):
                return oa.error(
                    401, "missing or wrong API key (Authorization: Bearer <key>)", code="invalid_api_key"
                )
            if not holder.ready:
                return oa.error(503, "the model is still loading; try again shortly", code="model_loading")
            return await handler(request)

        return wrapped

    async def speech(request: Request) -> Response:
        assert holder.engine is not None
        return await oa.speech(request, holder.engine, settings.model, settings.limits)

    async def voices(request: Request) -> Response:
        assert holder.engine is not None
        return JSONResponse(voices_api.list_voices(holder.engine))

    async def create_voice(request: Request) -> Response:
        assert holder.engine is not None
        return await voices_api.create_voice(request, holder.engine)

    async def delete_voice(request: Request) -> Response:
        assert holder.engine is not None
        return await voices_api.delete_voice(request, holder.engine)

    async def models(request: Request) -> Response:
        created = int(holder.loaded_at or time.time())
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": settings.model, "object": "model", "created": created, "owned_by": "qwen"}],
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        holder.start()
        yield
        await asyncio.to_thread(holder.close)

    install_log_redaction()
    app = Starlette(
        middleware=[Middleware(TransportAccess, send_buffer=settings.socket_send_buffer)],
        routes=[
            Route("/", index),
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/audio/speech", guard(speech), methods=["POST"]),
            Route("/v1/audio/voices", guard(voices), methods=["GET"]),
            Route("/v1/audio/voices", guard(create_voice), methods=["POST"]),
            Route("/v1/audio/voices/{voice_id}", guard(delete_voice), methods=["DELETE"]),
            Route("/v1/models", guard(models), methods=["GET"]),
            WebSocketRoute("/v1/tts/stream", ws_stream),
        ],
        lifespan=lifespan,
    )
    app.state.holder = holder
    return app


# ---- one WebSocket session -----------------------------------------------------------------

# Exceptions that mean the client's socket is already gone when we send or close.
_GONE = (WebSocketDisconnect, WebSocketDisconnected, OSError)


def _senders(websocket: WebSocket) -> tuple[Callable[[str], Any], Callable[[bytes], Any]]:
    """The session's send callbacks: a closed socket raises ClientGone, a normal end."""

    async def send_text(data: str) -> None:
        try:
            await websocket.send_text(data)
        except _GONE:
            raise ClientGone from None

    async def send_bytes(data: bytes) -> None:
        try:
            await websocket.send_bytes(data)
        except _GONE:
            raise ClientGone from None

    return send_text, send_bytes


async def run_session(websocket: WebSocket, session: Session) -> None:
    """Feed the client's frames to `session` until it ends, then release everything.

    Whatever ends it (session.close, a fatal error, the client leaving, a send past the write
    timeout, a bug), every engine stream of the session is released before this returns. Only a
    bug is logged with a traceback; a client leaving is routine.
    """
    writer = await session.start()
    close: int | None = None
    try:
        close = await _read_frames(websocket, session, writer)
    except (WebSocketDisconnect, WebSocketDisconnected, ClientGone):
        close = None
    except Exception:
        log.exception("session %s crashed", session.id)
        close = P.CLOSE_INTERNAL
    finally:
        await session.disconnect()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    if session.ended_by == "write_timeout":
        log.info(
            "session %s: a send took over %g s (the client is not reading); closing it with %d",
            session.id, session.write_timeout, close,
        )  # fmt: skip
    elif close is None:
        log.info("session %s: the client disconnected", session.id)
    if close is not None:
        await close_websocket(websocket, close, session.write_timeout)


async def _read_frames(websocket: WebSocket, session: Session, writer: asyncio.Task[None]) -> int | None:
    """The receive loop. Returns the close code to send, or None when the client is gone."""
    while True:
        receive = asyncio.ensure_future(websocket.receive())
        done, _ = await asyncio.wait({receive, writer}, return_when=asyncio.FIRST_COMPLETED)
        if writer in done:  # a fatal error was sent, or the writer could not send
            receive.cancel()
            writer.result()  # a bug in the writer propagates from here
            break
        message = receive.result()
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
        if not await session.handle(data):
            break
    # session.close (graceful), a fatal error, or the writer stopped: send what is queued first.
    # This ends: every send has a deadline, and the writer stops at the first one it misses.
    await session.finish()
    await writer
    if session.ended_by == "client_gone":
        return None
    return session.close_code or P.CLOSE_NORMAL


async def close_websocket(websocket: WebSocket, code: int, timeout: float) -> None:
    """Close with `code`; a client that does not read within `timeout` cannot take the close
    frame either, so its connection is dropped instead of lingering with unsendable data."""
    try:
        await asyncio.wait_for(websocket.close(code=code), timeout)
    except asyncio.TimeoutError:
        abort = websocket.scope.get(_ABORT_KEY)
        if abort is not None:
            abort()
    except _GONE:
        pass  # already closed by the client


# ---- transport access, origins and logs --------------------------------------------------------

_ABORT_KEY = "realtime.abort"


class TransportAccess:
    """ASGI middleware: gives WebSocket handlers a way to drop the TCP connection, and caps the
    connection's kernel send buffer.

    ASGI can only close a WebSocket politely, and a polite close waits until the peer reads
    what is buffered, which a dead reader never does. uvicorn's protocol objects expose their
    transport, and uvicorn hands the app their bound `send`: from that, `scope["realtime.abort"]`
    resets the connection. Under other servers it is absent and a close is all we can do.
    """

    def __init__(self, app: ASGIApp, send_buffer: int | None = None) -> None:
        self.app = app
        self.send_buffer = send_buffer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None and callable(getattr(transport, "abort", None)):
                if self.send_buffer:
                    _set_socket_option(transport, socket.SO_SNDBUF, self.send_buffer)
                scope[_ABORT_KEY] = functools.partial(_reset, transport)
        await self.app(scope, receive, send)


def _set_socket_option(transport: Any, option: int, value: int | bytes) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, value)


def _reset(transport: Any) -> None:
    """Drop the connection with a TCP reset: with a plain close the kernel keeps the unread
    data and retries it for minutes (FIN-WAIT-1) on behalf of a client that is not reading."""
    _set_socket_option(transport, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


_LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def origin_allowed(origin: str | None, host: str | None, allowed: Collection[str]) -> bool:
    """May a WebSocket handshake with this `Origin` header proceed?

    Browsers send Origin on every WebSocket handshake and let any page open one, so without
    this check any web page a user visits could drive a server on their machine or network.
    Allowed: no Origin (non-browser clients), the listed origins (``*`` = all), pages from
    localhost, and same-origin pages (the Origin's host and port are the Host header's).
    """
    if origin is None or "*" in allowed:
        return True
    normalized = origin.strip().rstrip("/").lower()
    if normalized in {a.strip().rstrip("/").lower() for a in allowed}:
        return True
    try:
        parts = urlsplit(normalized)
        hostname, port = parts.hostname, parts.port or _DEFAULT_PORTS.get(parts.scheme)
        if hostname is None or port is None:
            return False  # "null" (sandboxed pages, files) or not a URL
        if hostname in _LOCAL_HOSTS or hostname.endswith(".localhost"):
            return True
        if not host:
            return False
        served = urlsplit("//" + host.strip().lower())
        return served.hostname == hostname and (served.port or _DEFAULT_PORTS[parts.scheme]) == port
    except (ValueError, KeyError):  # a malformed port or scheme
        return False


_QUERY_PARAM = re.compile(r"([?&])([^=&\s\"]*)=([^&\s\"]*)")


def _redact(text: str) -> str:
    def hide(m: re.Match[str]) -> str:
        if unquote_plus(m.group(2)).strip().lower() == "token":
            return f"{m.group(1)}{m.group(2)}=***"
        return m.group(0)

    return _QUERY_PARAM.sub(hide, text) if "=" in text else text


class RedactTokens(logging.Filter):
    """Hides ``?token=KEY`` (the WebSocket auth of browsers) in uvicorn's request logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = _redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def install_log_redaction() -> None:
    """Add RedactTokens to the loggers that write request lines (idempotent). A filter on the
    logger survives uvicorn's logging config, which replaces handlers but keeps filters."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


# ---- serving ----------------------------------------------------------------------------------


def uvicorn_config(
    app: ASGIApp, settings: ServerSettings, *, host: str = "127.0.0.1", port: int = 8000, **kw: Any
) -> uvicorn.Config:
    """The uvicorn configuration this server is meant to run with (tests use it too)."""
    import uvicorn

    options: dict[str, Any] = dict(ws_ping_interval=20.0, ws_ping_timeout=20.0, log_level="info") | kw
    config = uvicorn.Config(
        app, host=host, port=port, ws="websockets-sansio", ws_max_size=settings.ws_max_size, **options
    )
    install_log_redaction()  # after the Config, which applies uvicorn's logging setup
    return config


def run(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> int:
    """Serve until interrupted. Returns 1 when the model could not be loaded (the server then
    stops at once instead of serving a /health of 500), else 0."""
    import uvicorn

    app = create_app(settings)
    server = uvicorn.Server(uvicorn_config(app, settings, host=host, port=port, log_level=log_level))
    holder: EngineHolder = app.state.holder

    def stop() -> None:
        server.should_exit = True

    holder.on_failure = stop
    server.run()
    return 1 if holder.error is not None else 0


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
