"""The WebSocket server against careless and hostile clients (issue 13): out-of-range sampling,
invalid Unicode, clients that stop reading, oversize frames, tokens in logs, foreign origins,
aborts, a model that cannot load. Each test drives a real server on 127.0.0.1 with real sockets.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from test_server import TEXT, Server, check_stream_frames, connect, recv_until, send, serve_app, terminal

from engine.scheduler import Engine
from realtime import cli
from realtime.app import EngineHolder, ServerSettings, create_app, origin_allowed
from realtime.protocol import CLOSE_WRITE_TIMEOUT, Limits
from realtime.session import Session

REPO = Path(__file__).resolve().parents[1]
API_KEY = "s3cret-key-in-query"
WRITE_TIMEOUT = 2.0  # short, so dead readers are found quickly; long enough for live ones


def _serve(settings: ServerSettings, engine: Engine) -> tuple[uvicorn.Server, threading.Thread, int]:
    return serve_app(create_app(settings, engine=engine), settings, log_level="info")  # access lines too


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, one_thread: None) -> Iterator[Server]:
    engine = Engine(str(tiny_ckpt), device="cpu", max_streams=4)
    settings = ServerSettings(
        model="tiny-test",
        limits=Limits(max_contexts=4),
        write_timeout=WRITE_TIMEOUT,
        api_key=API_KEY,
        allowed_origins=("https://app.example.com",),
    )
    srv, thread, port = _serve(settings, engine)
    yield Server(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/tts/stream", engine)
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


AUTH = {"Authorization": f"Bearer {API_KEY}"}


async def open_session(server: Server, **kw: Any) -> Any:
    kw.setdefault("additional_headers", AUTH)
    return await connect(server, **kw)


async def wait_idle(server: Server, timeout: float = 60.0) -> dict[str, Any]:
    """Poll /health until no session and no engine stream is left (a deadlock guard only)."""
    async with httpx.AsyncClient() as http:
        deadline = time.monotonic() + timeout
        while True:
            health = (await http.get(server.url + "/health")).json()
            if health["sessions"] == 0 and health["streams"] == 0 and health["queued_streams"] == 0:
                return health
            assert time.monotonic() < deadline, f"not idle: {health}"
            await asyncio.sleep(0.05)


# ---- a raw client: the WebSocket handshake and masked frames over a plain socket ------------------


def raw_connect(port: int, headers: dict[str, str] | None = None, rcvbuf: int = 4096) -> socket.socket:
    """A WebSocket connection that reads only when told to (a small receive buffer, so the
    server's sends back up soon)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    lines = [
        "GET /v1/tts/stream HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{k}: {v}" for k, v in (headers or AUTH).items()),
    ]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)  # byte by byte: leave the frames after the headers unread
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def raw_send(sock: socket.socket, **msg: Any) -> None:
    payload = json.dumps(msg).encode()
    mask = os.urandom(4)
    n = len(payload)
    header = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
    sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def read_to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the server still sends, and how the connection ended ("eof" or "reset")."""
    data = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except ConnectionResetError:
        return bytes(data), "reset"
    return bytes(data), "eof"


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the unmasked frames a server sent; a partial last frame is dropped."""
    frames, i = [], 0
    while i + 2 <= len(data):
        opcode, n, i = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
        if n == 126:
            n, i = struct.unpack("!H", data[i : i + 2])[0], i + 2
        elif n == 127:
            n, i = struct.unpack("!Q", data[i : i + 8])[0], i + 8
        if i + n > len(data):
            break
        frames.append((opcode, data[i : i + n]))
        i += n
    return frames


def ask_for_lots_of_audio(sock: socket.socket, contexts: int) -> None:
    """The most bytes per second of speech: 32-bit float at 48 kHz (192 kB/s), several contexts."""
    raw_send(sock, type="session.update", output={"encoding": "pcm_f32le", "sample_rate": 48000})
    for i in range(contexts):
        raw_send(sock, type="text.append", context_id=f"c{i}", text=TEXT * 3)
        raw_send(sock, type="text.end", context_id=f"c{i}")


# ---- issue item 2: sampling values are checked against the documented bounds ---------------------


async def test_out_of_range_sampling_is_refused_and_the_session_goes_on(server: Server) -> None:
    """Values the old parser took (and that broke the batched step of every stream in it) get a
    non-fatal invalid_sampling, in session.update and context.create alike."""
    ws = await open_session(server)
    bad = [
        {"repetition_penalty": 1e-300},
        {"temperature": 1e-300},
        {"temperature": 1e308},
        {"top_k": 2**63},
        {"top_p": 0},
    ]
    for i, sampling in enumerate(bad):
        await send(ws, type="session.update", sampling=sampling, event_id=i)
        await send(ws, type="context.create", context_id=f"x{i}", sampling=sampling, event_id=100 + i)
    got = await recv_until(ws, lambda r: len(r.of("error")) == 2 * len(bad))
    for err in got.of("error"):
        assert err["code"] == "invalid_sampling" and err["fatal"] is False, err
        assert err["message"].startswith("sampling.")
    assert {e.get("context_id") for e in got.of("error")} == {None} | {f"x{i}" for i in range(len(bad))}
    assert not got.of("context.started")
    # The session and its defaults are intact: a context speaks with them.
    await send(ws, type="text.append", context_id="ok", text="Still fine.")
    await send(ws, type="text.end", context_id="ok")
    got = await recv_until(ws, terminal("ok"), into=got)
    assert got.of("context.done", "ok") and got.frames()
    await ws.close()


# ---- issue item 5: lone surrogates ---------------------------------------------------------------

SURROGATES = [
    '{"type": "text.append", "context_id": "u", "text": "Hi \\ud800 there"}',
    '{"type": "mark", "context_id": "u", "name": "\\udfff"}',
    '{"type": "text.append", "context_id": "\\ud800", "text": "hi"}',
    '{"type": "text.flush", "context_id": "u", "event_id": "\\ud800"}',
    '{"type": "ping", "id": "\\ud800"}',
    '{"type": "session.update", "voice": "\\ud800"}',
    '{"type": "context.create", "context_id": "v", "instructions": "calm \\udc00"}',
    '{"type": "context.cancel", "context_id": "\\ud800"}',
]


async def test_lone_surrogates_get_an_error_and_the_session_goes_on(server: Server) -> None:
    """Each message holding an unpaired surrogate gets invalid_message naming the field, never
    a 1011 close or a dead writer; valid text around it is still spoken."""
    ws = await open_session(server)
    await send(ws, type="text.append", context_id="u", text="Before. ")
    for raw in SURROGATES:
        await ws.send(raw)
        await ws.send(raw.encode())  # as a binary frame too
    await send(ws, type="ping", id="after")
    got = await recv_until(ws, lambda r: r.of("pong"))
    errors = got.of("error")
    assert len(errors) == 2 * len(SURROGATES)
    for err in errors:
        assert err["code"] == "invalid_message" and err["fatal"] is False
        assert "is not valid Unicode" in err["message"]
    assert errors[0]["message"].startswith("text ") and errors[0]["context_id"] == "u"
    await send(ws, type="text.append", context_id="u", text="After.")
    await send(ws, type="text.end", context_id="u")
    got = await recv_until(ws, terminal("u"), into=got)
    assert got.of("context.done", "u") and got.frames()
    await ws.close()


# ---- issue item 4: clients that do not read --------------------------------------------------------


async def test_session_gives_up_on_a_send_past_the_write_timeout(server: Server) -> None:
    """The writer's deadline, without sockets: a send that never completes ends the session with
    close 4013 and cancels its streams."""
    texts: list[str] = []

    async def send_text(data: str) -> None:
        texts.append(data)

    async def never(data: bytes) -> None:
        await asyncio.Event().wait()

    with pytest.raises(ValueError, match="write_timeout"):
        Session(server.engine, send_text, never, model_name="m", write_timeout=0)
    session = Session(server.engine, send_text, never, model_name="m", write_timeout=0.3)
    writer = await session.start()
    await session.handle(json.dumps({"type": "text.append", "context_id": "c", "text": TEXT}))
    stream = session.contexts["c"].stream
    await asyncio.wait_for(writer, 60)
    assert (session.ended_by, session.close_code) == ("write_timeout", CLOSE_WRITE_TIMEOUT)
    assert CLOSE_WRITE_TIMEOUT == 4013  # documented in docs/PROTOCOL.md
    assert stream.finished  # cancelled by the writer, before anyone called disconnect()
    # Nothing blocks once the writer is gone, however much is queued.
    for _ in range(1000):
        await asyncio.wait_for(session.handle('{"type": "ping"}'), 5)
    await session.disconnect()
    assert not session.contexts


async def test_send_buffer_is_bounded_in_bytes(server: Server) -> None:
    """While the client does not take audio, the session queues at most `out_queue_bytes` of
    it (plus one chunk), then the pump waits; once the client reads, every chunk arrives."""
    gate = asyncio.Event()
    audio: list[bytes] = []
    texts: list[str] = []

    async def send_text(data: str) -> None:
        texts.append(data)

    async def send_bytes(data: bytes) -> None:
        await gate.wait()
        audio.append(data)

    session = Session(
        server.engine, send_text, send_bytes, model_name="m", out_queue_bytes=20_000, write_timeout=120
    )
    writer = await session.start()
    update = {"type": "session.update", "chunk_schedule": [1], "sampling": {"temperature": 0}}
    await session.handle(json.dumps(update))
    await session.handle(json.dumps({"type": "text.append", "context_id": "c", "text": TEXT}))
    await session.handle(json.dumps({"type": "text.end", "context_id": "c"}))
    async with asyncio.timeout(120):
        while session._out_room.is_set():  # the pump waits for room
            await asyncio.sleep(0.01)
    assert session._out_bytes <= 20_000 + 16 + 1920 * 2
    pump = session.contexts["c"].pump
    assert pump is not None
    gate.set()
    await asyncio.wait_for(pump, 120)
    await asyncio.wait_for(session.finish(), 120)
    await asyncio.wait_for(writer, 120)
    done = json.loads(texts[-1])
    assert done["type"] == "context.done"
    assert sum(len(a) - 16 for a in audio) == done["metrics"]["frames"] * 1920 * 2
    await session.disconnect()


async def test_dead_reader_is_dropped_and_others_keep_their_audio(server: Server) -> None:
    """A client that asks for lots of audio and never reads: once a send has waited for the
    write timeout, the server cancels its streams and drops the connection, while a normal
    session beside it gets all of its audio."""
    port = int(server.url.rsplit(":", 1)[1])
    dead = raw_connect(port)
    ask_for_lots_of_audio(dead, contexts=3)
    good = await open_session(server)
    await send(good, type="text.append", context_id="g", text=TEXT * 2)
    await send(good, type="text.end", context_id="g")
    got = await recv_until(good, terminal("g"), timeout=180)
    done = got.of("context.done", "g")[0]
    total = check_stream_frames(got.frames(), 2)
    assert total == done["metrics"]["frames"] * 1920
    await good.close()
    health = await wait_idle(server, timeout=180)  # the old server held the dead reader's rows forever
    assert health["sessions"] == 0
    # The connection itself was dropped, not left half-open with unsendable data.
    _, end = await asyncio.to_thread(read_to_end, dead)
    assert end in ("reset", "eof")
    dead.close()


async def test_connections_have_a_small_send_buffer_and_dead_readers_are_reset(server: Server) -> None:
    """The kernel would buffer up to 4 MiB (~90 s of audio) for a client that does not read, all
    of it generated before a send blocks: each WebSocket connection's send buffer is capped.
    A dead reader is then dropped with a TCP reset, not a close whose unsent data the kernel
    keeps retrying for minutes."""
    settings = ServerSettings(model="tiny-test", write_timeout=WRITE_TIMEOUT, api_key=API_KEY)
    assert settings.socket_send_buffer == 64 * 1024
    srv, thread, port = _serve(settings, server.engine)
    try:
        dead = raw_connect(port)
        conns = [c for c in srv.server_state.connections if getattr(c, "transport", None) is not None]
        sizes = {
            c.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            for c in conns
        }
        assert sizes == {2 * settings.socket_send_buffer}  # Linux doubles it for bookkeeping
        ask_for_lots_of_audio(dead, contexts=3)
        await wait_idle(Server(f"http://127.0.0.1:{port}", "", server.engine), timeout=180)
        deadline = time.monotonic() + 30
        while srv.server_state.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        _, end = await asyncio.to_thread(read_to_end, dead)
        assert end == "reset"
        dead.close()
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


async def test_stalled_reader_that_resumes_sees_close_4013(server: Server) -> None:
    """A client that stops reading long enough loses its session, and when it reads again the
    close frame says why: 4013."""
    port = int(server.url.rsplit(":", 1)[1])
    await wait_idle(server)
    opened = server.engine.stats.opened
    stalled = raw_connect(port)
    ask_for_lots_of_audio(stalled, contexts=3)

    def resume_once_released() -> tuple[bytes, str]:
        # The session's streams are released before the server sends its close frame, which it
        # then waits for up to the write timeout to hand over: read then.
        deadline = time.monotonic() + 180
        engine = server.engine
        while engine.stats.opened < opened + 3 or engine.active_streams or engine.queued_streams:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        return read_to_end(stalled)

    data, _ = await asyncio.to_thread(resume_once_released)
    stalled.close()
    closes = [payload for opcode, payload in server_frames(data) if opcode == 0x8]
    assert closes and struct.unpack("!H", closes[0][:2])[0] == CLOSE_WRITE_TIMEOUT == 4013
    await wait_idle(server)


async def test_client_abort_with_replies_queued_is_logged_without_a_traceback(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that vanish while the server is sending: an info line each, no "crashed" and no
    traceback (those are for bugs)."""
    caplog.set_level(logging.INFO, logger="realtime")
    for i in range(12):
        ws = await open_session(server)
        await send(ws, type="text.append", context_id="a", text=TEXT)
        await send(ws, type="text.append", context_id="b", text=TEXT)
        await recv_until(ws, lambda r: len(r.frames()) >= 2)
        for j in range(40):  # replies queued behind the audio
            await send(ws, type="ping", id=j)
        if i % 2:
            await asyncio.sleep(0.2)  # let the server's queue fill
        ws.transport.abort()
    await wait_idle(server)
    records = [r for r in caplog.records if r.name.startswith("realtime")]
    assert not [r for r in records if r.exc_info or "crashed" in r.getMessage()], [
        r.getMessage() for r in records
    ]
    assert sum("disconnected" in r.getMessage() for r in records if r.levelno == logging.INFO) >= 12


# ---- issue item 8: frames over the transport limit, tokens in logs, origins, a failed load --------


async def test_oversize_frames_get_message_too_large(server: Server) -> None:
    """Frames far over the 256 KiB message limit (5 MiB: the old transport closed those with
    1009) are answered with message_too_large; the session goes on."""
    ws = await open_session(server)
    await ws.send("x" * (5 << 20))
    await ws.send(b"\x00" * (5 << 20))
    got = await recv_until(ws, lambda r: len(r.of("error")) == 2)
    assert [e["code"] for e in got.of("error")] == ["message_too_large"] * 2
    assert not any(e["fatal"] for e in got.of("error"))
    await send(ws, type="ping", id=1)
    await recv_until(ws, lambda r: r.of("pong"), into=got)
    await ws.close()


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def test_query_token_is_redacted_from_request_logs(server: Server) -> None:
    """`?token=KEY` (accepted, refused, on the socket and on HTTP) never reaches a log line."""
    capture = _Lines()
    loggers = [logging.getLogger(name) for name in ("uvicorn.access", "uvicorn.error")]
    for logger in loggers:
        logger.addHandler(capture)
    try:
        ws = await websockets.connect(server.ws_url + f"?token={API_KEY}&x=1")
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.close()
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(server.ws_url + "?token=wrong-guess-123")
        async with httpx.AsyncClient() as http:
            r = await http.get(server.url + f"/v1/models?a=b&token={API_KEY}")
            assert r.status_code == 200
            await http.get(server.url + "/health?Token=wrong-guess-123")
    finally:
        for logger in loggers:
            logger.removeHandler(capture)
    text = "\n".join(capture.lines)
    assert "/v1/tts/stream?token=***&x=1" in text and "/v1/models?a=b&token=***" in text
    assert API_KEY not in text and "wrong-guess-123" not in text


async def test_websocket_origin_policy(server: Server) -> None:
    """Browser pages from other sites are refused (403) before the upgrade; no Origin (non-browser
    clients), localhost pages and the --allow-origin list are accepted."""
    for origin in ("https://evil.example", "null", "http://127.0.0.1.evil.example"):
        with pytest.raises(websockets.InvalidStatus) as info:
            await websockets.connect(server.ws_url, origin=origin, additional_headers=AUTH)
        assert info.value.response.status_code == 403
        assert json.loads(info.value.response.body)["error"]["code"] == "forbidden_origin"
    for origin in (None, "http://localhost:5173", "http://127.0.0.1:8080", "https://app.example.com"):
        ws = await websockets.connect(server.ws_url, origin=origin, additional_headers=AUTH)
        assert json.loads(await ws.recv())["type"] == "session.created"
        await ws.close()


def test_origin_rules() -> None:
    host = "tts.example.com:8443"
    assert origin_allowed(None, host, ())
    assert origin_allowed("https://tts.example.com:8443", host, ())  # same origin
    assert origin_allowed("https://TTS.example.com", "tts.example.com", ())  # default port
    assert not origin_allowed("https://tts.example.com", host, ())  # another port
    assert not origin_allowed("https://example.com:8443", host, ())
    assert origin_allowed("http://localhost", host, ()) and origin_allowed("http://[::1]:9", host, ())
    assert origin_allowed("https://a.example/", host, ("https://a.example",))
    assert origin_allowed("https://anything.example", host, ("*",))
    assert not origin_allowed("null", host, ()) and not origin_allowed("http://x:99999", host, ())


def test_serve_exits_with_one_line_when_the_model_cannot_load(tmp_path: Path) -> None:
    """The old server kept running with /health 500 after a logged traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "realtime", "serve", "--model", "/nonexistent/dir", "--port", "0",
         "--voices-db", str(tmp_path / "v.sqlite")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "cannot load model /nonexistent/dir" in errors[0], output
    assert "Traceback" not in output


def test_cli_passes_write_timeout_and_origins(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[ServerSettings] = []

    def fake_run(settings: ServerSettings, **kw: Any) -> int:
        seen.append(settings)
        return 7

    monkeypatch.setattr("realtime.app.run", fake_run)
    argv = ["--model", "random:tiny", "--write-timeout", "2.5", "--allow-origin", "https://a.example"]
    assert cli._serve([*argv, "--allow-origin", "*"]) == 7
    assert seen[0].write_timeout == 2.5 and seen[0].allowed_origins == ("https://a.example", "*")
    assert cli._serve(["--model", "random:tiny"]) == 7
    assert seen[1].write_timeout == 10.0 and seen[1].allowed_origins == ()
    assert seen[1].socket_send_buffer == 64 * 1024
    assert (seen[1].budget_frames_per_token, seen[1].budget_base_frames) == (12.0, 50)
    assert (
        cli._serve(["--model", "random:tiny", "--socket-send-buffer", "0", "--frame-budget", "0", "20"]) == 7
    )
    assert seen[2].socket_send_buffer is None and seen[2].budget_frames_per_token is None
    with pytest.raises(SystemExit):
        cli._serve(["--write-timeout", "0"])


def test_frame_budget_settings_reach_the_engine() -> None:
    settings = ServerSettings(model="random:tiny", budget_frames_per_token=3.0, budget_base_frames=7)
    engine = EngineHolder(settings)._factory()
    try:
        assert (engine.budget_frames_per_token, engine.budget_base_frames) == (3.0, 7)
    finally:
        engine.close()


# ---- fairness and runaway plumbing ---------------------------------------------------------------


async def test_sessions_open_streams_as_their_owner(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine shares rows fairly between owners: every stream of a session names it."""
    owners: list[Any] = []
    open_stream: Callable[..., Any] = server.engine.open_stream

    def recording(**kw: Any) -> Any:
        owners.append(kw.get("owner"))
        return open_stream(**kw)

    monkeypatch.setattr(server.engine, "open_stream", recording)
    ws = await websockets.connect(server.ws_url, additional_headers=AUTH)
    session_id = json.loads(await ws.recv())["session_id"]
    await send(ws, type="context.create", context_id="a")
    await send(ws, type="context.create", context_id="b")
    await send(ws, type="context.cancel")
    await recv_until(ws, lambda r: len(r.of("context.cancelled")) == 2)
    await ws.close()
    assert owners == [session_id, session_id]


async def test_truncated_utterances_are_flagged_and_counted(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An utterance the engine ends itself (the model did not emit end-of-audio in time: here a
    frame cap of 6, imposed on the session's streams) is flagged in context.done and counted in
    /metrics as tts_utterances_truncated_total."""
    open_stream: Callable[..., Any] = server.engine.open_stream
    monkeypatch.setattr(server.engine, "open_stream", lambda **kw: open_stream(**kw, max_frames=6))
    before = server.engine.stats.truncated
    ws = await open_session(server)
    await send(ws, type="session.update", sampling={"temperature": 0})
    await send(ws, type="text.append", context_id="long", text=TEXT)
    await send(ws, type="text.end", context_id="long")
    got = await recv_until(ws, terminal("long"), timeout=120)
    await ws.close()
    done = got.of("context.done", "long")[0]
    assert done["truncated"] is True and done["metrics"]["truncated"] >= 1
    assert server.engine.stats.truncated >= before + done["metrics"]["truncated"]
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(server.url + "/metrics")).text
    line = next(x for x in metrics.splitlines() if x.startswith("tts_utterances_truncated_total "))
    assert float(line.split()[1]) == server.engine.stats.truncated
