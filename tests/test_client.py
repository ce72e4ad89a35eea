"""The asyncio client (clients.client) and the say CLI against a real server on 127.0.0.1.

The server runs inside each test's event loop on port 0 with a tiny random checkpoint whose
utterances stop at 30 frames (2.4 s), so every context is short. The client checks the protocol's
ordering rules itself (seq, sample_offset, flags, audio_ms); the last tests make sure that checker
does catch a misbehaving server, so "no violations" elsewhere means something.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from clients.client import (
    AudioChunk,
    AuthenticationError,
    CancelledEvent,
    ConnectError,
    ConnectionLost,
    ContextItem,
    ContextStateError,
    DoneEvent,
    FlushedEvent,
    MarkEvent,
    ProtocolViolation,
    ServerError,
    SessionInfo,
    TTSClient,
    config_message,
)
from clients.load import expected_samples, serve_in_process, speak
from engine.scheduler import Engine
from engine.torch.weights import write_random_checkpoint
from realtime.protocol import pack_audio_frame

REPO = Path(__file__).resolve().parents[1]
# Fewer text tokens than the 30-frame cap: see the engine issue noted in test_load.py.
TEXT = "Hello there. This is streamed one word at a time."


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    ckpt = write_random_checkpoint(
        tmp_path_factory.mktemp("tiny31"), "tiny", "custom_voice", max_new_tokens=31
    )
    eng = Engine(str(ckpt), device="cpu", max_streams=4)
    yield eng
    eng.close()


@pytest.fixture
async def url(engine: Engine) -> AsyncIterator[str]:
    async with serve_in_process(engine) as ws_url:
        yield ws_url


def assert_complete(chunks: list[AudioChunk], total: int) -> None:
    """seq from 0, contiguous sample offsets, first/last flags on the ends, samples add up."""
    assert chunks, "no audio"
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    offset = 0
    for c in chunks:
        assert c.sample_offset == offset
        offset = c.end_offset
    assert [c.first for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert chunks[-1].last and not any(c.last for c in chunks[:-1])
    assert offset == total


# ---- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "rate"),
    [("pcm_s16le", 24000), ("pcm_f32le", 24000), ("pcm_mulaw", 8000), ("pcm_s16le", 44100)],
)
async def test_words_streamed_like_an_llm_give_all_the_audio(url: str, encoding: str, rate: int) -> None:
    async with TTSClient.connect(
        url, voice="ryan", language="english", encoding=encoding, sample_rate=rate, seed=3
    ) as client:
        result, text_s = await speak(client, TEXT, rate_wps=30.0)
    assert result.done is not None and result.cancelled is None
    m = result.done.metrics
    assert m.frames > 0 and m.utterances == 1
    assert result.sample_rate == rate and result.audio.dtype == np.float32
    slack = 0 if rate == 24000 else 1  # resampling rounds the utterance to whole samples
    assert abs(len(result.audio) - expected_samples(m.frames, rate)) <= slack
    assert_complete(result.chunks, len(result.audio))
    assert {c.encoding for c in result.chunks} == {encoding}
    assert result.done.audio_ms == pytest.approx(len(result.audio) * 1000 / rate, abs=0.01)
    assert float(np.abs(result.audio).max()) > 0  # random weights: noise, but not silence
    # client-side first audio: after the first word was sent, before the context finished
    assert result.first_audio_ms is not None and result.first_text_at is not None
    assert 0 < result.first_audio_ms <= (result.done.received_at - result.first_text_at) * 1000
    assert not result.violations and not client.violations
    assert text_s >= (len(TEXT.split()) - 1) / 30.0 * 0.9  # the words really were paced


async def test_two_contexts_share_one_socket(url: str) -> None:
    async with TTSClient.connect(url, chunk_schedule=[1]) as client:
        (ra, _), (rb, _) = await asyncio.gather(
            speak(client, TEXT, 30.0, voice="ryan"),
            speak(client, "A second voice at the same time.", 30.0, voice="serena", encoding="pcm_f32le", sample_rate=16000),
        )  # fmt: skip
        a, b = client.contexts[ra.context_id], client.contexts[rb.context_id]
    assert a.stream is not None and b.stream is not None and a.stream != b.stream
    assert (ra.sample_rate, rb.sample_rate) == (24000, 16000)
    for res, handle in ((ra, a), (rb, b)):
        assert res.done is not None
        assert {(c.context_id, c.stream) for c in res.chunks} == {(handle.id, handle.stream)}
        assert abs(len(res.audio) - expected_samples(res.done.metrics.frames, res.sample_rate)) <= 1
        assert_complete(res.chunks, len(res.audio))
    # generated concurrently: each context received audio while the other was still streaming
    assert ra.chunks[0].received_at < rb.chunks[-1].received_at
    assert rb.chunks[0].received_at < ra.chunks[-1].received_at
    assert not client.violations


async def test_cancel_ends_with_cancelled_and_no_audio_after_it(url: str) -> None:
    async with TTSClient.connect(url, voice="ryan", chunk_schedule=[1]) as client:
        ctx = client.context()
        await ctx.append(TEXT)
        await ctx.end()
        items: list[ContextItem] = []
        async for item in ctx:
            items.append(item)
            if isinstance(item, AudioChunk) and item.seq == 1:
                await ctx.cancel()
        # A pong is sent after everything queued before it: a stray frame would be here by now,
        # and the client records audio after a terminal event as a violation.
        await client.ping()
        assert not client.violations
        with pytest.raises(ContextStateError):
            await ctx.append("more text")
    assert isinstance(items[-1], CancelledEvent) and ctx.state == "cancelled" and ctx.done is None
    audio = [i for i in items if isinstance(i, AudioChunk)]
    received = sum(len(c.samples) for c in audio)
    assert len(audio) >= 2 and received < 30 * 1920  # stopped before the 30-frame cap
    assert items[-1].audio_ms == pytest.approx(received / 24.0, abs=0.01)
    assert not any(isinstance(i, DoneEvent) for i in items)


async def test_marks_and_flush_arrive_in_audio_order(url: str) -> None:
    async with TTSClient.connect(url, voice="ryan", chunk_schedule=[2]) as client:
        ctx = client.context()
        await ctx.mark("start")  # nothing queued yet: at 0 ms
        await ctx.append("First part.")
        await ctx.flush()
        items: list[ContextItem] = []
        async for item in ctx:
            items.append(item)
            if isinstance(item, FlushedEvent):
                break
        await ctx.mark("between")  # after all of the first utterance
        await ctx.append(" Second part.")
        await ctx.end()
        items += [item async for item in ctx]
    assert not client.violations and ctx.done is not None
    kinds = [i.type for i in items]
    marks = [i for i in items if isinstance(i, MarkEvent)]
    assert [m.name for m in marks] == ["start", "between"]
    assert marks[0].audio_ms == 0 and kinds[0] == "mark"
    i_flushed, i_between = kinds.index("context.flushed"), kinds.index("mark", 1)
    first = [i for i in items[:i_flushed] if isinstance(i, AudioChunk)]
    assert first[-1].utterance_end and not first[-1].last
    first_ms = sum(len(c.samples) for c in first) / 24.0
    assert items[i_flushed].audio_ms == pytest.approx(first_ms, abs=0.01)  # type: ignore[union-attr]
    assert marks[1].audio_ms == pytest.approx(first_ms, abs=0.01)
    assert i_flushed < i_between and "audio" in kinds[i_between:]  # the second utterance followed
    assert ctx.done.metrics.utterances == 2 and kinds[-1] == "context.done"


# ---- errors ------------------------------------------------------------------------------------


async def test_refusals_raise_server_errors(url: str) -> None:
    with pytest.raises(ServerError) as e:
        async with TTSClient.connect(url, voice="nobody"):
            pass
    assert e.value.code == "invalid_voice" and not e.value.fatal
    with pytest.raises(TypeError, match="voise"):
        TTSClient.connect(url, voise="ryan")  # a typo is caught before connecting
    async with TTSClient.connect(url) as client:
        ctx = client.context(language="klingon")
        with pytest.raises(ServerError) as e:
            await ctx.open()
        assert e.value.code == "invalid_language" and e.value.context_id == ctx.id
        with pytest.raises(ServerError):
            await anext(ctx)
        assert ctx.state == "failed"
        with pytest.raises(ServerError) as e:
            await client.update(sampling={"top_p": 5})
        assert e.value.code == "invalid_sampling"
        assert await client.ping() > 0  # the session survived all of it


async def test_authentication_and_connect_errors(engine: Engine) -> None:
    async with serve_in_process(engine, api_key="sekret") as ws_url:
        with pytest.raises(AuthenticationError) as e:
            await TTSClient.connect(ws_url)
        assert e.value.status == 401
        with pytest.raises(AuthenticationError):
            await TTSClient.connect(ws_url, api_key="wrong")
        client = await TTSClient.connect(ws_url, api_key="sekret")
        assert client.session.protocol == "tts.v1" and "ryan" in client.session.voices
        await client.close()
    with pytest.raises(ConnectError):
        await TTSClient.connect(ws_url, api_key="sekret", open_timeout=5)  # the server is gone


async def test_dropped_socket_fails_running_contexts(url: str) -> None:
    client = await TTSClient.connect(url, voice="ryan")
    ctx = client.context()
    await ctx.append(TEXT)
    await client.close(graceful=False)
    with pytest.raises(ConnectionLost):
        async for _ in ctx:
            pass
    assert ctx.state == "failed" and isinstance(ctx.failure, ConnectionLost)
    with pytest.raises(ConnectionLost):
        await ctx.append("more")


# ---- the conformance checker against a scripted, misbehaving server ----------------------------


class ScriptedSocket:
    """Stands in for the WebSocket: yields scripted server frames, records what is sent."""

    def __init__(self, frames: list[str | bytes]) -> None:
        self.frames = frames
        self.sent: list[dict[str, Any]] = []
        self.close_code: int | None = 1000
        self.close_reason = ""

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[str | bytes]:
        for frame in self.frames:
            await asyncio.sleep(0)
            yield frame

    async def send(self, data: str) -> None:
        self.sent.append(json.loads(data))

    async def close(self) -> None:
        pass


def scripted_client(frames: list[str | bytes], strict: bool) -> TTSClient:
    session = SessionInfo("s", "tts.v1", "m", {}, "pcm_s16le", 24000, {}, ("ryan",), ("auto",))
    return TTSClient(ScriptedSocket(frames), session, strict=strict)  # type: ignore[arg-type]


def bad_server_frames() -> list[str | bytes]:
    ten = b"\x00\x01" * 10  # ten s16 samples
    return [
        json.dumps({"type": "context.started", "context_id": "c", "stream": 7, "encoding": "pcm_s16le", "sample_rate": 24000}),
        pack_audio_frame(7, 0, 0, ten, first=True),
        pack_audio_frame(7, 2, 10, ten),  # seq skips 1
        pack_audio_frame(7, 3, 50, ten),  # sample_offset jumps from 30 to 50
        json.dumps({"type": "context.done", "context_id": "c", "audio_ms": 5.0, "metrics": {"frames": 1}}),
        pack_audio_frame(7, 4, 60, ten, last=True),  # audio after context.done
    ]  # fmt: skip


async def test_checker_raises_on_violations_when_strict() -> None:
    client = scripted_client(bad_server_frames(), strict=True)
    ctx = client.context("c")
    got: list[object] = []
    while True:
        try:
            got.append(await anext(ctx))
        except StopAsyncIteration:
            break
        except ProtocolViolation as e:
            got.append(e)
    violations = [str(g) for g in got if isinstance(g, ProtocolViolation)]
    assert any("seq 2 where 1" in v for v in violations)
    assert any("sample_offset 50" in v for v in violations)
    assert any("context.done reports audio_ms=5.0" in v for v in violations)
    assert any("without a frame flagged last" in v for v in violations)
    assert isinstance(got[-1], DoneEvent)
    await asyncio.sleep(0.01)  # let the reader see the frame after context.done
    assert any("after the context's terminal event" in v for v in client.violations)
    assert ctx.chunks_received == 3  # the frame after the end was not delivered
    await client.close(graceful=False)


async def test_checker_only_records_when_not_strict() -> None:
    client = scripted_client(bad_server_frames(), strict=False)
    result = await client.context("c").collect(timeout=5)
    assert result.done is not None and len(result.chunks) == 3
    await asyncio.sleep(0.01)  # the reader also sees the frame after context.done
    assert len(result.violations) >= 4 and len(client.violations) == 5
    await client.close(graceful=False)


def test_config_message_nests_flat_options() -> None:
    msg = config_message(voice="ryan", encoding="pcm_f32le", sample_rate=16000, temperature=0, seed=None,
                         idle_flush_ms=200, chunk_schedule=(1, 2), language=None)  # fmt: skip
    assert msg == {
        "voice": "ryan", "output": {"encoding": "pcm_f32le", "sample_rate": 16000},
        "sampling": {"temperature": 0, "seed": None}, "text": {"idle_flush_ms": 200}, "chunk_schedule": [1, 2],
    }  # fmt: skip


# ---- the say CLI -------------------------------------------------------------------------------


async def test_say_cli_streams_and_writes_a_wav(url: str, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients", "say", TEXT, "--url", url, "--out", str(out), "--rate", "40",
        "--voice", "serena", "--encoding", "pcm_f32le", "--sample-rate", "16000",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    text = stdout.decode()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    first = re.search(r"first audio \(client.*?: (\d+) ms", text)
    frames = re.search(r"frames (\d+)", text)
    assert first and int(first.group(1)) > 0, text
    assert frames, text
    audio, rate = sf.read(out, dtype="float32")
    assert rate == 16000 and sf.info(out).subtype == "FLOAT"
    assert abs(len(audio) - expected_samples(int(frames.group(1)), 16000)) <= 1
