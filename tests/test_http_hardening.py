"""Issue 13, HTTP side: a request can never leak its engine stream, and bad input to
`POST /v1/audio/speech` is always a 4xx naming the field, never a 500.

A real server on 127.0.0.1 (tiny random CustomVoice checkpoint, 2 engine rows) and real
clients (httpx, raw sockets). Failures are injected at every step the handler takes after
opening its engine stream; each time the engine's gauges must return to 0.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_server import serve_app

from engine.scheduler import Engine
from engine.stream import Stream
from realtime.app import ServerSettings, create_app
from realtime.compat import openai as oa
from realtime.protocol import DEFAULT_LIMITS

MAX_STREAMS = 2
HI = {"input": "Hi.", "voice": "ryan", "response_format": "pcm"}


class Server:
    def __init__(self, engine: Engine, port: int):
        self.engine = engine
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def streams(self) -> int:
        return self.engine.active_streams + self.engine.queued_streams

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Gauges back to 0 (the worker reaps released streams on its next pass); the
        deadline only guards against a hang."""
        deadline = time.monotonic() + timeout
        while self.streams() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.streams() == 0, f"{self.streams()} engine streams leaked"


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, one_thread: None) -> Iterator[Server]:
    engine = Engine(str(tiny_ckpt), device="cpu", max_streams=MAX_STREAMS)
    app = create_app(ServerSettings(model="tiny-test"), engine=engine)
    srv, thread, port = serve_app(app)
    yield Server(engine, port)
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


def post(server: Server, body: bytes | dict[str, Any], ctype: str = "application/json") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    with httpx.Client(base_url=server.url, timeout=120) as http:
        return http.post("/v1/audio/speech", content=content, headers={"content-type": ctype})


def assert_speaks(server: Server) -> None:
    r = post(server, HI)
    assert r.status_code == 200, r.text
    assert len(r.content) > 0 and len(r.content) % (2 * 1920) == 0
    server.wait_idle()


def assert_client_error(r: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert "<" not in err["message"] and "Error" not in err["message"], err  # no reprs, no exception text
    return err


# ---- item 1: the leaked slot -------------------------------------------------------------------


def test_lone_surrogate_is_400_and_the_server_stays_alive(server: Server) -> None:
    """Issue 13 item 1: each such request returned 500 and kept its engine stream; after
    max_streams of them the server served nobody. Now each is a 400 that opens nothing, and a
    normal request after many of them is served."""
    bad = b'{"input": "Hi \\ud800", "voice": "ryan"}'
    for _ in range(4 * MAX_STREAMS + 1):
        err = assert_client_error(post(server, bad), 400, "input")
        assert err["code"] == "invalid_text" and "surrogate" in err["message"]
        assert server.streams() == 0
    assert_speaks(server)


@pytest.mark.parametrize("field", ["voice", "instructions", "language", "model"])
def test_lone_surrogate_in_any_field_is_400(server: Server, field: str) -> None:
    body = json.dumps({**HI, field: "x"}).replace('"x"', '"x\\udfff"').encode()
    err = assert_client_error(post(server, body), 400, field)
    assert err["code"] == "invalid_text"
    server.wait_idle()


def _raise(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected failure <object at 0x1>")


class _NeverSends:
    """A StreamingResponse that returns without sending or iterating its body."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    async def __call__(self, *args: Any) -> None:
        return None


class _NeverStarts(_NeverSends):
    async def __call__(self, *args: Any) -> None:
        raise RuntimeError("injected failure before http.response.start")


def _failing_aiter(self: Stream) -> Any:
    raise RuntimeError("injected failure")


def _fail_after_first_chunk(real: Callable[..., bytes]) -> Callable[..., bytes]:
    calls = [0]

    def encode(*args: Any) -> bytes:
        calls[0] += 1
        if calls[0] > 1:
            raise RuntimeError("injected failure mid-body")
        return real(*args)

    return encode


def endless(mp: pytest.MonkeyPatch) -> None:
    """Streams speak their text but never end (`end` only flushes): such a stream can only
    leave the engine's gauges when the handler releases it, never by finishing on its own,
    so a test cannot pass by the audio simply running out."""
    mp.setattr(Stream, "end", Stream.flush)


# (what to break, the response format that reaches it, whether the response has started,
#  whether the stream can end: a failure at the container's close comes only after the end)
INJECTIONS: list[tuple[str, Callable[[pytest.MonkeyPatch], None], str, bool, bool]] = [
    ("push_text", lambda mp: mp.setattr(Stream, "push_text", _raise), "pcm", False, False),
    ("end", lambda mp: mp.setattr(Stream, "end", _raise), "pcm", False, False),
    ("response_raises_before_start", lambda mp: mp.setattr(oa, "StreamingResponse", _NeverStarts), "pcm", False, False),
    ("body_never_iterated", lambda mp: mp.setattr(oa, "StreamingResponse", _NeverSends), "pcm", False, False),
    ("stream_iteration", lambda mp: mp.setattr(Stream, "__aiter__", _failing_aiter), "pcm", True, False),
    ("encode_pcm", lambda mp: mp.setattr(oa, "encode_pcm", _raise), "pcm", True, False),
    ("encode_pcm_mid_body", lambda mp: mp.setattr(oa, "encode_pcm", _fail_after_first_chunk(oa.encode_pcm)), "pcm", True, False),
    ("wav_header", lambda mp: mp.setattr(oa, "wav_header", _raise), "wav", True, False),
    ("container_open", lambda mp: mp.setattr(oa, "ContainerEncoder", _raise), "mp3", True, False),
    ("container_encode", lambda mp: mp.setattr(oa.ContainerEncoder, "encode", _raise), "mp3", True, False),
    ("container_close", lambda mp: mp.setattr(oa.ContainerEncoder, "close", _raise), "flac", True, True),
    ("sse_event", lambda mp: mp.setattr(oa, "_sse", _raise), "sse", True, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("inject", "fmt", "started", "ends"), [i[1:] for i in INJECTIONS], ids=[i[0] for i in INJECTIONS]
)
def test_failure_at_every_step_after_open_releases_the_stream(
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
    inject: Callable[[pytest.MonkeyPatch], None],
    fmt: str,
    started: bool,
    ends: bool,
) -> None:
    opened = server.engine.stats.opened
    body = {**HI, "response_format": fmt} if fmt != "sse" else {**HI, "stream_format": "sse"}
    with monkeypatch.context() as mp:
        if not ends:
            endless(mp)
        inject(mp)
        try:
            r = post(server, body)
        except httpx.HTTPError:
            r = None  # the server cut a response that had started: the client sees it truncated
        server.wait_idle()
    assert server.engine.stats.opened == opened + 1, "the failure must come after the stream opened"
    if not started:
        assert r is not None and r.status_code == 500
        if r.headers.get("content-type") == "application/json":
            err = r.json()["error"]
            assert err["code"] == "internal" and err["message"] == "internal error while generating speech"
    else:
        assert r is None or r.status_code == 200
    assert_speaks(server)  # and the server is whole


def test_client_gone_before_the_response_releases_the_stream(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    endless(monkeypatch)
    body = json.dumps({**HI, "input": "A sentence long enough to still be speaking when the client leaves."})
    request = (
        f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    opened = server.engine.stats.opened
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(request)
            s.shutdown(socket.SHUT_RDWR)  # gone before a byte of the response was read
    deadline = time.monotonic() + 60
    while server.engine.stats.opened < opened + 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    server.wait_idle()
    monkeypatch.undo()
    assert_speaks(server)


def test_client_abort_mid_body_releases_the_stream(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    endless(monkeypatch)
    text = "This sentence keeps the model talking for a while so the client can leave mid-way."
    for fmt in ("pcm", "mp3"):
        body = {**HI, "input": text, "response_format": fmt}
        with (
            httpx.Client(base_url=server.url, timeout=120) as http,
            http.stream("POST", "/v1/audio/speech", json=body) as r,
        ):
            assert r.status_code == 200
            next(r.iter_raw(1))  # the body has started; then the connection is dropped
        server.wait_idle()
    monkeypatch.undo()
    assert_speaks(server)


# ---- item 6 and 8: bad bodies are 4xx ------------------------------------------------------------

NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**HI, "response_format": []}, "response_format"),
        ({**HI, "response_format": {}}, "response_format"),
        ({**HI, "response_format": 3}, "response_format"),
        ({**HI, "response_format": "aac"}, "response_format"),
        ({**HI, "stream_format": []}, "stream_format"),
        ({**HI, "stream_format": {"a": 1}}, "stream_format"),
        ({**HI, "input": 5}, "input"),
        ({**HI, "input": ["Hi"]}, "input"),
        ({**HI, "input": "   "}, "input"),
        ({"voice": "ryan"}, "input"),
        ({**HI, "voice": 5}, "voice"),
        ({**HI, "voice": []}, "voice"),
        ({**HI, "voice": {"id": 5}}, "voice"),
        ({**HI, "voice": "nobody"}, "voice"),
        ({**HI, "instructions": {}}, "instructions"),
        ({**HI, "language": 1}, "language"),
        ({**HI, "language": "klingon"}, "language"),
        ({**HI, "model": {}}, "model"),
        ({**HI, "speed": "1"}, "speed"),
        ({**HI, "speed": True}, "speed"),
        ({**HI, "speed": None}, "speed"),
        ({**HI, "speed": 9}, "speed"),
        ({**HI, "speed": 1e308}, "speed"),
        ({**HI, "speed": 2.0}, "speed"),
    ],
)
def test_wrong_types_and_values_name_the_field(server: Server, body: dict[str, Any], param: str) -> None:
    assert_client_error(post(server, body), 400, param)
    assert server.streams() == 0


MALFORMED = {
    "nested_100k": NESTED,
    "nested_in_field": b'{"input": "x", "voice": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nested_objects": b'{"input": ' + b'{"a":' * 30_000 + b"1" + b"}" * 30_000 + b"}",
    "nan": b'{"input": "Hi", "speed": NaN}',
    "infinity": b'{"input": "Hi", "speed": Infinity}',
    "huge_integer": b'{"input": "Hi", "speed": ' + b"9" * 5000 + b"}",
    "bad_utf8": b'{"input": "\xff\xfe"}',
    "utf8_bom": b"\xef\xbb\xbf{}",
    "syntax": b"{not json",
    "empty": b"",
    "array": b"[1, 2]",
    "string": b'"a string"',
    "null": b"null",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_json_is_400(server: Server, raw: bytes) -> None:
    r = post(server, raw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and "<" not in err["message"]


@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/x-www-form-urlencoded", "", "application/jsonx"]
)
def test_json_routes_need_the_json_content_type(server: Server, ctype: str) -> None:
    """Issue 13 item 8: a text/plain body (which any web page may POST cross-origin without a
    preflight) was parsed as JSON."""
    opened = server.engine.stats.opened
    r = post(server, json.dumps(HI).encode(), ctype=ctype)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    assert server.engine.stats.opened == opened
    ok = post(server, HI, ctype="application/json; charset=utf-8")
    assert ok.status_code == 200


def test_one_set_of_limits_for_http_and_ws(server: Server) -> None:
    """Issue 13 item 8: HTTP accepted 32 KiB instructions where the socket caps 8 KiB; the
    HTTP route now takes the protocol's limits."""
    lim = DEFAULT_LIMITS
    cases = [
        ({**HI, "instructions": "x" * (lim.max_instructions_bytes + 1)}, "instructions"),
        (
            {**HI, "instructions": "é" * (lim.max_instructions_bytes // 2 + 1)},
            "instructions",
        ),  # bytes, not chars
        ({**HI, "input": "x" * (lim.max_text_bytes_per_context + 1)}, "input"),
        ({**HI, "voice": "v" * (lim.max_name_chars + 1)}, "voice"),
        ({**HI, "language": "l" * (lim.max_name_chars + 1)}, "language"),
    ]
    for body, param in cases:
        err = assert_client_error(post(server, body), 400, param)
        assert err["code"] == "string_above_max_length"
    # at the limit: accepted (refused later for other reasons only)
    r = post(server, {**HI, "instructions": "x" * lim.max_instructions_bytes})
    assert r.status_code in (200, 400) and (
        r.status_code == 200 or r.json()["error"]["param"] != "instructions"
    )
    server.wait_idle()


def test_body_over_the_message_limit_is_413(server: Server) -> None:
    big = json.dumps({**HI, "pad": "x" * DEFAULT_LIMITS.max_message_bytes}).encode()
    r = post(server, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"input": "Hi", "pad": "'
        for _ in range(DEFAULT_LIMITS.max_message_bytes // 4096 + 1):
            yield b"x" * 4096
        yield b'"}'

    with httpx.Client(base_url=server.url, timeout=120) as http:
        r = http.post("/v1/audio/speech", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_voice_object_and_openai_client(server: Server) -> None:
    r = post(server, {**HI, "voice": {"id": "alloy"}})
    assert r.status_code == 200 and len(r.content) > 0
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    audio = client.audio.speech.create(model="tts-1", voice="ash", input="Hello.", response_format="pcm")
    assert len(audio.content) > 0
    with pytest.raises(BadRequestError) as e:
        client.audio.speech.create(model="tts-1", voice="ash", input="Hello.", response_format="aac")
    assert e.value.status_code == 400
    server.wait_idle()


@pytest.mark.parametrize(
    "raw",
    [NESTED, b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"name": "x", "audio_base64": []}'],
    ids=["nested", "nested_field", "audio_base64_list"],
)
def test_voices_route_malformed_json_is_400(server: Server, raw: bytes) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/v1/audio/voices", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
