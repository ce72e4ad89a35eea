"""``python -m clients say "text" --out out.wav``: stream text like an LLM, save the speech.

The text is sent word by word at ``--rate`` words per second (default 8, about what a chat LLM
produces), so the numbers printed are the ones a voice agent would see: time to first audio is
measured at the client from the first word sent to the first audio frame received, next to the
server's own metrics from ``context.done``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf

from clients.client import ClientError, ContextResult, TTSClient
from clients.load import speak, split_words
from realtime.protocol import ENCODINGS, SAMPLE_RATES

DEFAULT_URL = "ws://127.0.0.1:8000/v1/tts/stream"


@dataclass
class SayResult:
    result: ContextResult
    text_s: float  # first word sent -> text.end sent
    wall_s: float  # first word sent -> context.done received


async def say(
    text: str,
    *,
    url: str = DEFAULT_URL,
    out: str | Path | None = None,
    rate_wps: float = 8.0,
    api_key: str | None = None,
    **session_config: Any,
) -> SayResult:
    """Speak ``text`` through the server and optionally write a WAV file.

    The WAV holds the received samples: 16-bit PCM, or 32-bit float when the stream was
    ``pcm_f32le`` (so nothing is lost), at the stream's output rate.
    """
    async with TTSClient.connect(url, api_key, **session_config) as client:
        result, text_s = await speak(client, text, rate_wps)
    done_at = result.done.received_at if result.done else time.perf_counter()
    wall_s = done_at - (result.first_text_at or done_at)
    if out is not None:
        encoding = result.chunks[0].encoding if result.chunks else "pcm_s16le"
        subtype = "FLOAT" if encoding == "pcm_f32le" else "PCM_16"
        sf.write(str(out), result.audio, result.sample_rate, subtype=subtype, format="WAV")
    return SayResult(result, text_s, wall_s)


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def report(r: SayResult, out: str | Path | None, rate_wps: float, words: int) -> str:
    res = r.result
    lines = [
        f"audio: {res.duration_s:.2f} s at {res.sample_rate} Hz in {len(res.chunks)} chunks"
        + (f" -> {out}" if out else ""),
        f"first audio (client, first word sent -> first audio received): {_fmt_ms(res.first_audio_ms)}",
        f"text: {words} words streamed in {r.text_s:.2f} s (~{rate_wps:g} words/s); "
        f"done {r.wall_s:.2f} s after the first word",
    ]
    if res.done is not None:
        m = res.done.metrics
        rtf = "-" if m.rtf is None else f"{m.rtf:.3f}"
        lines.append(
            f"server: first audio {_fmt_ms(m.first_text_to_first_audio_ms)}, generate {m.generate_ms:.0f} ms, "
            f"rtf {rtf}, frames {m.frames}, audio {m.audio_ms:.0f} ms, stall {m.stall_ms:.0f} ms, "
            f"utterances {m.utterances}"
        )
    elif res.cancelled is not None:
        lines.append("the context was cancelled")
    for v in res.violations:
        lines.append(f"protocol violation: {v}")
    return "\n".join(lines)


def _say_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clients say",
        description="Stream text word by word to the TTS server (like an LLM) and write the speech to a WAV.",
    )
    p.add_argument("text", help='the text to speak ("-" reads standard input)')
    p.add_argument("--url", default=DEFAULT_URL, help=f"server WebSocket URL (default {DEFAULT_URL})")
    p.add_argument("--out", "-o", default="out.wav", help="WAV file to write (default out.wav)")
    p.add_argument("--voice", default=None, help="a voice the server offers (default: the server's)")
    p.add_argument("--language", default=None, help='"auto" or a language name such as english')
    p.add_argument("--instructions", default=None, help="style instructions (models that take them)")
    p.add_argument("--rate", type=float, default=8.0, help="words per second sent (default 8, LLM-like)")
    p.add_argument("--api-key", default=None, help="bearer token when the server requires one")
    p.add_argument("--encoding", default=None, choices=ENCODINGS, help="wire encoding (default pcm_s16le)")
    p.add_argument(
        "--sample-rate", type=int, default=None, choices=SAMPLE_RATES, help="output rate (default 24000)"
    )
    p.add_argument("--chunk-schedule", default=None, help="codec frames per chunk, e.g. 1,2,4,8")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--seed", type=int, default=None)
    return p


def _say(argv: Sequence[str]) -> int:
    args = _say_parser().parse_args(list(argv))
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        print("nothing to say: the text is empty", file=sys.stderr)
        return 2
    if args.rate <= 0:
        print("--rate must be positive", file=sys.stderr)
        return 2
    config: dict[str, Any] = {
        "voice": args.voice, "language": args.language, "instructions": args.instructions,
        "encoding": args.encoding, "sample_rate": args.sample_rate, "temperature": args.temperature,
    }  # fmt: skip
    config = {k: v for k, v in config.items() if v is not None}
    if args.seed is not None:
        config["seed"] = args.seed
    if args.chunk_schedule:
        try:
            config["chunk_schedule"] = [int(x) for x in args.chunk_schedule.split(",")]
        except ValueError:
            print("--chunk-schedule takes integers separated by commas, e.g. 1,2,4,8", file=sys.stderr)
            return 2
    try:
        result = asyncio.run(
            say(text, url=args.url, out=args.out, rate_wps=args.rate, api_key=args.api_key, **config)
        )
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(report(result, args.out, args.rate, len(split_words(text))))
    res = result.result
    return 0 if res.done is not None and not res.violations else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m clients say TEXT [--url URL] [--out out.wav] [options]", file=sys.stderr)
        return 0 if argv else 2
    if argv[0] != "say":
        print(f"unknown command {argv[0]!r}; expected say", file=sys.stderr)
        return 2
    return _say(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
