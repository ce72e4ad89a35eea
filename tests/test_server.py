"""The server on 127.0.0.1 with a tiny checkpoint, driven over a real socket by the wire protocol
(PROTOCOL.md): every message and error code, the ordering rules, binary headers, cancel, marks,
flush, idle flush, auth, garbage, the OpenAI endpoint, and audio equal to the official package.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
import websockets

from engine import Engine
from realtime.app import ServerSettings, create_app, uvicorn_config
from realtime.protocol import Limits

TEXT = "Hello there. This sentence is streamed to the server one word at a time."
API_KEY = "test-key-123"


@dataclass
class Server:
    url: str
    ws_url: str
    engine: Engine


def serve_app(
    app: Any, settings: ServerSettings | None = None, log_level: str = "warning"
) -> tuple[uvicorn.Server, threading.Thread, int]:
    """Run `app` on 127.0.0.1, port 0, under the uvicorn configuration `python -m realtime serve`
    uses, in a thread; returns the server, its thread and its port."""
    config = uvicorn_config(app, settings or ServerSettings(), host="127.0.0.1", port=0, log_level=log_level)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, port


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path) -> Iterator[Server]:
    engine = Engine(str(tiny_ckpt), device="cpu", max_streams=4)
    app = create_app(ServerSettings(model="tiny-test", limits=Limits(max_contexts=4)), engine=engine)
    srv, thread, port = serve_app(app)
    yield Server(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/tts/stream", engine)
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


@pytest.fixture(scope="module")
def each_backend(tiny_ckpt: Path, backend: str) -> Iterator[Server]:
    """A server per backend, for the tests where the backend matters (audio, cancel, health)."""
    engine = Engine(str(tiny_ckpt), backend=backend, device="cpu", max_streams=4)
    app = create_app(ServerSettings(model="tiny-test", limits=Limits(max_contexts=4)), engine=engine)
    srv, thread, port = serve_app(app)
    yield Server(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/tts/stream", engine)
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


@pytest.fixture(scope="module")
def auth_server(tiny_ckpt: Path) -> Iterator[Server]:
    engine = Engine(str(tiny_ckpt), device="cpu", max_streams=2)
    srv, thread, port = serve_app(
        create_app(ServerSettings(model="tiny-test", api_key=API_KEY), engine=engine)
    )
    yield Server(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/tts/stream", engine)
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


@dataclass
class Frame:
    flags: int
    stream: int
    seq: int
    offset: int
    payload: bytes


@dataclass
class Received:
    events: list[dict[str, Any]] = field(default_factory=list)
    order: list[tuple[str, Any]] = field(default_factory=list)  # ("json", event) | ("audio", Frame)

    def frames(self, stream: int | None = None) -> list[Frame]:
        return [f for k, f in self.order if k == "audio" and (stream is None or f.stream == stream)]

    def of(self, kind: str, context_id: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["type"] == kind and (context_id is None or e.get("context_id") == context_id)
        ]


async def recv_until(ws: Any, done: Any, timeout: float = 60.0, into: Received | None = None) -> Received:
    """Read frames until `done(received)` holds."""
    got = into or Received()
    async with asyncio.timeout(timeout):
        while not done(got):
            msg = await ws.recv()
            if isinstance(msg, bytes):
                kind, flags, stream, seq, offset = struct.unpack("<BBHIQ", msg[:16])
                assert kind == 1
                got.order.append(("audio", Frame(flags, stream, seq, offset, msg[16:])))
            else:
                ev = json.loads(msg)
                got.events.append(ev)
                got.order.append(("json", ev))
    return got


def terminal(context_id: str) -> Any:
    return lambda r: any(
        (e.get("context_id") == context_id and e["type"] in ("context.done", "context.cancelled"))
        or (e["type"] == "error" and e.get("fatal"))
        for e in r.events
    )


async def connect(server: Server, **kw: Any) -> Any:
    ws = await websockets.connect(server.ws_url, subprotocols=["tts.v1"], max_size=None, **kw)
    created = json.loads(await ws.recv())
    assert created["type"] == "session.created"
    return ws


async def send(ws: Any, **msg: Any) -> None:
    await ws.send(json.dumps(msg))


def check_stream_frames(frames: list[Frame], bytes_per_sample: int) -> int:
    """seq counts from 0, sample_offset is continuous, flags first/last sit on the ends."""
    assert frames, "no audio"
    offset = 0
    for i, f in enumerate(frames):
        assert f.seq == i
        assert f.offset == offset, f"sample_offset gap at seq {i}: {f.offset} != {offset}"
        offset += len(f.payload) // bytes_per_sample
        assert bool(f.flags & 1) == (i == 0)
        assert bool(f.flags & 2) == (i == len(frames) - 1)
    return offset


# ---- the happy path --------------------------------------------------------------------------


async def test_session_created_and_ping(each_backend: Server, backend: str) -> None:
    server = each_backend
    async with websockets.connect(server.ws_url, subprotocols=["tts.v1"]) as ws:
        assert ws.subprotocol == "tts.v1"
        created = json.loads(await ws.recv())
        assert created["type"] == "session.created" and created["protocol"] == "tts.v1"
        assert created["engine"] == {"backend": backend, "device": "cpu", "precision": "fp32"}
        assert created["audio"] == {"encoding": "pcm_s16le", "sample_rate": 24000, "channels": 1}
        assert "ryan" in created["voices"] and "english" in created["languages"]
        assert created["limits"]["max_contexts"] == 4
        await send(ws, type="ping", id=7)
        assert json.loads(await ws.recv()) == {"type": "pong", "id": 7}
    async with httpx.AsyncClient() as client:
        health = (await client.get(server.url + "/health")).json()
    assert (health["status"], health["backend"], health["precision"]) == ("ok", backend, "fp32")


async def test_streamed_deltas_give_official_audio(each_backend: Server, official_tiny: Any) -> None:
    """Audio received for text streamed word by word equals (greedy, pcm_f32le) the official
    package's audio for the whole text, on every backend."""
    server = each_backend
    ws = await connect(server)
    await send(ws, type="session.update", voice="ryan", language="english",
               sampling={"temperature": 0}, output={"encoding": "pcm_f32le", "sample_rate": 24000})  # fmt: skip
    words = TEXT.split(" ")
    for i, w in enumerate(words):
        await send(ws, type="text.append", context_id="t1", text=w if i == 0 else " " + w)
        await asyncio.sleep(0.01)
    await send(ws, type="text.end", context_id="t1")
    got = await recv_until(ws, terminal("t1"), timeout=120)
    await ws.close()
    audio = np.concatenate([np.frombuffer(f.payload, "<f4") for f in got.frames()])
    ids = server.engine.tokenizer.encode(TEXT)
    template = torch.tensor([[151644, 77091, 198, *ids, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        codes = official_tiny.model.generate(
            input_ids=[template], languages=["english"], speakers=["ryan"], non_streaming_mode=False,
            do_sample=False, subtalker_dosample=False, max_new_tokens=201,
        )[0][0]  # fmt: skip
        ref = official_tiny.model.speech_tokenizer.decode([{"audio_codes": codes}])[0][0]
    assert audio.shape == ref.shape
    np.testing.assert_allclose(audio, ref, atol=1e-4, rtol=0)
    done = got.of("context.done", "t1")[0]
    assert done["metrics"]["frames"] == codes.shape[0]
    assert done["audio_ms"] == pytest.approx(len(audio) / 24.0, abs=0.01)


@pytest.mark.parametrize(
    ("encoding", "rate", "width"),
    [
        ("pcm_s16le", 24000, 2),
        ("pcm_mulaw", 8000, 1),
        ("pcm_alaw", 16000, 1),
        ("pcm_f32le", 48000, 4),
        ("pcm_s16le", 22050, 2),
        ("pcm_s16le", 44100, 2),
    ],
)
async def test_encodings_rates_and_headers(server: Server, encoding: str, rate: int, width: int) -> None:
    ws = await connect(server)
    await send(
        ws,
        type="context.create",
        context_id="e",
        voice="serena",
        output={"encoding": encoding, "sample_rate": rate},
        chunk_schedule=[1, 3],
    )
    started = await recv_until(ws, lambda r: r.of("context.started"))
    assert started.of("context.started")[0] == {
        "type": "context.started",
        "context_id": "e",
        "stream": 0,
        "encoding": encoding,
        "sample_rate": rate,
    }
    await send(ws, type="text.append", context_id="e", text="Short test.")
    await send(ws, type="text.end", context_id="e")
    got = await recv_until(ws, terminal("e"))
    await ws.close()
    total = check_stream_frames(got.frames(0), width)
    frames = got.of("context.done", "e")[0]["metrics"]["frames"]
    assert total == round(frames * 1920 * rate / 24000)


async def test_ordering_marks_flush_and_two_contexts(server: Server) -> None:
    """Rule 1 per context; marks and context.flushed in audio order; rule 2: two contexts run
    concurrently, each tagged by its stream; flush then more text continues the context."""
    ws = await connect(server)
    await send(ws, type="session.update", chunk_schedule=[2])
    await send(ws, type="text.append", context_id="a", text="First utterance of context a.")
    await send(ws, type="text.append", context_id="b", text="Context b speaks at the same time.")
    await send(ws, type="text.flush", context_id="a")
    got = await recv_until(ws, lambda r: len(r.frames()) >= 6)
    await send(ws, type="mark", context_id="a", name="m1")
    await send(ws, type="text.append", context_id="a", text="Second utterance.")
    await send(ws, type="text.end", context_id="a")
    await send(ws, type="text.end", context_id="b")
    got = await recv_until(ws, lambda r: terminal("a")(r) and terminal("b")(r), timeout=120, into=got)
    await ws.close()
    streams = {e["context_id"]: e["stream"] for e in got.of("context.started")}
    assert streams["a"] != streams["b"]
    for cid in ("a", "b"):
        seq = [
            k if k == "audio" else ev["type"]
            for k, ev in got.order
            if (k == "audio" and ev.stream == streams[cid]) or (k == "json" and ev.get("context_id") == cid)
        ]
        assert seq[0] == "context.started" and seq[-1] == "context.done"
        assert seq.count("context.done") == 1
        check_stream_frames(got.frames(streams[cid]), 2)
    # a: the mark comes after the audio queued before it; flushed after the first utterance's
    # last frame (flag bit 2); then the second utterance's audio.
    a_items = [
        (k, ev)
        for k, ev in got.order
        if (k == "audio" and ev.stream == streams["a"]) or (k == "json" and ev.get("context_id") == "a")
    ]
    kinds = [k if k == "audio" else ev["type"] for k, ev in a_items]
    i_flushed, i_mark = kinds.index("context.flushed"), kinds.index("mark")
    assert a_items[i_flushed - 1][1].flags & 4, "context.flushed must follow the utterance's last frame"
    assert "audio" in kinds[i_flushed + 1 :], "the second utterance was not spoken"
    sent_before_mark = sum(len(ev.payload) for k, ev in a_items[:i_mark] if k == "audio") / 2
    mark = got.of("mark", "a")[0]
    assert mark["name"] == "m1" and mark["audio_ms"] == pytest.approx(sent_before_mark / 24.0, abs=0.01)
    assert got.of("context.done", "a")[0]["metrics"]["utterances"] == 2


async def test_cancel_then_no_audio(each_backend: Server) -> None:
    server = each_backend
    ws = await connect(server)
    await send(ws, type="session.update", chunk_schedule=[1])
    await send(ws, type="text.append", context_id="c", text=TEXT)
    await send(ws, type="text.end", context_id="c")
    got = await recv_until(ws, lambda r: len(r.frames()) >= 3)
    await send(ws, type="context.cancel", context_id="c")
    got = await recv_until(ws, terminal("c"), into=got)
    # and wait a bit more: nothing of that stream may follow
    await send(ws, type="ping", id=1)
    await recv_until(ws, lambda r: r.of("pong"), into=got)
    await ws.close()
    idx = next(i for i, (k, ev) in enumerate(got.order) if k == "json" and ev["type"] == "context.cancelled")
    assert not any(k == "audio" for k, _ in got.order[idx:]), "audio after context.cancelled"
    cancelled = got.order[idx][1]
    assert cancelled["audio_ms"] == pytest.approx(
        sum(len(f.payload) for f in got.frames()) / 2 / 24.0, abs=0.01
    )
    assert not got.of("context.done", "c")


async def test_cancel_all_and_text_after_cancel(server: Server) -> None:
    ws = await connect(server)
    for cid in ("x", "y"):
        await send(ws, type="text.append", context_id=cid, text=TEXT)
    await send(ws, type="context.cancel")
    got = await recv_until(ws, lambda r: len(r.of("context.cancelled")) == 2)
    await send(ws, type="text.append", context_id="x", text="more", event_id="e9")
    got = await recv_until(ws, lambda r: r.of("error"), into=got)
    await ws.close()
    err = got.of("error")[0]
    assert (
        err["code"] == "context_closed"
        and err["context_id"] == "x"
        and err["event_id"] == "e9"
        and not err["fatal"]
    )


async def test_idle_flush(server: Server) -> None:
    """Text without flush: after idle_flush_ms the context speaks it and reports context.flushed."""
    ws = await connect(server)
    await send(ws, type="session.update", text={"idle_flush_ms": 200})
    await send(ws, type="text.append", context_id="i", text="The model waits for more text")
    got = await recv_until(ws, lambda r: r.of("context.flushed", "i"), timeout=60)
    assert got.frames(), "idle flush produced no audio"
    await send(ws, type="text.end", context_id="i")
    await recv_until(ws, terminal("i"), into=got)
    await ws.close()


async def test_session_close_finishes_contexts(server: Server) -> None:
    ws = await connect(server)
    await send(ws, type="text.append", context_id="s", text="Finish me before closing.")
    await send(ws, type="session.close")
    got = Received()
    with pytest.raises(websockets.ConnectionClosedOK):
        await recv_until(ws, lambda r: False, into=got)
    assert got.of("context.done", "s") and ws.close_code == 1000


# ---- errors and garbage ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        (json.dumps({"text": "no type"}), "invalid_message"),
        (json.dumps({"type": "text.append", "context_id": "q", "text": 5}), "invalid_message"),
        (json.dumps({"type": "what.ever"}), "unknown_type"),
        (json.dumps({"type": "session.update", "voice": "nobody"}), "invalid_voice"),
        (json.dumps({"type": "session.update", "language": "klingon"}), "invalid_language"),
        (json.dumps({"type": "session.update", "output": {"encoding": "mp3"}}), "invalid_output"),
        (json.dumps({"type": "session.update", "output": {"sample_rate": 11025}}), "invalid_output"),
        (json.dumps({"type": "session.update", "sampling": {"top_p": 2}}), "invalid_sampling"),
        (json.dumps({"type": "session.update", "sampling": {"temperature": "hot"}}), "invalid_sampling"),
        (json.dumps({"type": "text.append", "context_id": "big", "text": "x" * 70_000}), "text_too_large"),
        ("x" * (1 << 20), "message_too_large"),
    ],
)
async def test_bad_messages_get_precise_errors(server: Server, message: str, code: str) -> None:
    ws = await connect(server)
    await ws.send(message)
    got = await recv_until(ws, lambda r: r.of("error"))
    assert got.of("error")[0]["code"] == code and got.of("error")[0]["fatal"] is False
    await send(ws, type="ping", id=2)  # the session survives
    await recv_until(ws, lambda r: r.of("pong"), into=got)
    await ws.close()


async def test_binary_garbage_and_too_many_contexts(server: Server) -> None:
    ws = await connect(server)
    await ws.send(b"\x00\xff\x13garbage")
    got = await recv_until(ws, lambda r: r.of("error"))
    assert got.of("error")[0]["code"] == "invalid_json"
    for i in range(100):  # 100 contexts: 4 open, the rest refused
        await send(ws, type="context.create", context_id=f"k{i}", event_id=i)
    got = await recv_until(ws, lambda r: len(r.of("error")) >= 97, into=got)
    refused = [e for e in got.of("error") if e["code"] == "too_many_contexts"]
    assert len(refused) == 96 and len(got.of("context.started")) == 4
    await send(ws, type="context.cancel")
    await recv_until(ws, lambda r: len(r.of("context.cancelled")) == 4, into=got)
    await ws.close()


async def test_abrupt_disconnect_frees_engine_slots(server: Server) -> None:
    before = server.engine.stats.closed
    for _ in range(3):
        ws = await connect(server)
        await send(ws, type="text.append", context_id="d", text=TEXT)
        await send(ws, type="text.append", context_id="e", text=TEXT)
        await recv_until(ws, lambda r: len(r.frames()) >= 1)
        ws.transport.abort()  # no close handshake
    deadline = time.time() + 30
    while (server.engine.active_streams or server.engine.queued_streams) and time.time() < deadline:
        await asyncio.sleep(0.05)
    assert server.engine.active_streams == 0 and server.engine.queued_streams == 0
    assert server.engine.stats.closed - before >= 6
    # others are still served
    ws = await connect(server)
    await send(ws, type="text.append", context_id="z", text="Still alive.")
    await send(ws, type="text.end", context_id="z")
    got = await recv_until(ws, terminal("z"))
    assert got.of("context.done", "z")
    await ws.close()


async def test_garbage_session_does_not_disturb_another(server: Server) -> None:
    good = await connect(server)
    await send(good, type="session.update", sampling={"temperature": 0})
    await send(good, type="text.append", context_id="g", text=TEXT)
    await send(good, type="text.end", context_id="g")
    bad = await connect(server)
    for i in range(70):  # past the limit of consecutive garbage: the bad session is closed
        await bad.send(["{", "[]", '{"type": 3}', "\x00" * 300_000][i % 4])
    with pytest.raises(websockets.ConnectionClosedError):
        await recv_until(bad, lambda r: False)
    assert bad.close_code == 4000
    got = await recv_until(good, terminal("g"), timeout=120)
    assert got.of("context.done", "g")
    await good.close()


async def test_auth_refused_without_key(auth_server: Server) -> None:
    with pytest.raises(websockets.InvalidStatus) as e:
        await websockets.connect(auth_server.ws_url)
    assert e.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(auth_server.ws_url + "?token=wrong")
    ws = await websockets.connect(
        auth_server.ws_url, additional_headers={"Authorization": f"Bearer {API_KEY}"}
    )
    assert json.loads(await ws.recv())["type"] == "session.created"
    await ws.close()
    ws = await websockets.connect(auth_server.ws_url + f"?token={API_KEY}")
    assert json.loads(await ws.recv())["type"] == "session.created"
    await ws.close()
    async with httpx.AsyncClient() as http:
        r = await http.post(auth_server.url + "/v1/audio/speech", json={"input": "hi", "voice": "ryan"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# ---- HTTP ------------------------------------------------------------------------------------


def test_openai_client_streams_pcm_and_wav(server: Server) -> None:
    import io

    import soundfile as sf
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input="Streaming over the OpenAI API.", response_format="pcm"
    ) as resp:
        parts = list(resp.iter_bytes(chunk_size=4096))
    pcm = b"".join(parts)
    assert len(pcm) > 0 and len(pcm) % (2 * 1920) == 0
    wav = client.audio.speech.create(
        model="tts-1", voice="ryan", input="A WAV file please.", response_format="wav"
    )
    data, rate = sf.read(io.BytesIO(wav.content))
    assert rate == 24000 and len(data) > 0 and len(data) % 1920 == 0
    mp3 = client.audio.speech.create(model="tts-1", voice="nova", input="And an mp3.", response_format="mp3")
    assert mp3.content[:3] == b"ID3" or mp3.content[0] == 0xFF


def test_openai_sse_and_errors(server: Server) -> None:
    with httpx.Client(base_url=server.url) as http:
        r = http.post(
            "/v1/audio/speech", json={"input": "Events please.", "voice": "ryan", "stream_format": "sse"}
        )
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] == "speech.audio.done" and events[0]["type"] == "speech.audio.delta"
        for body, param in [
            ({"voice": "ryan"}, "input"),
            ({"input": "x", "voice": "nobody"}, "voice"),
            ({"input": "x", "voice": "ryan", "response_format": "aac"}, "response_format"),
            ({"input": "x", "voice": "ryan", "speed": 9}, "speed"),
        ]:
            r = http.post("/v1/audio/speech", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        voices = http.get("/v1/audio/voices").json()
        assert "ryan" in [v["id"] for v in voices["data"]]
        assert http.get("/v1/models").json()["data"][0]["id"] == "tiny-test"
        assert http.get("/health").json()["status"] == "ok"
        metrics = http.get("/metrics").text
        for name in (
            "tts_sessions",
            "tts_streams",
            "tts_batch_size_bucket",
            "tts_step_seconds_bucket",
            "tts_first_audio_seconds_bucket",
        ):
            assert name in metrics


def test_health_is_503_while_loading(tiny_ckpt: Path) -> None:
    from starlette.testclient import TestClient

    gate = threading.Event()

    def slow_factory() -> Engine:
        gate.wait(30)
        return Engine(str(tiny_ckpt), device="cpu", start=False)

    app = create_app(ServerSettings(model=str(tiny_ckpt)))
    app.state.holder._factory = slow_factory
    with TestClient(app) as client:
        assert client.get("/health").status_code == 503
        gate.set()
        deadline = time.time() + 60
        while client.get("/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"backend": "tpu"}, "unknown backend 'tpu'"), ({"precision": "int4"}, "unknown precision 'int4'")],
)
def test_a_backend_that_cannot_run_is_a_clean_load_error(
    tiny_ckpt: Path, settings: dict[str, str], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    """--backend / --precision values that cannot run here: /health says why in one line (no
    traceback), and serve would exit 1."""
    from starlette.testclient import TestClient

    app = create_app(ServerSettings(model=str(tiny_ckpt), **settings))  # type: ignore[arg-type]
    with TestClient(app) as client:
        deadline = time.time() + 60
        while (r := client.get("/health")).status_code == 503:
            assert time.time() < deadline
            time.sleep(0.05)
    assert r.status_code == 500 and message in r.json()["error"]
    assert "Traceback" not in caplog.text
