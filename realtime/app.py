"""HTTP and WebSocket routes (ASGI, Starlette) around one engine.

The model loads in a background thread when the app starts: `/health` answers 503 while it
loads and 200 once it is ready, so an orchestrator can hold traffic until then. Model work never
runs on the event loop: sessions only talk to engine streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from engine.scheduler import Engine
from realtime import protocol as P
from realtime import voices_api
from realtime.compat import openai as oa
from realtime.session import Session

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


@dataclass
class ServerSettings:
    model: str = "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice"
    device: str | None = None
    api_key: str | None = None
    max_sessions: int = 64
    max_streams: int = 8  # streams generating at once (the engine's batch rows)
    voices_db: str | None = None  # SQLite store of cloned voices (Base models)
    limits: P.Limits = field(default_factory=P.Limits)


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
                device=settings.device,
                max_streams=settings.max_streams,
                voices_db=settings.voices_db,
            )
        )
        self._thread: threading.Thread | None = None
        self.loaded_at: float | None = time.time() if engine is not None else None
        self._owns_engine = engine is None  # an engine passed in belongs to the caller

    def start(self) -> None:
        if self.engine is None and self._thread is None:
            self._thread = threading.Thread(target=self._load, name="engine-load", daemon=True)
            self._thread.start()

    def _load(self) -> None:
        try:
            self.engine = self._factory()
            self.loaded_at = time.time()
            log.info("model %s loaded", self.settings.model)
        except Exception as e:
            log.exception("model load failed")
            self.error = f"{type(e).__name__}: {e}"

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
            await websocket.send_text(event.to_json())
            await websocket.close(code=P.close_code(P.ErrorCode.OVERLOADED))
            return
        assert holder.engine is not None
        state["sessions"] += 1
        sessions.inc()

        def on_event(name: str, value: Any) -> None:
            if name == "error":
                errors.labels(code=value).inc()
            elif name == "first_audio_ms":
                session_first_audio.observe(value / 1000.0)

        session = Session(
            holder.engine, websocket.send_text, websocket.send_bytes, model_name=settings.model,
            limits=settings.limits, resolve_alias=oa.alias_resolver(holder.engine), on_event=on_event,
        )  # fmt: skip
        writer = await session.start()
        try:
            while True:
                receive = asyncio.ensure_future(websocket.receive())
                done, _ = await asyncio.wait({receive, writer}, return_when=asyncio.FIRST_COMPLETED)
                if writer in done:  # a fatal error was sent: close
                    receive.cancel()
                    await session.disconnect()
                    await websocket.close(code=session.close_code or P.CLOSE_PROTOCOL)
                    return
                message = receive.result()
                if message["type"] == "websocket.disconnect":
                    raise WebSocketDisconnect(message.get("code", 1000))
                data = message.get("text")
                if data is None:
                    data = message.get("bytes") or b""
                if not await session.handle(data):
                    break
            # session.close (graceful) or a fatal error raised by handle()
            await session.finish()
            with contextlib.suppress(Exception):
                await writer
            await session.disconnect()
            await websocket.close(code=session.close_code or P.CLOSE_NORMAL)
        except WebSocketDisconnect:
            await session.disconnect()
            writer.cancel()
        except Exception:
            log.exception("session %s crashed", session.id)
            await session.disconnect()
            writer.cancel()
            with contextlib.suppress(Exception):
                await websocket.close(code=P.CLOSE_INTERNAL)
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
                "device": str(holder.engine.device), "sessions": state["sessions"],
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
        return await oa.speech(request, holder.engine, settings.model)

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

    app = Starlette(
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


def run(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(
        create_app(settings), host=host, port=port, ws="websockets-sansio", log_level=log_level,
        # Above the protocol's 256 KiB message limit, so oversize messages get a precise
        # message_too_large error instead of a 1009 close from the transport.
        ws_max_size=4 * 1024 * 1024, ws_ping_interval=20.0, ws_ping_timeout=20.0,
    )  # fmt: skip


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
