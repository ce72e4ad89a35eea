"""Server load test: many sessions streaming text at LLM-like rates (``python -m realtime bench``).

Each simulated session opens one WebSocket, and per turn streams a text word by word at its own
rate (the base ``--rate`` words/s with a seeded random spread, as different LLM replies arrive at
different speeds), ends the context and checks what came back:

- the context completed (``context.done``), with no protocol violation seen by the client;
- the audio received is exactly what the server says it generated: the sum of received samples
  equals ``frames * 1920`` scaled to the output rate (at 24 kHz exactly; resampled rates may
  differ by one sample per utterance from rounding) and matches ``context.done``'s ``audio_ms``.

With ``--exact`` (and always in ``--chaos`` mode, see :mod:`clients.chaos`) sessions decode
greedily and every context's audio must also equal, sample for sample, what its text gives when
synthesized alone (:func:`record_references`, :class:`References`).

It reports first-audio latency measured at the client (first word sent -> first audio frame
received) and as the server measured it, the server's real-time factor per context, playback
underruns a client would have heard (a chunk arriving after the audio before it finished
playing), and errors. ``--model random:tiny`` starts a server in this process on port 0 so the
benchmark needs nothing else; real numbers come from a separate server (``--url``), since the
in-process server shares the event loop with the clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import numpy as np

from clients.client import (
    AudioChunk,
    ClientError,
    ConnectionLost,
    ContextResult,
    ErrorEvent,
    FloatArray,
    ServerError,
    TTSClient,
)
from realtime.audio import decode_pcm
from realtime.protocol import CODEC_FRAME_MS, NATIVE_SAMPLE_RATE

if TYPE_CHECKING:
    from engine import Engine

SAMPLES_PER_FRAME: Final = CODEC_FRAME_MS * NATIVE_SAMPLE_RATE // 1000  # 1920 at 24 kHz
DEFAULT_TEXTS: Final = (
    "Sure, I can help with that. Your order shipped this morning and should arrive on Thursday.",
    "The weather today is mostly sunny with a light breeze, and the high will be around twenty degrees.",
    "Let me check that for you. It looks like the meeting was moved to three thirty in room four.",
    "Thanks for waiting. I found two flights that match, one in the morning and one after lunch.",
    "Of course! To reset your password, open the settings page and choose the security tab.",
    "Here is a quick summary: the report is finished, the numbers look good, and we ship next week.",
)
_WORDS = re.compile(r"\s*\S+")


def split_words(text: str) -> list[str]:
    """LLM-like deltas: each word with the whitespace before it, so ``"".join`` gives the text back."""
    return _WORDS.findall(text)


def expected_samples(frames: int, sample_rate: int) -> int:
    """Output samples for ``frames`` codec frames at ``sample_rate`` (one utterance)."""
    return round(frames * SAMPLES_PER_FRAME * sample_rate / NATIVE_SAMPLE_RATE)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation, None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def underruns(chunks: Sequence[AudioChunk]) -> tuple[int, float]:
    """Gaps a player starting at the first chunk would hear: (count, largest gap in ms).

    The player plays each chunk as soon as it has it and the previous one has finished, so a
    chunk that arrives after the audio before it ran out is an underrun of that much time.
    """
    count, worst = 0, 0.0
    playing_until: float | None = None
    for c in chunks:
        if not len(c.samples):
            continue
        start = c.received_at if playing_until is None else max(playing_until, c.received_at)
        if playing_until is not None and c.received_at > playing_until + 1e-3:
            count += 1
            worst = max(worst, (c.received_at - playing_until) * 1000.0)
        playing_until = start + len(c.samples) / c.sample_rate
    return count, worst


# Largest per-sample difference between two decodes of the same codes. The streaming codec
# decodes the streams of a step together and float rounding depends on the batch's size and
# order (measured below 3e-6 on CPU, i.e. +-1 LSB of s16), while one different code moves
# samples by ~0.1 or more; 1e-3 (-60 dBFS) separates the two with room for larger models.
AUDIO_NOISE: Final = 1e-3
# Session settings of sessions whose audio is compared: greedy decoding (no randomness), and no
# idle flush, which fires when text pauses and so would make the utterances depend on timing.
EXACT_CONFIG: Final[dict[str, Any]] = {"temperature": 0.0, "idle_flush_ms": 0}


def exact_tolerance(encoding: str) -> float:
    """How far a received sample may be from the reference's: the codec's rounding noise plus
    one quantization step of the encoding (that noise can tip a sample over a step)."""
    if encoding == "pcm_f32le":
        step = 0.0
    elif encoding == "pcm_s16le":
        step = 1 / 32768
    else:  # 8-bit companded: the largest step between adjacent decoded levels
        levels = np.sort(decode_pcm(bytes(range(256)), encoding))
        step = float(np.diff(levels).max())
    return AUDIO_NOISE + step


def compare_audio(got: FloatArray, ref: FloatArray, sample_rate: int, tolerance: float) -> str | None:
    """None when ``got`` equals ``ref`` sample for sample (within ``tolerance``), else how not."""
    per_frame = SAMPLES_PER_FRAME * sample_rate / NATIVE_SAMPLE_RATE
    if len(got) != len(ref):
        return (
            f"has {len(got)} samples ({len(got) / per_frame:.1f} frames) where the solo run has "
            f"{len(ref)} ({len(ref) / per_frame:.1f})"
        )
    if not len(got):
        return None
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    worst = float(diff.max())
    if worst <= tolerance:
        return None
    first = int(np.argmax(diff > tolerance))
    return (
        f"differs from the solo run from sample {first} (frame {int(first // per_frame)}): "
        f"max |diff| {worst:.3g} > {tolerance:.3g}"
    )


@dataclass
class ContextReport:
    """What one context (one turn of one session) did, and whether it was right."""

    session: int
    context_id: str
    words: int
    rate_wps: float
    ok: bool = False
    problems: list[str] = field(default_factory=list)
    samples: int = 0
    expected_samples: int | None = None
    sample_rate: int = NATIVE_SAMPLE_RATE
    chunks: int = 0
    audio_ms: float | None = None  # from context.done
    frames: int | None = None
    utterances: int | None = None
    client_first_audio_ms: float | None = None
    server_first_audio_ms: float | None = None
    generate_ms: float | None = None
    rtf: float | None = None
    text_ms: float | None = None  # first word sent -> text.end sent
    total_ms: float | None = None  # first word sent -> context.done received
    underruns: int = 0
    max_gap_ms: float = 0.0
    text: str = ""
    exact: bool | None = None  # audio equal to the text's solo run (None: not compared)
    bit_identical: bool | None = None  # ... and not even one quantization step apart
    error_codes: list[str] = field(default_factory=list)  # of `error` events, fatal or not
    close_code: int | None = None  # when the connection closed under the context

    @property
    def internal_error(self) -> bool:
        """The server failed (not the client): an ``internal`` error or a 1011 close."""
        return "internal" in self.error_codes or self.close_code == 1011


@dataclass(frozen=True)
class Reference:
    """What one text gives synthesized alone: the audio every session speaking it must get."""

    text: str
    audio: FloatArray
    sample_rate: int
    encoding: str
    frames: int
    utterances: int


@dataclass
class References:
    """The reference audio of each text, the texts that cannot be references on this server
    (and why), and the session settings they were recorded with (:data:`EXACT_CONFIG` at least),
    which compared sessions must use too."""

    by_text: dict[str, Reference]
    excluded: dict[str, str] = field(default_factory=dict)
    session_config: dict[str, Any] = field(default_factory=lambda: dict(EXACT_CONFIG))

    def check(self, report: ContextReport, result: ContextResult) -> None:
        """Compare a context's audio with its text's reference; a difference fails the report."""
        ref = self.by_text.get(report.text)
        if ref is None:
            return
        encoding = result.chunks[0].encoding if result.chunks else ref.encoding
        if result.sample_rate != ref.sample_rate or encoding != ref.encoding:
            problem: str | None = (
                f"is {encoding} at {result.sample_rate} Hz, the solo run {ref.encoding} at {ref.sample_rate} Hz"
            )
        else:
            problem = compare_audio(result.audio, ref.audio, ref.sample_rate, exact_tolerance(encoding))
        report.exact = problem is None
        report.bit_identical = report.exact and np.array_equal(result.audio, ref.audio)
        if problem is not None:
            report.problems.append(f"audio {problem}")
            report.ok = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "texts": [
                {"text": r.text, "samples": len(r.audio), "frames": r.frames, "utterances": r.utterances}
                for r in self.by_text.values()
            ],
            "excluded": [{"text": t, "why": why} for t, why in self.excluded.items()],
            "session_config": self.session_config,
        }


@dataclass
class LoadReport:
    url: str
    sessions: int
    turns: int
    rate_wps: float
    wall_s: float
    contexts: list[ContextReport]
    references: References | None = None

    @property
    def failed(self) -> list[ContextReport]:
        return [c for c in self.contexts if not c.ok]

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def compared(self) -> list[ContextReport]:
        """The contexts whose audio was compared with a solo run."""
        return [c for c in self.contexts if c.exact is not None]

    def summary(self) -> dict[str, Any]:
        def stats(values: list[float]) -> dict[str, float | None]:
            return {
                "p50": percentile(values, 50),
                "p95": percentile(values, 95),
                "p99": percentile(values, 99),
                "max": max(values) if values else None,
            }

        ok = [c for c in self.contexts if c.ok]
        audio_s = sum(c.samples / c.sample_rate for c in self.contexts)
        return {
            "url": self.url,
            "sessions": self.sessions,
            "turns": self.turns,
            "rate_wps": self.rate_wps,
            "contexts": len(self.contexts),
            "completed": len(ok),
            "failed": len(self.contexts) - len(ok),
            "wall_s": self.wall_s,
            "audio_s": audio_s,
            "client_first_audio_ms": stats([c.client_first_audio_ms for c in ok if c.client_first_audio_ms is not None]),
            "server_first_audio_ms": stats([c.server_first_audio_ms for c in ok if c.server_first_audio_ms is not None]),
            "rtf": stats([c.rtf for c in ok if c.rtf is not None]),
            "underruns": sum(c.underruns for c in ok),
            "max_gap_ms": max((c.max_gap_ms for c in ok), default=0.0),
            "exact": None if self.references is None else {
                "compared": len(self.compared), "exact": sum(bool(c.exact) for c in self.compared),
                "bit_identical": sum(bool(c.bit_identical) for c in self.compared),
                "excluded_texts": len(self.references.excluded),
            },
            "internal_errors": sum(c.internal_error for c in self.contexts),
            "errors": [f"session {c.session} {c.context_id}: {p}" for c in self.contexts for p in c.problems],
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        out = {"summary": self.summary(), "contexts": [dataclasses.asdict(c) for c in self.contexts]}
        if self.references is not None:
            out["references"] = self.references.to_dict()
        return out

    def format(self) -> str:
        s = self.summary()

        def ms(d: dict[str, float | None], key: str) -> str:
            v = d[key]
            return "-" if v is None else f"{v:.0f}"

        def rtf(d: dict[str, float | None], key: str) -> str:
            v = d[key]
            return "-" if v is None else f"{v:.3f}"

        c, sv, r = s["client_first_audio_ms"], s["server_first_audio_ms"], s["rtf"]
        lines = [
            f"{s['sessions']} sessions x {s['turns']} turn(s) at ~{s['rate_wps']:g} words/s against {s['url']}",
            f"completed {s['completed']}/{s['contexts']} contexts in {s['wall_s']:.1f} s, "
            f"{s['audio_s']:.1f} s of audio",
            f"first audio, client (ms): p50 {ms(c, 'p50')}  p95 {ms(c, 'p95')}  p99 {ms(c, 'p99')}  max {ms(c, 'max')}",
            f"first audio, server (ms): p50 {ms(sv, 'p50')}  p95 {ms(sv, 'p95')}  p99 {ms(sv, 'p99')}  max {ms(sv, 'max')}",
            f"rtf per context:          p50 {rtf(r, 'p50')}  p95 {rtf(r, 'p95')}  max {rtf(r, 'max')}",
            f"playback underruns: {s['underruns']} (largest gap {s['max_gap_ms']:.0f} ms)",
        ]  # fmt: skip
        if s["exact"] is not None:
            e = s["exact"]
            lines.append(
                f"audio equal to the text's solo run: {e['exact']}/{e['compared']} contexts "
                f"({e['bit_identical']} bit-identical)"
            )
            assert self.references is not None
            lines += [
                f"  not a reference text: {t[:40]!r}...: {why}" for t, why in self.references.excluded.items()
            ]
        if s["errors"]:
            lines.append(f"errors ({len(s['errors'])}):")
            lines += [f"  {e}" for e in s["errors"][:20]]
            if len(s["errors"]) > 20:
                lines.append(f"  ... and {len(s['errors']) - 20} more")
        return "\n".join(lines)


def check_context(report: ContextReport, result: ContextResult) -> None:
    """Fill ``report`` from ``result`` and decide whether the context is correct."""
    report.samples = len(result.audio)
    report.sample_rate = result.sample_rate
    report.chunks = len(result.chunks)
    report.client_first_audio_ms = result.first_audio_ms
    report.underruns, report.max_gap_ms = underruns(result.chunks)
    report.problems += result.violations
    errors = [e for e in result.events if isinstance(e, ErrorEvent)]
    report.problems += [f"error {e.code}: {e.message}" for e in errors]
    report.error_codes += [e.code for e in errors]
    done = result.done
    if done is None:
        report.problems.append("no context.done")
        return
    m = done.metrics
    report.audio_ms, report.frames, report.utterances = done.audio_ms, m.frames, m.utterances
    report.server_first_audio_ms, report.generate_ms, report.rtf = (
        m.first_text_to_first_audio_ms,
        m.generate_ms,
        m.rtf,
    )
    report.total_ms = (
        None if result.first_text_at is None else (done.received_at - result.first_text_at) * 1000.0
    )
    report.expected_samples = expected_samples(m.frames, result.sample_rate)
    # Resampling rounds each utterance to whole samples; at the native rate there is no slack.
    slack = 0 if result.sample_rate == NATIVE_SAMPLE_RATE else max(1, m.utterances)
    if abs(report.samples - report.expected_samples) > slack:
        report.problems.append(
            f"received {report.samples} samples, expected {report.expected_samples} for {m.frames} frames"
        )
    received_ms = report.samples * 1000.0 / result.sample_rate
    if abs(received_ms - done.audio_ms) > 0.01:
        report.problems.append(f"received {received_ms:.3f} ms of audio, context.done says {done.audio_ms}")
    if m.frames <= 0:
        report.problems.append("context.done reports no frames")
    report.ok = not report.problems


async def speak(
    client: TTSClient, text: str, rate_wps: float, **overrides: Any
) -> tuple[ContextResult, float]:
    """Stream ``text`` word by word at ``rate_wps`` into a new context, end it, collect the result.

    Words are sent on an absolute schedule (first word at once, word i at i / rate) so a slow
    send does not make the whole text drift late. Returns the result and the time the text took.
    """
    ctx = client.context(**overrides)
    if overrides:
        await ctx.open()  # the round trip stays out of the first-audio latency
    collector = asyncio.create_task(ctx.collect())
    words = split_words(text)
    t0 = time.perf_counter()
    try:
        for i, word in enumerate(words):
            delay = t0 + i / rate_wps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await ctx.append(word)
        await ctx.end()
    except BaseException:
        collector.cancel()
        raise
    text_s = time.perf_counter() - t0
    return await collector, text_s


def _record_failure(report: ContextReport, e: BaseException, where: str = "") -> None:
    report.ok = False
    report.problems.append(f"{where}{type(e).__name__}: {e}")
    if isinstance(e, ServerError):
        report.error_codes.append(e.code)
    elif isinstance(e, ConnectionLost):
        report.close_code = e.code


async def _session(
    index: int, url: str, texts: Sequence[str], rates: Sequence[float], *, api_key: str | None, start_delay: float,
    timeout: float, session_config: dict[str, Any], references: References | None = None,
) -> list[ContextReport]:  # fmt: skip
    await asyncio.sleep(start_delay)
    reports: list[ContextReport] = []
    try:
        async with TTSClient.connect(url, api_key, **session_config) as client:
            for turn, (text, rate) in enumerate(zip(texts, rates, strict=True)):
                report = ContextReport(index, f"turn-{turn}", len(split_words(text)), rate, text=text)
                reports.append(report)
                try:
                    result, text_s = await asyncio.wait_for(speak(client, text, rate), timeout)
                except (ClientError, TimeoutError) as e:
                    _record_failure(report, e)
                    return reports
                report.context_id = result.context_id
                report.text_ms = text_s * 1000.0
                check_context(report, result)
                if references is not None:
                    references.check(report, result)
    except (ClientError, OSError) as e:
        report = reports[-1] if reports else ContextReport(index, "-", 0, 0.0)
        if not reports:
            reports.append(report)
        _record_failure(report, e, "session: ")
    return reports


async def run_load(
    url: str,
    *,
    sessions: int = 32,
    turns: int = 1,
    rate_wps: float = 8.0,
    rate_spread: float = 0.5,
    texts: Sequence[str] = DEFAULT_TEXTS,
    ramp_s: float = 1.0,
    api_key: str | None = None,
    seed: int = 0,
    timeout: float = 300.0,
    references: References | None = None,
    **session_config: Any,
) -> LoadReport:
    """Run ``sessions`` concurrent sessions of ``turns`` contexts each and check every context.

    Session i starts at ``i * ramp_s / sessions`` (0 = all at once, a burst) and speaks at
    ``rate_wps * uniform(1 - rate_spread, 1 + rate_spread)`` words/s; texts are drawn from
    ``texts``. Everything random comes from ``seed``, so runs are comparable.

    With ``references`` (from :func:`record_references`), texts are drawn from its reference
    texts only, sessions use its settings (greedy), and every context's audio must equal its
    text's solo run.
    """
    if references is not None:
        texts = [t for t in texts if t in references.by_text]
        if not texts:
            raise ValueError("none of the texts has a reference")
        session_config = {**session_config, **references.session_config}
    rng = random.Random(seed)
    plans = []
    for i in range(sessions):
        chosen = [rng.choice(texts) for _ in range(turns)]
        rates = [rate_wps * rng.uniform(1 - rate_spread, 1 + rate_spread) for _ in range(turns)]
        plans.append((i, chosen, rates, i * ramp_s / max(1, sessions)))
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(
            _session(i, url, chosen, rates, api_key=api_key, start_delay=delay, timeout=timeout,
                     session_config=session_config, references=references)
            for i, chosen, rates, delay in plans
        )
    )  # fmt: skip
    wall = time.perf_counter() - t0
    return LoadReport(
        url, sessions, turns, rate_wps, wall, [r for rs in results for r in rs], references=references
    )


async def speak_alone(
    url: str, text: str, rate_wps: float | None, *, api_key: str | None = None, timeout: float = 300.0,
    **session_config: Any,
) -> ContextResult:  # fmt: skip
    """``text`` in a session of its own: word by word at ``rate_wps``, or in one message (None)."""

    async def run() -> ContextResult:
        async with TTSClient.connect(url, api_key, **session_config) as client:
            if rate_wps is not None:
                return (await speak(client, text, rate_wps))[0]
            ctx = client.context()
            collector = asyncio.create_task(ctx.collect())
            try:
                await ctx.append(text)
                await ctx.end()
            except BaseException:
                collector.cancel()
                raise
            return await collector

    result = await asyncio.wait_for(run(), timeout)
    if result.done is None:
        raise ClientError(f"{text[:40]!r}: the context did not complete")
    return result


async def record_references(
    url: str,
    texts: Sequence[str],
    *,
    rate_wps: float = 8.0,
    rate_spread: float = 0.5,
    copies: int = 4,
    api_key: str | None = None,
    timeout: float = 300.0,
    **session_config: Any,
) -> References:
    """Record what each text gives alone, and keep only texts whose audio is a property of the
    text: the same however its words arrive and whatever it is batched with.

    Each distinct text is synthesized alone, sent whole: that is its reference. Then, still
    alone, it is streamed word by word at the slowest rate sessions use (``rate_wps * (1 -
    rate_spread)``), where generation is furthest ahead of the text; then ``copies`` copies of
    every text are streamed at once at rates spread over ``rate_wps * (1 +- rate_spread)``. A
    text whose runs differ from its reference cannot be a reference on this model and is left
    out, with the reason: nothing measured later could explain the difference. Two causes are
    known: the model ends an utterance by itself (EOS) before its text is over, so how much text
    had arrived by then decides what follows (timing); and a greedy near-tie between two codes
    that the float rounding of a batch decides either way (batching).

    Raises :class:`ClientError` (or ``TimeoutError``) when a run fails: nothing can be compared then.
    """
    config = {**session_config, **EXACT_CONFIG}

    async def alone(text: str, rate: float | None) -> ContextResult:
        return await speak_alone(url, text, rate, api_key=api_key, timeout=timeout, **config)

    refs: dict[str, Reference] = {}
    excluded: dict[str, str] = {}

    def check(text: str, r: ContextResult, how: str) -> None:
        ref = refs[text]
        problem = compare_audio(r.audio, ref.audio, ref.sample_rate, exact_tolerance(ref.encoding))
        if problem is not None and text not in excluded:
            assert r.done is not None
            excluded[text] = (
                f"{how}, it {problem} [{r.done.metrics.utterances} utterance(s), {r.done.metrics.frames} "
                f"frames; sent whole, alone: {ref.utterances}, {ref.frames}]"
            )

    slowest = rate_wps * (1 - rate_spread) if rate_spread < 1 else rate_wps
    for text in dict.fromkeys(texts):  # distinct, in order; one at a time: alone in the engine
        r = await alone(text, None)
        assert r.done is not None
        encoding = r.chunks[0].encoding if r.chunks else "pcm_s16le"
        m = r.done.metrics
        refs[text] = Reference(text, r.audio, r.sample_rate, encoding, m.frames, m.utterances)
        check(text, await alone(text, slowest), f"streamed alone at {slowest:.1f} words/s (timing)")
    rates = [rate_wps * (1 - rate_spread + 2 * rate_spread * k / max(1, copies - 1)) for k in range(copies)]
    runs = [(text, rate) for text in refs if text not in excluded for rate in rates]
    results = await asyncio.gather(*(alone(text, rate) for text, rate in runs))
    for (text, rate), r in zip(runs, results, strict=True):
        check(text, r, f"streamed at {rate:.1f} words/s beside {len(runs) - 1} other sessions (batching)")
    return References(
        {t: r for t, r in refs.items() if t not in excluded}, excluded, session_config=dict(EXACT_CONFIG)
    )


@contextlib.asynccontextmanager
async def serve_in_process(
    model: str | Engine,
    *,
    max_streams: int = 32,
    max_frames: int | None = None,
    api_key: str | None = None,
    max_sessions: int = 1024,
    device: str | None = "cpu",
    write_timeout: float | None = None,
) -> AsyncIterator[str]:
    """Serve ``model`` (a spec such as ``random:tiny``, a directory, or an ``Engine``) on
    127.0.0.1, port 0, inside the running event loop; yields the WebSocket URL.

    ``max_frames`` caps each utterance (random weights rarely stop by themselves, and the random
    specs default to 8191 frames). ``write_timeout``: seconds a send to a client may take
    (None: the server's default). An engine passed in is left open for the caller.
    """
    import uvicorn

    from engine import Engine, load_checkpoint
    from realtime import app as server_app
    from realtime.protocol import Limits

    engine: Engine
    own = isinstance(model, str)
    if isinstance(model, str):
        checkpoint = load_checkpoint(model)
        if max_frames is not None:
            generation = dataclasses.replace(checkpoint.generation, max_new_tokens=max_frames + 1)
            checkpoint = dataclasses.replace(checkpoint, generation=generation)
        engine = await asyncio.to_thread(Engine, checkpoint, device=device, max_streams=max_streams)
        name = model
    else:
        engine, name = model, model.checkpoint.name
    options: dict[str, Any] = {
        "model": name,
        "api_key": api_key,
        "max_sessions": max_sessions,
        "limits": Limits(),
    }
    if write_timeout is not None:
        options["write_timeout"] = write_timeout
    settings = server_app.ServerSettings(**options)
    app = server_app.create_app(settings, engine=engine)
    # The app's lifespan would close the engine at shutdown (create_app takes ownership of it);
    # the engine is already loaded, so the lifespan has nothing else to do.
    config = server_app.uvicorn_config(app, settings, port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(), name="tts-server")
    try:
        while not server.started:
            if task.done():
                task.result()  # raises why it did not start
                raise RuntimeError("the server exited before it started")
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/v1/tts/stream"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        if own:
            await asyncio.to_thread(engine.close)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m realtime bench",
        description="Load-test a streaming TTS server with concurrent sessions streaming text like an LLM.",
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--url", default=None, help="server WebSocket URL (default ws://127.0.0.1:8000/v1/tts/stream)"
    )
    target.add_argument(
        "--model", default=None, help="start a server in this process for this model (e.g. random:tiny)"
    )
    p.add_argument("--sessions", "-n", type=int, default=32, help="concurrent sessions (default 32)")
    p.add_argument("--turns", type=int, default=1, help="contexts per session, one after another (default 1)")
    p.add_argument(
        "--rate", type=float, default=8.0, help="words per second per session (default 8, LLM-like)"
    )
    p.add_argument(
        "--rate-spread", type=float, default=0.5, help="per-session rate = rate * U(1-s, 1+s) (default 0.5)"
    )
    p.add_argument(
        "--ramp", type=float, default=1.0, help="seconds over which sessions start (0 = burst; default 1)"
    )
    p.add_argument("--text", action="append", help="text to speak (repeatable; default: built-in replies)")
    p.add_argument("--voice", default=None)
    p.add_argument("--language", default=None)
    p.add_argument("--encoding", default=None, choices=["pcm_s16le", "pcm_f32le", "pcm_mulaw", "pcm_alaw"])
    p.add_argument("--sample-rate", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds texts and rates (default 0)")
    p.add_argument("--timeout", type=float, default=300.0, help="per-context time limit in seconds")
    p.add_argument("--json", dest="json_out", default=None, help="write the full report as JSON here")
    p.add_argument(
        "--exact", action="store_true",
        help="decode greedily and require every context's audio to equal its text's solo run",
    )  # fmt: skip
    p.add_argument(
        "--reference-copies", type=int, default=4,
        help="--exact/--chaos: copies of each text run together to check it is a usable reference (default 4)",
    )  # fmt: skip
    server = p.add_argument_group("in-process server (--model)")
    server.add_argument("--max-streams", type=int, default=32, help="engine batch rows (default 32)")
    server.add_argument(
        "--max-frames", type=int, default=50, help="frame cap per utterance (default 50 = 4 s)"
    )
    server.add_argument("--device", default="cpu")
    server.add_argument(
        "--write-timeout", type=float, default=None,
        help="seconds a send to a client may take (default: 2 with --chaos, else the server's default)",
    )  # fmt: skip
    chaos = p.add_argument_group("chaos (--chaos): misbehaving clients beside exact reference sessions")
    chaos.add_argument("--chaos", action="store_true", help="run the chaos test (see clients/chaos.py)")
    chaos.add_argument(
        "--chaos-clients", type=int, default=None,
        help="misbehaving clients (default: as many as --sessions); a --url server needs --max-sessions "
        "well above sessions + chaos clients (serve's default is 64)",
    )  # fmt: skip
    from clients.chaos import KINDS  # here: clients.chaos imports this module

    chaos.add_argument(
        "--kinds", default=None, help=f"comma-separated misbehaviours (default: all: {', '.join(KINDS)})"
    )
    chaos.add_argument(
        "--duration", type=float, default=0.0, help="soak: repeat chaos rounds for this many seconds"
    )
    chaos.add_argument("--rss-interval", type=float, default=5.0, help="seconds between RSS samples")
    chaos.add_argument(
        "--settle-timeout", type=float, default=30.0, help="seconds to wait for the server to free everything"
    )
    chaos.add_argument(
        "--stall-seconds", type=float, default=60.0,
        help="how long a client that never reads waits for the server to close it (default 60)",
    )  # fmt: skip
    chaos.add_argument(
        "--hold-seconds",
        type=float,
        default=10.0,
        help="how long idle contexts are held at most (default 10)",
    )
    return p


class _Report(Protocol):
    @property
    def passed(self) -> bool: ...

    def format(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


async def _main(args: argparse.Namespace) -> _Report:
    session_config = {
        "voice": args.voice, "language": args.language, "encoding": args.encoding, "sample_rate": args.sample_rate,
    }  # fmt: skip
    session_config = {k: v for k, v in session_config.items() if v is not None}
    kw: dict[str, Any] = dict(
        sessions=args.sessions, turns=args.turns, rate_wps=args.rate, rate_spread=args.rate_spread,
        texts=tuple(args.text or DEFAULT_TEXTS), ramp_s=args.ramp, api_key=args.api_key, seed=args.seed,
        timeout=args.timeout, **session_config,
    )  # fmt: skip
    write_timeout = args.write_timeout
    if write_timeout is None and args.chaos:
        write_timeout = 2.0  # a client that never reads is dropped quickly
    if args.model:
        async with serve_in_process(
            args.model, max_streams=args.max_streams, max_frames=args.max_frames, api_key=args.api_key,
            device=args.device, write_timeout=write_timeout,
        ) as url:  # fmt: skip
            return await _run(url, args, kw, in_process=True)
    return await _run(args.url or "ws://127.0.0.1:8000/v1/tts/stream", args, kw, in_process=False)


async def _run(url: str, args: argparse.Namespace, kw: dict[str, Any], *, in_process: bool) -> _Report:
    if args.chaos:
        from clients.chaos import KINDS, ChaosSettings, run_chaos

        kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else tuple(KINDS)
        settings = ChaosSettings(
            clients=args.sessions if args.chaos_clients is None else args.chaos_clients, kinds=kinds,
            stall_s=args.stall_seconds, hold_s=args.hold_seconds,
        )  # fmt: skip
        return await run_chaos(
            url, chaos=settings, duration_s=args.duration, reference_copies=args.reference_copies,
            settle_s=args.settle_timeout, in_process=in_process, rss_interval=args.rss_interval, **kw,
        )  # fmt: skip
    if args.exact:
        session_config = {k: kw[k] for k in ("voice", "language", "encoding", "sample_rate") if k in kw}
        kw["references"] = await record_references(
            url, kw["texts"], rate_wps=args.rate, rate_spread=args.rate_spread, copies=args.reference_copies,
            api_key=args.api_key, timeout=args.timeout, **session_config,
        )  # fmt: skip
    return await run_load(url, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load test (or the chaos test); exit status 0 only if every check passed."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.sessions < 1 or args.turns < 1 or args.rate <= 0:
        print("--sessions, --turns and --rate must be positive", file=sys.stderr)
        return 2
    if args.chaos:
        from clients.chaos import KINDS, Target

        unknown = set((args.kinds or "").split(",")) - set(KINDS) - {""}
        if unknown:
            print(f"unknown --kinds {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}", file=sys.stderr)
            return 2
        if args.chaos_clients is not None and args.chaos_clients < 0:
            print("--chaos-clients must be >= 0", file=sys.stderr)
            return 2
        if args.url:
            try:
                Target.from_url(args.url)
            except ValueError as e:
                print(e, file=sys.stderr)
                return 2
    try:
        report = asyncio.run(_main(args))
    except (ClientError, TimeoutError, RuntimeError, ValueError) as e:
        print(f"bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(report.format())
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if report.passed else 1
