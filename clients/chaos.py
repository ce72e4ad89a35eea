"""Chaos mode of the load test (``python -m realtime bench --chaos``).

Reference sessions stream text at LLM rates exactly as the load test does, decoding greedily,
and every context's audio must equal, sample for sample, what its text gives alone
(:func:`clients.load.record_references`). Beside them, misbehaving clients each repeat one
kind of abuse until the references are done:

=================  ============================================================================
``garbage``        malformed frames (not JSON, wrong types, unknown types, binary garbage, bad
                   settings), each answered by a non-fatal ``error``; then a flood of them,
                   answered by a fatal ``invalid_message`` and close 4000
``surrogates``     lone UTF-16 surrogates (JSON ``"\\ud800"``) in text, context and event ids,
                   mark names, ping ids, voices, instructions and keys: each a non-fatal error
``oversize``       messages over the message limit, text over the per-context limit, ids over
                   theirs, and (once per client) a frame over the transport's limit
``idle_contexts``  every context the session may open, never fed, held; more than allowed
                   (``too_many_contexts``); then a graceful close or a dropped socket
``bad_sampling``   out-of-range sampling values (``temperature: 1e-300``, ``top_k: 2**63``...) in
                   ``session.update`` and ``context.create``: ``invalid_sampling`` (a context the
                   server accepts anyway is fed text, to see whether it breaks the batch); then
                   a context at the bounds (``temperature: 10``, ``top_p: 1e-300``...) that
                   must speak to its end beside the references
``stall``          a raw socket with a tiny receive buffer asks for much audio and never reads;
                   the server should close it (write timeout) and free its rows
``abort``          TCP resets and FINs mid-stream (WebSocket and HTTP), before and after audio
``churn``          connections opened and dropped at every step of the handshake, garbage HTTP
``http_speech``    bad ``POST /v1/audio/speech`` bodies (lone surrogates, ``response_format: []``,
                   100k-deep JSON, ``text/plain``, limits...): each a 4xx, never a 5xx
``http_voices``    the same for ``/v1/audio/voices``
``cancel``         valid barge-in churn: contexts cancelled before and after their first audio
=================  ============================================================================

Every behaviour is bounded (runs per client, seconds per run) and talks only to the loopback
address of the server under test; chaos against anything else is refused.

Reported: reference contexts exact / compared, failed references, their first-audio p50/p95
without chaos (a baseline of the same sessions first, same server) and with it; *internal
errors* (an ``error`` event with code ``internal``, a close 1011 or an HTTP 5xx, seen by any
client); *unexpected answers* (a bad request answered with something other than the precise
refusal the protocol promises, e.g. no error event, a 2xx, a session closed by a non-fatal
error, object reprs or tracebacks in a message); *leaks* (after each round, ``/health`` polled
until no stream is generating or queued and no session is open); counts per behaviour; the
server's RSS over the run (``--duration`` repeats rounds for a soak). The run passes when every
reference is exact and nothing leaked, failed internally or was answered unexpectedly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import multiprocessing
import os
import queue
import socket
import struct
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.client import ClientProtocol
from websockets.http11 import Response
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from clients.client import ClientError, ContextHandle, TTSClient
from clients.load import DEFAULT_TEXTS, LoadReport, References, percentile, record_references, run_load
from realtime.protocol import SUBPROTOCOL

LOOPBACK_NAMES: Final = frozenset({"localhost"})
SURROGATE: Final = "\\ud800"  # as it appears in JSON text: a lone high surrogate
LOW_SURROGATE: Final = "\\udc00"
SAMPLES_KEPT: Final = 20  # examples of each problem kept for the report
REPR_MARKERS: Final = ("object at 0x", "Traceback (most recent call last)", 'File "/')


# --------------------------------------------------------------------------------------------
# What the chaos clients saw


@dataclass
class KindStats:
    """What the clients of one misbehaviour did and what the server answered."""

    kind: str
    clients: int = 0
    runs: int = 0
    sent: int = 0  # messages, requests and connection attempts
    errors: Counter[str] = field(default_factory=Counter)  # `error` events by code
    closes: Counter[str] = field(default_factory=Counter)  # closes by code (1006: no close frame)
    http: Counter[str] = field(default_factory=Counter)  # HTTP responses by status
    notes: Counter[str] = field(default_factory=Counter)  # outcomes worth counting (e.g. stall ends)
    waits_s: list[float] = field(default_factory=list)  # stall: seconds until the server let go
    internal: int = 0
    unexpected: int = 0
    internal_samples: Counter[str] = field(default_factory=Counter)  # distinct ones, with counts
    unexpected_samples: Counter[str] = field(default_factory=Counter)

    def add_internal(self, what: str) -> None:
        self.internal += 1
        _keep(self.internal_samples, what)

    def add_unexpected(self, what: str) -> None:
        self.unexpected += 1
        _keep(self.unexpected_samples, what)

    def merge(self, other: KindStats) -> None:
        self.clients = max(self.clients, other.clients)
        self.runs += other.runs
        self.sent += other.sent
        self.internal += other.internal
        self.unexpected += other.unexpected
        self.waits_s += other.waits_s
        for mine, theirs in (
            (self.errors, other.errors), (self.closes, other.closes), (self.http, other.http),
            (self.notes, other.notes),
        ):  # fmt: skip
            mine.update(theirs)
        for what, n in other.internal_samples.items():
            _keep(self.internal_samples, what, n)
        for what, n in other.unexpected_samples.items():
            _keep(self.unexpected_samples, what, n)

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it rebuilds a Counter from its items, keyed by (key, count) pairs
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _keep(samples: Counter[str], what: str, n: int = 1) -> None:
    """Count ``what`` among the kept examples (at most SAMPLES_KEPT distinct ones)."""
    if what in samples or len(samples) < SAMPLES_KEPT:
        samples[what] += n


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Counter) else list(value) if isinstance(value, list) else value


class Abandon(Exception):
    """Ends a run early; what went wrong was already recorded."""


class Closed(Abandon):
    """The server closed the connection (``code`` 1006: without a close frame)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"closed with {code}{' ' + reason if reason else ''}")
        self.code = code
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Where the chaos goes


@dataclass(frozen=True)
class Target:
    """The server under test, reached on its loopback address only."""

    ws_url: str
    host: str
    port: int
    api_key: str | None = None

    @classmethod
    def from_url(cls, url: str, api_key: str | None = None) -> Target:
        """Refuses any address but loopback: misbehaving clients are for your own server."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        if host in LOOPBACK_NAMES:
            host = "127.0.0.1"
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if parts.scheme not in ("ws", "wss") or not loopback:
            raise ValueError(f"chaos runs only against a ws:// server on a loopback address, not {url!r}")
        if parts.scheme == "wss":
            raise ValueError("chaos needs a plain ws:// server (its raw sockets do not speak TLS)")
        port = parts.port or 80
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return cls(f"ws://{netloc}{parts.path or '/v1/tts/stream'}", host, port, api_key)

    @property
    def http_base(self) -> str:
        netloc = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"http://{netloc}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


@dataclass
class Probe:
    """One chaos client: its target, its counters, and the bounds of its runs."""

    target: Target
    stats: KindStats
    run: int = 0
    timeout: float = 30.0  # for any one answer
    stall_s: float = 60.0
    hold_s: float = 10.0  # the longest an idle behaviour holds its connection
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def hold(self) -> None:
        """Wait until the references are done or ``hold_s`` passed, whichever is first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), self.hold_s)

    def check_text(self, label: str, text: str) -> None:
        """Server messages must not leak object reprs or tracebacks."""
        if any(marker in text for marker in REPR_MARKERS):
            self.stats.add_unexpected(f"{label}: the message leaks internals: {text[:160]!r}")


# --------------------------------------------------------------------------------------------
# A WebSocket that checks what comes back


class Conn:
    """A WebSocket session driven message by message; every answer is recorded and checked."""

    def __init__(self, probe: Probe, ws: ClientConnection, created: dict[str, Any]) -> None:
        self.probe = probe
        self.ws = ws
        self.created = created
        self.limits: dict[str, Any] = dict(created.get("limits") or {})
        self._pings = 0
        self.closed: Closed | None = None

    @classmethod
    async def open(cls, probe: Probe) -> Conn:
        probe.stats.sent += 1
        try:
            ws = await ws_connect(
                probe.target.ws_url, subprotocols=[Subprotocol(SUBPROTOCOL)],
                additional_headers=probe.target.headers, max_size=64 << 20, open_timeout=probe.timeout,
                compression=None, ping_interval=None,
            )  # fmt: skip
        except websockets.InvalidStatus as e:
            status = e.response.status_code
            probe.stats.http[str(status)] += 1
            if status >= 500:
                probe.stats.add_internal(f"WebSocket handshake answered HTTP {status}")
            else:
                probe.stats.add_unexpected(f"WebSocket handshake refused with HTTP {status}")
            raise Abandon from None
        conn = cls(probe, ws, {})
        first = await conn.next()
        if not isinstance(first, dict) or first.get("type") != "session.created":
            await conn.abort()
            if isinstance(first, dict) and first.get("code") == "overloaded":
                probe.stats.notes["refused: overloaded"] += 1
            else:
                probe.stats.add_unexpected(f"the first message is not session.created: {str(first)[:120]}")
            raise Abandon
        conn.created = first
        conn.limits = dict(first.get("limits") or {})
        return conn

    def limit(self, name: str, default: int) -> int:
        value = self.limits.get(name, default)
        return value if isinstance(value, int) and value > 0 else default

    async def send(self, message: str | bytes | dict[str, Any]) -> None:
        if isinstance(message, dict):
            message = json.dumps(message)  # ensure_ascii: a lone surrogate stays an escape
        self.probe.stats.sent += 1
        try:
            await self.ws.send(message)
        except websockets.ConnectionClosed as e:
            raise self._on_closed(e) from None

    async def next(self, timeout: float | None = None) -> dict[str, Any] | bytes:
        """The next frame: a JSON object, or the bytes of a binary frame."""
        try:
            frame = await asyncio.wait_for(self.ws.recv(), timeout or self.probe.timeout)
        except websockets.ConnectionClosed as e:
            raise self._on_closed(e) from None
        except TimeoutError:
            self.probe.stats.add_unexpected(f"no answer within {timeout or self.probe.timeout:.0f} s")
            await self.abort()
            raise Abandon from None
        if isinstance(frame, bytes):
            return frame
        try:
            obj = json.loads(frame)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            self.probe.stats.add_unexpected(f"a text frame that is not a JSON object: {frame[:120]!r}")
            return {}
        if obj.get("type") == "error":
            self._on_error(obj)
        return obj

    def _on_error(self, event: dict[str, Any]) -> None:
        code = str(event.get("code"))
        message = str(event.get("message", ""))
        self.probe.stats.errors[code] += 1
        if code == "internal":
            self.probe.stats.add_internal(f"error internal: {message[:160]}")
        self.probe.check_text(f"error {code}", message)

    def _on_closed(self, e: websockets.ConnectionClosed) -> Closed:
        code = e.rcvd.code if e.rcvd is not None else 1006
        reason = e.rcvd.reason if e.rcvd is not None else ""
        if self.closed is None:
            self.probe.stats.closes[str(code)] += 1
            if code == 1011:
                self.probe.stats.add_internal(f"close 1011 {reason}".strip())
            self.closed = Closed(code, reason)
        return self.closed

    async def barrier(self) -> list[dict[str, Any]]:
        """Send a ping and return the events that arrive before its pong (audio is skipped):
        the server answers in order, so these are the answers to everything sent before."""
        self._pings += 1
        pid = f"barrier-{self._pings}"
        await self.send({"type": "ping", "id": pid})
        events: list[dict[str, Any]] = []
        while True:
            frame = await self.next()
            if isinstance(frame, bytes):
                continue
            if frame.get("type") == "pong" and frame.get("id") == pid:
                return events
            events.append(frame)

    async def expect_error(
        self, label: str, message: str | bytes | dict[str, Any], codes: Collection[str] | None = None
    ) -> dict[str, Any] | None:
        """Send ``message``; the server must answer a non-fatal ``error`` (with one of ``codes``)
        and keep the session."""
        await self.send(message)
        try:
            events = await self.barrier()
        except Closed as e:
            self.probe.stats.add_unexpected(f"{label}: the session was closed ({e.code}) instead of an error")
            raise
        errors = [e for e in events if e.get("type") == "error"]
        if not errors:
            self.probe.stats.add_unexpected(f"{label}: accepted, expected an error")
            return None
        error = errors[0]
        if codes is not None and error.get("code") not in codes:
            want = "/".join(sorted(codes))
            self.probe.stats.add_unexpected(f"{label}: error {error.get('code')!r}, expected {want}")
        if error.get("fatal"):
            self.probe.stats.add_unexpected(f"{label}: the error is fatal")
        return error

    async def expect_events(self, label: str, message: dict[str, Any], kind: str, count: int = 1) -> None:
        """Send ``message``; ``count`` events of type ``kind`` (and no error) must answer it."""
        await self.send(message)
        events = await self.barrier()
        got = sum(e.get("type") == kind for e in events)
        errors = [f"{e.get('code')}: {e.get('message')}" for e in events if e.get("type") == "error"]
        if got < count or errors:
            self.probe.stats.add_unexpected(f"{label}: {got} {kind} (wanted {count}), errors {errors[:2]}")

    async def wait_for(self, kinds: Collection[str], label: str) -> dict[str, Any]:
        """Read until an event of one of ``kinds``."""
        while True:
            frame = await self.next()
            if isinstance(frame, dict) and frame.get("type") in kinds:
                return frame
            if isinstance(frame, dict) and frame.get("type") == "error" and frame.get("fatal"):
                self.probe.stats.add_unexpected(f"{label}: fatal error {frame.get('code')}")
                raise Abandon

    async def wait_audio(self) -> None:
        """Read until the first binary frame."""
        while not isinstance(await self.next(), bytes):
            pass

    async def close(self) -> None:
        """A graceful end: ``session.close``, then the server closes (1000) after finishing."""
        if self.closed is not None:
            return
        try:
            await self.send({"type": "session.close"})
            while True:
                await self.next()
        except Closed as e:
            if e.code != 1000:
                self.probe.stats.add_unexpected(f"session.close ended with close {e.code}")
        finally:
            await self.abort()

    async def abort(self, *, reset: bool = True) -> None:
        """Drop the TCP connection without a close handshake (an RST with ``reset``, else FIN)."""
        transport = self.ws.transport
        if reset:
            _linger_zero(transport.get_extra_info("socket"))
            transport.abort()
        else:
            transport.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.wait_closed(), 5)


def _linger_zero(sock: Any) -> None:
    """Make close() send an RST (an abrupt abort) instead of a FIN."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@contextlib.asynccontextmanager
async def session(probe: Probe) -> AsyncIterator[Conn]:
    """A session that is dropped (RST) on the way out unless the body closed it."""
    conn = await Conn.open(probe)
    try:
        yield conn
    finally:
        if conn.closed is None:
            await conn.abort()


# --------------------------------------------------------------------------------------------
# A raw WebSocket whose reading we control (stall, handshake churn)


class RawWS:
    """A WebSocket over a plain non-blocking socket (websockets' sans-I/O protocol): nothing is
    read unless asked, so the kernel's receive buffer fills and stays full."""

    def __init__(self, sock: socket.socket, proto: ClientProtocol) -> None:
        self.sock = sock
        self.proto = proto
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def connect(
        cls, target: Target, *, rcvbuf: int | None = None, handshake: bool = True, timeout: float = 30.0
    ) -> RawWS:
        sock = socket.socket(target.family, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:  # before connect, so the window is negotiated small
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, (target.host, target.port)), timeout)
            proto = ClientProtocol(
                parse_uri(target.ws_url), subprotocols=[Subprotocol(SUBPROTOCOL)], max_size=None
            )
            request = proto.connect()
            for name, value in target.headers.items():
                request.headers[name] = value
            proto.send_request(request)
            raw = cls(sock, proto)
            await raw.flush()
            if handshake:
                await asyncio.wait_for(raw._handshake(), timeout)
            return raw
        except BaseException:
            _linger_zero(sock)
            sock.close()
            raise

    async def _handshake(self) -> None:
        while True:
            data = await self.loop.sock_recv(self.sock, 4096)
            if not data:
                raise ConnectionError("the server closed the connection during the handshake")
            self.proto.receive_data(data)
            for event in self.proto.events_received():
                if isinstance(event, Response):
                    if event.status_code != 101:
                        raise ConnectionError(f"handshake answered HTTP {event.status_code}")
                    return

    async def flush(self) -> None:
        for chunk in self.proto.data_to_send():
            if chunk:
                await self.loop.sock_sendall(self.sock, chunk)

    async def send_json(self, message: dict[str, Any]) -> None:
        self.proto.send_text(json.dumps(message).encode())
        await self.flush()

    def tcp_state(self) -> int | None:
        """The kernel's TCP state of this end (Linux): 1 established, 7 closed (reset), 8
        close-wait (the peer's FIN arrived). Read without reading any data."""
        tcp_info = getattr(socket, "TCP_INFO", None)
        if tcp_info is None:
            return None
        try:
            return self.sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 8)[0]
        except OSError:
            return None

    def server_closed(self) -> str | None:
        """Whether the server closed its end, read from both ends' kernel state (the server is on
        this machine: chaos is loopback only). A FIN queued behind data this client never read
        does not reach this end, so the server's end in /proc/net/tcp is what shows it.
        Returns how it ended, or None while it is open (or when it cannot be told)."""
        if self.tcp_state() in (7, 8):
            return "reset" if self.tcp_state() == 7 else "closed"
        try:
            client_port = self.sock.getsockname()[1]
            server_port = self.sock.getpeername()[1]
        except OSError:
            return "reset"
        state = server_tcp_state(server_port, client_port)
        if state is None:
            return None
        return None if state == 1 else "closed"

    async def drain(self, timeout: float) -> int | None:
        """Read everything until the server closes; returns its close code (1006 without a close
        frame), or None when it is still open after ``timeout`` seconds without data."""
        while True:
            try:
                data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 1 << 16), timeout)
            except TimeoutError:
                return None
            except OSError:  # reset by the server
                return 1006
            if not data:
                break
            self.proto.receive_data(data)
            self.proto.events_received()  # parsed and dropped
        self.proto.receive_eof()
        rcvd = self.proto.close_rcvd
        return rcvd.code if rcvd is not None else 1006

    def abort(self) -> None:
        _linger_zero(self.sock)
        self.sock.close()


# The TCP states of /proc/net/tcp (include/net/tcp_states.h).
_TCP_CLOSE = 7


def server_tcp_state(server_port: int, client_port: int) -> int | None:
    """The kernel TCP state of the server's end of a loopback connection (Linux), ``_TCP_CLOSE``
    when it has no entry any more, None when /proc/net/tcp cannot be read."""
    found_table = False
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        found_table = True
        for line in lines:
            fields = line.split()
            if len(fields) < 4:
                continue
            local, remote = fields[1].rsplit(":", 1)[1], fields[2].rsplit(":", 1)[1]
            if int(local, 16) == server_port and int(remote, 16) == client_port:
                return int(fields[3], 16)
    return _TCP_CLOSE if found_table else None


# --------------------------------------------------------------------------------------------
# The behaviours. Each is one bounded run; the client repeats it until the references are done.

GARBAGE: Final[list[tuple[str, str | bytes | dict[str, Any], set[str] | None]]] = [
    ("not JSON", "hello there", {"invalid_json"}),
    ("truncated JSON", '{"type": "text.append", "text": "a"', {"invalid_json"}),
    ("NaN", '{"type": "session.update", "sampling": {"temperature": NaN}}', {"invalid_json"}),
    ("empty text frame", "", {"invalid_json"}),
    ("binary garbage", b"\x00\xff\xfe not audio", {"invalid_json"}),
    ("a JSON array", "[1, 2, 3]", {"invalid_message"}),
    ("a JSON string", '"text.append"', {"invalid_message"}),
    ("no type", {"text": "hello"}, {"invalid_message"}),
    ("type is a number", {"type": 5}, {"invalid_message", "unknown_type"}),
    ("unknown type", {"type": "text.shout"}, {"unknown_type"}),
    ("text is a number", {"type": "text.append", "text": 5}, {"invalid_message"}),
    ("context_id is a list", {"type": "text.append", "context_id": ["a"], "text": "hi"}, {"invalid_message"}),
    ("flush of no context", {"type": "text.flush", "context_id": "never-opened"}, {"invalid_message"}),
    ("end of no context", {"type": "text.end", "context_id": "never-opened"}, {"invalid_message"}),
    ("cancel of no context", {"type": "context.cancel", "context_id": "never-opened"}, {"invalid_message"}),
    ("unknown voice", {"type": "session.update", "voice": "nobody-at-all"}, {"invalid_voice"}),
    ("voice is a number", {"type": "session.update", "voice": 7}, {"invalid_voice"}),
    ("unknown language", {"type": "session.update", "language": "klingon"}, {"invalid_language"}),
    ("unknown encoding", {"type": "session.update", "output": {"encoding": "mp3"}}, {"invalid_output"}),
    ("sample rate 1 Hz", {"type": "session.update", "output": {"sample_rate": 1}}, {"invalid_output"}),
    ("output is a string", {"type": "session.update", "output": "loud"}, {"invalid_output"}),
    ("chunk_schedule [0]", {"type": "session.update", "chunk_schedule": [0]}, {"invalid_message"}),
    ("chunk_size 10**9", {"type": "session.update", "chunk_size": 10**9}, {"invalid_message"}),
    ("idle_flush_ms -1", {"type": "session.update", "text": {"idle_flush_ms": -1}}, {"invalid_message"}),
    ("sampling is a list", {"type": "session.update", "sampling": [1]}, {"invalid_sampling"}),
]
FLOOD: Final = 80  # malformed messages in a row: past the server's 64, a fatal error and close 4000


async def garbage(probe: Probe) -> None:
    async with session(probe) as conn:
        for label, message, codes in GARBAGE:
            await conn.expect_error(label, message, codes)
        for _ in range(FLOOD):
            await conn.send("{not json")
        fatal: dict[str, Any] | None = None
        try:
            while True:
                frame = await conn.next()
                if isinstance(frame, dict) and frame.get("type") == "error" and frame.get("fatal"):
                    fatal = frame
        except Closed as e:
            if fatal is None or e.code < 4000:
                probe.stats.add_unexpected(
                    f"a flood of {FLOOD} malformed messages: close {e.code}, fatal error {fatal}"
                )


def _surrogate_messages() -> list[tuple[str, str]]:
    s, low = SURROGATE, LOW_SURROGATE
    return [
        ("text", f'{{"type":"text.append","context_id":"s-text","text":"Hi {s}"}}'),
        ("low surrogate text", f'{{"type":"text.append","context_id":"s-low","text":"{low} there"}}'),
        ("context_id", f'{{"type":"text.append","context_id":"c{s}","text":"Hi"}}'),
        ("event_id", f'{{"type":"text.flush","context_id":"nope","event_id":"{s}"}}'),
        ("ping id", f'{{"type":"ping","id":"{s}"}}'),
        ("voice", f'{{"type":"session.update","voice":"{s}"}}'),
        ("instructions", f'{{"type":"session.update","instructions":"{s}"}}'),
        ("language", f'{{"type":"session.update","language":"{s}"}}'),
        ("key", f'{{"type":"session.update","{s}":1}}'),
        ("create id", f'{{"type":"context.create","context_id":"{s}"}}'),
        ("cancel id", f'{{"type":"context.cancel","context_id":"{s}"}}'),
    ]


async def surrogates(probe: Probe) -> None:
    async with session(probe) as conn:
        for label, message in _surrogate_messages():
            await conn.expect_error(f"lone surrogate in {label}", message)
        # a mark name needs an open context
        await conn.expect_events(
            "context.create", {"type": "context.create", "context_id": "m"}, "context.started"
        )
        await conn.expect_error(
            "lone surrogate in a mark name", f'{{"type":"mark","context_id":"m","name":"x{SURROGATE}"}}'
        )
        await conn.expect_error(
            "lone surrogate in text of an open context",
            f'{{"type":"text.append","context_id":"m","text":"Hello {SURROGATE}"}}',
        )
        await conn.send({"type": "context.cancel", "context_id": "m"})
        await conn.wait_for({"context.cancelled", "context.done"}, "cancel after surrogates")
        await conn.close()


async def oversize(probe: Probe) -> None:
    async with session(probe) as conn:
        max_message = conn.limit("max_message_bytes", 256 * 1024)
        max_text = conn.limit("max_text_bytes_per_context", 64 * 1024)
        max_id = conn.limit("max_context_id_chars", 256)
        max_name = conn.limit("max_name_chars", 256)
        await conn.expect_error(
            "a message over the message limit",
            {"type": "text.append", "context_id": "big", "text": "a" * (max_message + 1024)},
            {"message_too_large"},
        )
        if max_text + 200 < max_message:
            await conn.expect_error(
                "one text.append over the text limit",
                {"type": "text.append", "context_id": "big", "text": "a" * (max_text + 1)},
                {"text_too_large"},
            )
        await conn.expect_error(
            "a context_id over its limit",
            {"type": "text.append", "context_id": "i" * (max_id + 1), "text": "Hi"},
            {"invalid_message"},
        )
        await conn.expect_error(
            "a voice name over its limit",
            {"type": "session.update", "voice": "v" * (max_name + 1)},
            {"invalid_voice", "invalid_message"},
        )
        # The per-context budget: two appends that fit alone but not together. The first one
        # starts generating; the context is cancelled right after the refusal.
        half = "word " * ((max_text // 2 + 64) // 5)
        await conn.expect_events(
            "first half of the text budget", {"type": "text.append", "context_id": "sum", "text": half},
            "context.started",
        )  # fmt: skip
        await conn.expect_error(
            "text over the per-context budget", {"type": "text.append", "context_id": "sum", "text": half},
            {"text_too_large"},
        )  # fmt: skip
        await conn.send({"type": "context.cancel", "context_id": "sum"})
        await conn.wait_for({"context.cancelled", "context.done"}, "cancel of the budget context")
        await conn.expect_error("a 1 MiB frame", b"{" + b" " * (1 << 20) + b"}", {"message_too_large"})
        if probe.run == 1:  # once per client: past the transport's own limit (16 MiB)
            try:
                await conn.send(b"[" + b"0," * (17 << 19) + b"0]")
                events = await conn.barrier()
                codes = [e.get("code") for e in events if e.get("type") == "error"]
                if "message_too_large" not in codes:
                    probe.stats.add_unexpected(f"a 17 MiB frame: errors {codes}, expected message_too_large")
            except Closed as e:
                if e.code != 1009:
                    probe.stats.add_unexpected(f"a 17 MiB frame: close {e.code}, expected 1009 or an error")
                return
        await conn.close()


async def idle_contexts(probe: Probe) -> None:
    async with session(probe) as conn:
        allowed = conn.limit("max_contexts", 4)
        for i in range(allowed):
            await conn.expect_events(
                f"idle context {i}", {"type": "context.create", "context_id": f"idle-{i}"}, "context.started"
            )
        for i in range(2):
            await conn.expect_error(
                f"context {allowed + i + 1} of {allowed} allowed",
                {"type": "context.create", "context_id": f"extra-{i}"}, {"too_many_contexts"},
            )  # fmt: skip
        await probe.hold()
        if probe.run % 2:
            await conn.close()  # finishes the empty contexts, then 1000
        else:
            await conn.abort()


# Outside the documented bounds (temperature 0 or [0.01, 10], top_k [0, 65536], top_p (0, 1],
# repetition_penalty [0.1, 10], seed [0, 2**64)): each must be refused with invalid_sampling.
BAD_SAMPLING: Final[list[tuple[str, Any]]] = [
    ("temperature", 1e-300), ("temperature", 1e308), ("temperature", -1), ("temperature", "hot"),
    ("temperature", 0.001), ("repetition_penalty", 1e-300), ("repetition_penalty", 0),
    ("repetition_penalty", 1e308), ("top_k", 2**63), ("top_k", -1), ("top_k", 1.5), ("top_p", 0),
    ("top_p", 2), ("top_p", -1e-300), ("seed", 2**64), ("seed", -1),
]  # fmt: skip
# At the bounds: each must be accepted and speak without failing anyone (a numerically safe sampler).
EDGE_SAMPLING: Final[list[dict[str, Any]]] = [
    {"temperature": 0.01}, {"temperature": 10}, {"top_p": 1e-300}, {"top_k": 1}, {"top_k": 65536},
    {"repetition_penalty": 0.1}, {"repetition_penalty": 10}, {"temperature": 10, "top_k": 0, "top_p": 1},
    {"temperature": 0.01, "repetition_penalty": 10, "top_p": 1e-300},
]  # fmt: skip


async def bad_sampling(probe: Probe) -> None:
    async with session(probe) as conn:
        for name, value in BAD_SAMPLING:
            label = f"sampling.{name} = {value!r}"
            await conn.expect_error(
                f"session.update {label}",
                {"type": "session.update", "sampling": {name: value}},
                {"invalid_sampling"},
            )
            error = await conn.expect_error(
                f"context.create {label}",
                {"type": "context.create", "context_id": f"bad-{name}-{value}", "sampling": {name: value}},
                {"invalid_sampling"},
            )  # fmt: skip
            if error is None:  # accepted: make it generate beside everyone else and see what breaks
                await _speak_raw(conn, f"bad-{name}-{value}", f"accepted {label}", "bad sampling accepted")
        # one extreme but valid setting per run: it must speak beside the references, not fail them
        sampling = EDGE_SAMPLING[probe.run % len(EDGE_SAMPLING)]
        await conn.expect_events(
            f"context.create sampling {sampling}",
            {"type": "context.create", "context_id": "edge", "sampling": sampling}, "context.started",
        )  # fmt: skip
        await _speak_raw(conn, "edge", f"sampling {sampling}", "edge sampling")
        await conn.close()


async def _speak_raw(conn: Conn, cid: str, label: str, note: str) -> None:
    await conn.send({"type": "text.append", "context_id": cid, "text": "Hello there."})
    await conn.send({"type": "text.end", "context_id": cid})
    done = await conn.wait_for({"context.done", "context.cancelled"}, f"a context with {label}")
    conn.probe.stats.notes[f"{note}: {done.get('type')}"] += 1


async def stall(probe: Probe) -> None:
    """Ask for lots of audio on a socket that is never read; the server must let go.

    The server's socket buffer alone takes up to 4 MiB on Linux (tcp_wmem), so the client asks
    for ~7 MiB: float32 at 48 kHz, every context it may open, several utterances each.
    """
    raw = await RawWS.connect(probe.target, rcvbuf=4096, timeout=probe.timeout)
    probe.stats.sent += 1
    try:
        await raw.send_json(
            {"type": "session.update", "output": {"encoding": "pcm_f32le", "sample_rate": 48000}}
        )
        for i in range(4):
            cid = f"stall-{i}"
            for text in DEFAULT_TEXTS:
                await raw.send_json({"type": "text.append", "context_id": cid, "text": text})
                await raw.send_json({"type": "text.flush", "context_id": cid})
            await raw.send_json({"type": "text.end", "context_id": cid})
        probe.stats.sent += 5 + 4 * 2 * len(DEFAULT_TEXTS)
        t0 = time.perf_counter()
        how = raw.server_closed()
        while how is None and time.perf_counter() - t0 < probe.stall_s:
            await asyncio.sleep(0.1)
            how = raw.server_closed()
        if how is None:
            probe.stats.notes[f"still open after {probe.stall_s:.0f} s without reading"] += 1
            return
        probe.stats.notes[f"{how} by the server"] += 1
        probe.stats.waits_s.append(round(time.perf_counter() - t0, 2))
        code = await raw.drain(probe.timeout)
        if code is not None:
            probe.stats.closes[str(code)] += 1
            if code == 1011:
                probe.stats.add_internal("a stalled client was closed with 1011")
    finally:
        raw.abort()


async def abort(probe: Probe) -> None:
    """Leave abruptly: the server must cancel everything and free the rows."""
    variant = probe.run % 4
    if variant == 3:
        await _abort_http(probe)
        return
    conn = await Conn.open(probe)
    try:
        await conn.send({"type": "text.append", "context_id": "a", "text": DEFAULT_TEXTS[probe.run % 6]})
        await conn.send({"type": "text.end", "context_id": "a"})
        if variant == 0:
            await conn.wait_audio()  # mid-stream
        elif variant == 1:
            await conn.wait_for({"context.started"}, "abort")  # before any audio
    finally:
        await conn.abort(reset=variant != 2)  # variant 2: a FIN without a close frame


async def _abort_http(probe: Probe) -> None:
    async with httpx.AsyncClient(base_url=probe.target.http_base, timeout=probe.timeout) as client:
        probe.stats.sent += 1
        body = {"input": DEFAULT_TEXTS[0], "response_format": "pcm"}
        async with client.stream("POST", "/v1/audio/speech", json=body, headers=probe.target.headers) as r:
            probe.stats.http[str(r.status_code)] += 1
            if r.status_code >= 500:
                probe.stats.add_internal(f"valid speech request: HTTP {r.status_code}")
                return
            async for _ in r.aiter_raw():
                break  # the first bytes of audio, then drop the connection


async def churn(probe: Probe) -> None:
    """Connections dropped at every step: TCP only, mid-handshake, right after it, clean."""
    target = probe.target
    loop = asyncio.get_running_loop()
    for step in range(8):
        probe.stats.sent += 1
        if step in (0, 1):  # TCP connect, then FIN or RST
            sock = socket.socket(target.family, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, (target.host, target.port)), probe.timeout)
            finally:
                if step == 1:
                    _linger_zero(sock)
                sock.close()
        elif step in (2, 3):  # the upgrade request sent, the answer never read; or after it
            raw = await RawWS.connect(target, handshake=step == 3, timeout=probe.timeout)
            raw.abort()
        elif step in (4, 5):  # a full session, closed by the client at once (clean, or reset)
            conn = await Conn.open(probe)
            if step == 4:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await conn.ws.close()
                code = conn.ws.close_code
                if code is not None and code not in (1000, 1005):
                    probe.stats.add_unexpected(f"a client close answered with {code}")
            await conn.abort()
        else:  # garbage HTTP on the same port
            await _raw_http(
                probe, b"GARBAGE / HTTP/1.1\r\n\r\n" if step == 6 else b"\x16\x03\x01\x00\xa5\x01"
            )


async def _raw_http(probe: Probe, request: bytes) -> None:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(probe.target.host, probe.target.port), probe.timeout
    )
    try:
        writer.write(request)
        await writer.drain()
        with contextlib.suppress(ConnectionError, TimeoutError):
            line = await asyncio.wait_for(reader.readline(), probe.timeout)
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                status = int(parts[1])
                probe.stats.http[str(status)] += 1
                if status >= 500:
                    probe.stats.add_internal(f"garbage HTTP {request[:12]!r}: HTTP {status}")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


def _speech_requests() -> list[tuple[str, bytes, str]]:
    """(label, body, content type) of bad speech requests; each must get a 4xx."""
    s = SURROGATE.encode()
    j = "application/json"
    return [
        ("a lone surrogate in input", b'{"input": "Hi ' + s + b'", "voice": "ryan"}', j),
        ("a lone surrogate in voice", b'{"input": "Hi", "voice": "' + s + b'"}', j),
        ("a lone surrogate in instructions", b'{"input": "Hi", "instructions": "' + s + b'"}', j),
        ("a lone surrogate in language", b'{"input": "Hi", "language": "' + s + b'"}', j),
        ("response_format []", b'{"input": "Hi", "response_format": []}', j),
        ("response_format {}", b'{"input": "Hi", "response_format": {}}', j),
        ("stream_format []", b'{"input": "Hi", "stream_format": []}', j),
        ("100k-deep JSON", _deep(100_000), j),
        ("100k-deep JSON in input", b'{"input": ' + _deep(100_000) + b"}", j),
        ("a text/plain body", b'{"input": "Hi"}', "text/plain"),
        ("a form body", b"input=Hi", "application/x-www-form-urlencoded"),
        ("invalid UTF-8", b'{"input": "Hi \xff\xfe"}', j),
        ("an empty body", b"", j),
        ("null", b"null", j),
        ("a list", b"[]", j),
        ("input is a number", b'{"input": 5}', j),
        ("input is empty", b'{"input": ""}', j),
        ("input is too long", json.dumps({"input": "a" * 70_000}).encode(), j),
        ("instructions over 8 KiB", json.dumps({"input": "Hi", "instructions": "x" * 9000}).encode(), j),
        ("an unknown voice", b'{"input": "Hi", "voice": "nobody-at-all"}', j),
        ("speed is a string", b'{"input": "Hi", "speed": "fast"}', j),
        ("speed 100", b'{"input": "Hi", "speed": 100}', j),
        ("NaN speed", b'{"input": "Hi", "speed": NaN}', j),
        ("stream_format video", b'{"input": "Hi", "stream_format": "video"}', j),
    ]


def _voices_requests() -> list[tuple[str, str, str, bytes, str]]:
    """(label, method, path, body, content type) of bad voice requests; each must get a 4xx."""
    s = SURROGATE.encode()
    j = "application/json"
    garbage_audio = base64.b64encode(b"RIFF\x00\x00\x00\x00WAVEnot really").decode()
    return [
        ("100k-deep JSON", "POST", "/v1/audio/voices", _deep(100_000), j),
        ("a text/plain body", "POST", "/v1/audio/voices", b'{"name": "x", "audio_base64": "AAAA"}', "text/plain"),
        ("a lone surrogate in name", "POST", "/v1/audio/voices", b'{"name": "' + s + b'", "audio_base64": "AAAA"}', j),
        ("a lone surrogate in ref_text", "POST", "/v1/audio/voices",
         b'{"name": "x", "audio_base64": "AAAA", "ref_text": "' + s + b'"}', j),
        ("audio that is not base64", "POST", "/v1/audio/voices", b'{"name": "x", "audio_base64": "!!!"}', j),
        ("audio that is not audio", "POST", "/v1/audio/voices",
         json.dumps({"name": "x", "audio_base64": garbage_audio}).encode(), j),
        ("a list", "POST", "/v1/audio/voices", b"[]", j),
        ("invalid UTF-8", "POST", "/v1/audio/voices", b'{"name": "\xff"}', j),
        ("a voice id with an encoded surrogate", "DELETE", "/v1/audio/voices/%ED%A0%80", b"", j),
        ("an unknown voice id", "DELETE", "/v1/audio/voices/no-such-voice", b"", j),
    ]  # fmt: skip


async def _expect_4xx(
    probe: Probe,
    client: httpx.AsyncClient,
    label: str,
    method: str,
    path: str,
    body: bytes,
    content_type: str,
) -> None:
    probe.stats.sent += 1
    headers = {**probe.target.headers, "Content-Type": content_type}
    r = await client.request(method, path, content=body, headers=headers)
    probe.stats.http[str(r.status_code)] += 1
    text = r.text[:2000] if not r.headers.get("content-type", "").startswith("audio/") else ""
    if r.status_code >= 500:
        probe.stats.add_internal(f"{method} {path} with {label}: HTTP {r.status_code} {text[:120]!r}")
    elif r.status_code < 400:
        probe.stats.add_unexpected(f"{method} {path} with {label}: HTTP {r.status_code}, expected a 4xx")
    probe.check_text(f"{method} {path} with {label}", text)


async def http_speech(probe: Probe) -> None:
    async with httpx.AsyncClient(base_url=probe.target.http_base, timeout=probe.timeout) as client:
        for label, body, content_type in _speech_requests():
            await _expect_4xx(probe, client, label, "POST", "/v1/audio/speech", body, content_type)


async def http_voices(probe: Probe) -> None:
    async with httpx.AsyncClient(base_url=probe.target.http_base, timeout=probe.timeout) as client:
        probe.stats.sent += 1
        r = await client.get("/v1/audio/voices", headers=probe.target.headers)
        probe.stats.http[str(r.status_code)] += 1
        if r.status_code != 200:
            (probe.stats.add_internal if r.status_code >= 500 else probe.stats.add_unexpected)(
                f"GET /v1/audio/voices: HTTP {r.status_code}"
            )
        for label, method, path, body, content_type in _voices_requests():
            await _expect_4xx(probe, client, label, method, path, body, content_type)


async def cancel(probe: Probe) -> None:
    """Valid barge-in churn, with the client's conformance checks (no audio after a cancel)."""
    async with TTSClient.connect(probe.target.ws_url, probe.target.api_key, strict=False) as client:
        probe.stats.sent += 1
        for i in range(3):
            ctx = client.context()
            await ctx.append(DEFAULT_TEXTS[(probe.run + i) % len(DEFAULT_TEXTS)])
            probe.stats.sent += 2
            if i % 2:
                await _first_audio(ctx, probe.timeout)
            await ctx.cancel()
            await _consume(ctx, probe)
        for v in client.violations:
            probe.stats.add_unexpected(f"protocol violation: {v}")


async def _first_audio(ctx: ContextHandle, timeout: float) -> None:
    async def first() -> None:
        while not ctx.first_audio_at and not ctx.finished:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(first(), timeout)


async def _consume(ctx: ContextHandle, probe: Probe) -> None:
    async def drain() -> None:
        async for _ in ctx:
            pass

    try:
        await asyncio.wait_for(drain(), probe.timeout)
    except ClientError as e:
        code = getattr(e, "code", None)
        probe.stats.errors[str(code)] += 1
        if code == "internal" or code == 1011:
            probe.stats.add_internal(f"cancel: {e}")
        else:
            probe.stats.add_unexpected(f"cancel: {type(e).__name__}: {e}")


Behaviour = Callable[[Probe], Awaitable[None]]
KINDS: Final[dict[str, Behaviour]] = {
    "garbage": garbage,
    "surrogates": surrogates,
    "oversize": oversize,
    "idle_contexts": idle_contexts,
    "bad_sampling": bad_sampling,
    "stall": stall,
    "abort": abort,
    "churn": churn,
    "http_speech": http_speech,
    "http_voices": http_voices,
    "cancel": cancel,
}


@dataclass(frozen=True)
class ChaosSettings:
    """Bounds of the misbehaving clients."""

    clients: int = 32
    kinds: tuple[str, ...] = tuple(KINDS)
    max_runs: int = 1000  # per client and round
    run_timeout: float = 60.0  # seconds one run may take (stall: plus stall_s)
    answer_timeout: float = 30.0  # seconds any one answer may take
    stall_s: float = 60.0  # how long a stalled client waits for the server to close it
    hold_s: float = 10.0  # how long idle contexts are held at most
    pause_s: float = 0.2  # between runs, so chaos does not become a CPU benchmark of the client
    warmup_s: float = 2.0  # chaos runs this long before the reference sessions start


async def _chaos_client(
    kind: str, index: int, target: Target, stats: KindStats, stop: asyncio.Event, settings: ChaosSettings
) -> None:
    """Repeat one behaviour until ``stop`` (at least once), each run bounded in time."""
    behaviour = KINDS[kind]
    probe = Probe(
        target, stats, timeout=settings.answer_timeout, stall_s=settings.stall_s, hold_s=settings.hold_s,
        stop=stop,
    )  # fmt: skip
    limit = settings.run_timeout + (settings.stall_s if kind == "stall" else 0.0)
    await asyncio.sleep(settings.pause_s * index / max(1, settings.clients))  # spread the starts
    while probe.run < settings.max_runs and (probe.run == 0 or not stop.is_set()):
        probe.run += 1
        stats.runs += 1
        try:
            await asyncio.wait_for(behaviour(probe), limit)
        except Abandon:
            pass  # recorded where it happened
        except TimeoutError:
            stats.add_unexpected(f"a run did not finish within {limit:.0f} s")
        except ClientError as e:
            if "1011" in str(e) or "internal" in str(e):
                stats.add_internal(f"{type(e).__name__}: {e}")
            else:
                stats.add_unexpected(f"{type(e).__name__}: {e}")
        except (OSError, websockets.WebSocketException, httpx.HTTPError) as e:
            stats.add_unexpected(f"{type(e).__name__}: {e}")
        if not stop.is_set():
            await asyncio.sleep(settings.pause_s)


# --------------------------------------------------------------------------------------------
# The server's state: leaks and memory


async def health(target: Target, client: httpx.AsyncClient) -> dict[str, Any]:
    r = await client.get(f"{target.http_base}/health", headers=target.headers)
    return dict(r.json()) if r.status_code == 200 else {"status": r.status_code}


async def settle(target: Target, timeout: float) -> dict[str, Any]:
    """Poll ``/health`` until no stream is generating or queued and no session is open, or until
    ``timeout``; returns what remained (all 0 when nothing leaked) and how long it took."""
    t0 = time.perf_counter()
    last: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=10.0) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                last = await health(target, client)
            left = {k: last.get(k) for k in ("streams", "queued_streams", "sessions")}
            if all(v == 0 for v in left.values()) or time.perf_counter() - t0 > timeout:
                return {**left, "waited_s": round(time.perf_counter() - t0, 2)}
            await asyncio.sleep(0.2)


def leaked(leftover: dict[str, Any]) -> bool:
    return any(leftover.get(k) != 0 for k in ("streams", "queued_streams", "sessions"))


def rss_in_process() -> int | None:
    """This process's resident set (VmRSS), in bytes (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


async def rss_from_metrics(target: Target) -> int | None:
    """The server's ``process_resident_memory_bytes`` from /metrics (prometheus_client, Linux)."""
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            r = await client.get(f"{target.http_base}/metrics", headers=target.headers)
    except httpx.HTTPError:
        return None
    for line in r.text.splitlines():
        if line.startswith("process_resident_memory_bytes "):
            return int(float(line.split()[1]))
    return None


@dataclass
class RSSReport:
    source: str
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds from start, bytes)

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"source": self.source, "samples": 0}
        values = [v for _, v in self.samples]
        t_end = self.samples[-1][0]
        half = [(t, v) for t, v in self.samples if t >= t_end / 2]
        return {
            "source": self.source,
            "samples": len(self.samples),
            "start_mib": values[0] / 2**20,
            "max_mib": max(values) / 2**20,
            "end_mib": values[-1] / 2**20,
            "last_half_slope_mib_per_min": _slope(half) * 60 / 2**20 if len(half) >= 2 else None,
        }


def _slope(points: Sequence[tuple[float, int]]) -> float:
    """Least-squares slope (units per second)."""
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 0.0 if var == 0 else sum((t - mt) * (v - mv) for t, v in points) / var


async def sample_rss(read: Callable[[], Awaitable[int | None]], report: RSSReport, interval: float) -> None:
    t0 = time.perf_counter()
    while True:
        value = await read()
        if value is not None:
            report.samples.append((round(time.perf_counter() - t0, 2), value))
        await asyncio.sleep(interval)


class ErrorLog(logging.Handler):
    """Counts the server's ERROR log records (in-process servers only), keeping a few."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.samples) < SAMPLES_KEPT:
            with contextlib.suppress(Exception):
                first = record.getMessage().splitlines()[0][:200]
                exc = f" ({record.exc_info[0].__name__})" if record.exc_info and record.exc_info[0] else ""
                self.samples.append(f"{record.name}: {first}{exc}")


@contextlib.contextmanager
def capture_errors() -> Iterator[ErrorLog]:
    """Count ERROR records of an in-process server; its per-request warnings about the garbage
    sent on purpose ("Invalid HTTP request received") are silenced meanwhile."""
    handler = ErrorLog()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    noisy = logging.getLogger("uvicorn.error")
    level = noisy.level
    noisy.setLevel(max(level, logging.ERROR))
    try:
        yield handler
    finally:
        noisy.setLevel(level)
        for logger in loggers:
            logger.removeHandler(handler)


# --------------------------------------------------------------------------------------------
# Rounds and the report


@dataclass
class Round:
    load: LoadReport
    kinds: dict[str, KindStats]
    leftover: dict[str, Any]
    wall_s: float


def _first_audio_ms(report: LoadReport) -> list[float]:
    return [c.client_first_audio_ms for c in report.contexts if c.ok and c.client_first_audio_ms is not None]


@dataclass
class ChaosReport:
    url: str
    settings: ChaosSettings
    references: References
    baseline: LoadReport
    baseline_leftover: dict[str, Any]
    rounds: list[Round]
    rss: RSSReport | None
    logged_errors: int = 0
    logged_samples: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def kinds(self) -> dict[str, KindStats]:
        total: dict[str, KindStats] = {}
        for r in self.rounds:
            for kind, stats in r.kinds.items():
                total.setdefault(kind, KindStats(kind)).merge(stats)
        return total

    @property
    def chaos_contexts(self) -> list[Any]:
        return [c for r in self.rounds for c in r.load.contexts]

    @property
    def internal_errors(self) -> int:
        refs = sum(c.internal_error for c in [*self.baseline.contexts, *self.chaos_contexts])
        return refs + sum(k.internal for k in self.kinds.values())

    @property
    def unexpected(self) -> int:
        return sum(k.unexpected for k in self.kinds.values())

    @property
    def leaks(self) -> list[dict[str, Any]]:
        return [r.leftover for r in self.rounds if leaked(r.leftover)]

    @property
    def passed(self) -> bool:
        refs = [*self.baseline.contexts, *self.chaos_contexts]
        return (
            all(c.ok and c.exact for c in refs)
            and not leaked(self.baseline_leftover)
            and not self.leaks
            and self.internal_errors == 0
            and self.unexpected == 0
        )

    def summary(self) -> dict[str, Any]:
        chaos = self.chaos_contexts
        base_fa, chaos_fa = (
            _first_audio_ms(self.baseline),
            [x for r in self.rounds for x in _first_audio_ms(r.load)],
        )
        p95_base, p95_chaos = percentile(base_fa, 95), percentile(chaos_fa, 95)
        return {
            "url": self.url,
            "passed": self.passed,
            "rounds": len(self.rounds),
            "wall_s": round(self.wall_s, 1),
            "reference_sessions": self.baseline.sessions,
            "misbehaving_clients": self.settings.clients,
            "reference_texts": len(self.references.by_text),
            "excluded_texts": len(self.references.excluded),
            "without_chaos": _ref_stats(self.baseline.contexts, base_fa),
            "with_chaos": _ref_stats(chaos, chaos_fa),
            "p95_ratio": None if not p95_base or p95_chaos is None else p95_chaos / p95_base,
            "internal_errors": self.internal_errors,
            "unexpected_answers": self.unexpected,
            "leftover_after_baseline": self.baseline_leftover,
            "leftover_after_last_round": self.rounds[-1].leftover if self.rounds else None,
            "rounds_with_leaks": len(self.leaks),
            "server_errors_logged": self.logged_errors,
            "rss": None if self.rss is None else self.rss.summary(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "settings": dataclasses.asdict(self.settings),
            "misbehaviours": {k: v.to_dict() for k, v in self.kinds.items()},
            "references": self.references.to_dict(),
            "baseline": self.baseline.to_dict(),
            "rounds": [
                {
                    "wall_s": r.wall_s,
                    "leftover": r.leftover,
                    "load": r.load.to_dict(),
                    "misbehaviours": {k: v.to_dict() for k, v in r.kinds.items()},
                }
                for r in self.rounds
            ],
            "server_errors_logged": self.logged_samples,
        }

    def format(self) -> str:
        s = self.summary()
        base, chaos = s["without_chaos"], s["with_chaos"]

        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.0f}"

        ratio = "" if s["p95_ratio"] is None else f"  ({s['p95_ratio']:.2f}x)"
        lines = [
            f"chaos: {s['reference_sessions']} reference sessions + {s['misbehaving_clients']} misbehaving "
            f"clients ({len(self.settings.kinds)} kinds), {s['rounds']} round(s), {s['wall_s']} s, {self.url}",
            f"reference texts: {s['reference_texts']} (greedy, compared sample for sample with each text alone)",
        ]
        lines += [f"  left out {t[:48]!r}: {why}" for t, why in self.references.excluded.items()]
        lines += [
            f"{'':28}{'without chaos':>16}{'with chaos':>16}",
            f"{'references exact':28}{base['exact_str']:>16}{chaos['exact_str']:>16}",
            f"{'failed references':28}{base['failed']:>16}{chaos['failed']:>16}",
            f"{'first audio p50 (ms)':28}{ms(base['first_audio_p50_ms']):>16}{ms(chaos['first_audio_p50_ms']):>16}",
            f"{'first audio p95 (ms)':28}{ms(base['first_audio_p95_ms']):>16}{ms(chaos['first_audio_p95_ms']):>16}{ratio}",
            f"internal errors: {s['internal_errors']}   unexpected answers: {s['unexpected_answers']}   "
            f"server errors logged: {self.logged_errors}",
            f"left after baseline: {_leftover(s['leftover_after_baseline'])}; after the last round: "
            f"{_leftover(s['leftover_after_last_round'])}; rounds with leaks: {s['rounds_with_leaks']}",
        ]  # fmt: skip
        rss = s["rss"]
        if rss and rss.get("samples"):
            slope = rss["last_half_slope_mib_per_min"]
            lines.append(
                f"RSS ({rss['source']}, {rss['samples']} samples): start {rss['start_mib']:.0f} MiB, "
                f"max {rss['max_mib']:.0f}, end {rss['end_mib']:.0f}; last half "
                + ("-" if slope is None else f"{slope:+.2f} MiB/min")
            )
        lines.append(
            f"{'misbehaviour':15}{'clients':>8}{'runs':>7}{'sent':>8}{'errors':>8}{'closes':>8}{'http':>7}"
            f"{'internal':>9}{'unexpected':>11}"
        )
        for k in self.kinds.values():
            lines.append(
                f"{k.kind:15}{k.clients:>8}{k.runs:>7}{k.sent:>8}{sum(k.errors.values()):>8}"
                f"{sum(k.closes.values()):>8}{sum(k.http.values()):>7}{k.internal:>9}{k.unexpected:>11}"
            )
        for k in self.kinds.values():
            if k.notes:
                lines.append(f"  {k.kind}: " + ", ".join(f"{n} x{c}" for n, c in k.notes.most_common()))

        def times(n: int) -> str:
            return f" (x{n})" if n > 1 else ""

        problems = [
            *(
                f"internal [{k.kind}] {x}{times(n)}"
                for k in self.kinds.values()
                for x, n in k.internal_samples.items()
            ),
            *(
                f"unexpected [{k.kind}] {x}{times(n)}"
                for k in self.kinds.values()
                for x, n in k.unexpected_samples.items()
            ),
            *(f"reference (baseline) {c.session}: {p}" for c in self.baseline.contexts for p in c.problems),
            *(f"reference (chaos) {c.session}: {p}" for c in self.chaos_contexts for p in c.problems),
            *(f"server log: {x}" for x in self.logged_samples),
        ]
        if problems:
            lines.append("problems:")
            lines += [f"  {p}" for p in problems[:40]]
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _ref_stats(contexts: Sequence[Any], first_audio: list[float]) -> dict[str, Any]:
    compared = [c for c in contexts if c.exact is not None]
    exact = sum(bool(c.exact) for c in compared)
    return {
        "contexts": len(contexts),
        "exact": exact,
        "compared": len(compared),
        "exact_str": f"{exact}/{len(contexts)}",
        "bit_identical": sum(bool(c.bit_identical) for c in compared),
        "failed": sum(not c.ok for c in contexts),
        "first_audio_p50_ms": percentile(first_audio, 50),
        "first_audio_p95_ms": percentile(first_audio, 95),
    }


def _leftover(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return (
        f"streams {d.get('streams')}, queued {d.get('queued_streams')}, sessions {d.get('sessions')}"
        f" ({d.get('waited_s')} s)"
    )


async def chaos_round(
    url: str, target: Target, references: References, settings: ChaosSettings, load_kw: dict[str, Any],
    settle_s: float,
) -> Round:  # fmt: skip
    """The reference sessions with the misbehaving clients beside them, then a leak check.

    The misbehaving clients run in a process of their own, as attackers on other machines would:
    in this process they would also take the event loop and the interpreter lock from the
    reference clients (and from an in-process server), which no remote client can.
    """
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs torch threads
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(
        target=_chaos_process,
        args=(target, settings, ready, stop, results),
        name="chaos-clients",
        daemon=True,
    )
    proc.start()
    t0 = time.perf_counter()
    try:
        started = await asyncio.to_thread(ready.wait, 120)
        if not started:
            raise RuntimeError("the chaos clients' process did not start")
        await asyncio.sleep(settings.warmup_s)  # the references arrive into chaos already under way
        load = await run_load(url, references=references, **load_kw)
    finally:
        stop.set()
        outcome = await asyncio.to_thread(_result, results, proc, settings)
    if isinstance(outcome, str):  # a bug in a chaos client must not pass for a quiet server
        raise RuntimeError("the chaos clients failed:\n" + outcome)
    wall = time.perf_counter() - t0
    leftover = await settle(target, settle_s)
    return Round(load, outcome, leftover, wall)


def _result(results: Any, proc: Any, settings: ChaosSettings) -> dict[str, KindStats] | str:
    limit = settings.run_timeout + settings.stall_s + 60.0
    try:
        outcome: dict[str, KindStats] | str = results.get(timeout=limit)
    except queue.Empty:
        outcome = f"no result from the chaos clients within {limit:.0f} s"
    proc.join(timeout=30)
    if proc.is_alive():
        proc.kill()
    return outcome


def _chaos_process(
    target: Target, settings: ChaosSettings, ready: Any, stop: Any, results: Any
) -> None:  # fmt: skip
    """Entry point of the chaos clients' process: run them until `stop`, report their stats.

    It runs at the lowest CPU priority: attackers on other machines spend their own CPU, and on
    a machine shared with the server the closest to that is to let the server's work go first.
    What the server spends on their requests still counts."""
    with contextlib.suppress(OSError):
        os.nice(19)
    try:
        results.put(asyncio.run(_chaos_clients(target, settings, ready, stop)))
    except BaseException:
        results.put(traceback.format_exc())


async def _chaos_clients(
    target: Target, settings: ChaosSettings, ready: Any, stop: Any
) -> dict[str, KindStats]:
    stopped = asyncio.Event()
    kinds = {k: KindStats(k) for k in settings.kinds}
    tasks = []
    for i in range(settings.clients):
        kind = settings.kinds[i % len(settings.kinds)]
        kinds[kind].clients += 1
        tasks.append(asyncio.create_task(_chaos_client(kind, i, target, kinds[kind], stopped, settings)))
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.05)
    stopped.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return kinds


async def run_chaos(
    url: str,
    *,
    sessions: int = 32,
    chaos: ChaosSettings | None = None,
    duration_s: float = 0.0,
    rate_wps: float = 8.0,
    rate_spread: float = 0.5,
    ramp_s: float = 1.0,
    texts: Sequence[str] = DEFAULT_TEXTS,
    turns: int = 1,
    api_key: str | None = None,
    seed: int = 0,
    timeout: float = 300.0,
    reference_copies: int = 4,
    settle_s: float = 30.0,
    in_process: bool = False,
    rss_interval: float = 5.0,
    **session_config: Any,
) -> ChaosReport:
    """Record references, run the reference sessions alone (the baseline), then with the
    misbehaving clients beside them, round after round until ``duration_s`` (at least once).

    ``in_process``: the server runs in this process (RSS from /proc/self, ERROR logs counted);
    otherwise RSS comes from its /metrics.
    """
    target = Target.from_url(url, api_key)
    chaos = chaos or ChaosSettings(clients=sessions)
    t_start = time.perf_counter()
    references = await record_references(
        url, texts, rate_wps=rate_wps, rate_spread=rate_spread, copies=reference_copies, api_key=api_key,
        timeout=timeout, **session_config,
    )  # fmt: skip
    if not references.by_text:
        raise RuntimeError(
            "no text can be a reference on this server: " + "; ".join(references.excluded.values())
        )
    load_kw: dict[str, Any] = dict(
        sessions=sessions, turns=turns, rate_wps=rate_wps, rate_spread=rate_spread, texts=texts, ramp_s=ramp_s,
        api_key=api_key, seed=seed, timeout=timeout, **session_config,
    )  # fmt: skip
    baseline = await run_load(url, references=references, **load_kw)
    baseline_leftover = await settle(target, settle_s)
    rss = RSSReport("this process (VmRSS)" if in_process else "/metrics process_resident_memory_bytes")

    async def read_rss() -> int | None:
        return rss_in_process() if in_process else await rss_from_metrics(target)

    rounds: list[Round] = []
    with capture_errors() if in_process else contextlib.nullcontext() as errors:
        sampler = asyncio.create_task(sample_rss(read_rss, rss, rss_interval))
        t0 = time.perf_counter()
        try:
            while True:
                rounds.append(await chaos_round(url, target, references, chaos, load_kw, settle_s))
                if time.perf_counter() - t0 >= duration_s:
                    break
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
        value = await read_rss()
        if value is not None:
            rss.samples.append((round(time.perf_counter() - t0, 2), value))
    return ChaosReport(
        url, chaos, references, baseline, baseline_leftover, rounds, rss,
        logged_errors=errors.count if errors else 0, logged_samples=errors.samples if errors else [],
        wall_s=time.perf_counter() - t_start,
    )  # fmt: skip
