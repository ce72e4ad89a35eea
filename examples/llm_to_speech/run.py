"""An LLM voice agent's loop: stream the LLM's tokens into the TTS while the LLM still writes,
play (here: record) the audio as it arrives, and barge in.

A fake LLM yields sub-word tokens at a jittery 20-40 tokens/s, as a chat completion stream
does. Each token goes to the server as a `text.append` the moment it exists; the server
commits only stable text, so the audio equals what the whole answer would give. With
`--barge-in-after S` the user "interrupts" after S seconds of audio: `context.cancel` stops
generation at once and no audio of that turn follows.

    .venv/bin/python -m realtime serve --model random:tiny &
    .venv/bin/python examples/llm_to_speech/run.py --url ws://127.0.0.1:8000/v1/tts/stream --out answer.wav
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import time
from collections.abc import AsyncIterator

import soundfile as sf

from clients.client import AudioChunk, CancelledEvent, DoneEvent, TTSClient

ANSWER = (
    "Sure! Your flight to Lisbon leaves at 9:30 tomorrow morning from gate B12. "
    "I've added the confirmation to your calendar, and the weather there looks sunny."
)


async def fake_llm(text: str, rate: float, rng: random.Random) -> AsyncIterator[str]:
    """Sub-word pieces (like BPE tokens: a word may arrive in parts) at a jittery rate."""
    for word in re.findall(r"\s*\S+", text):
        cut = rng.randint(1, max(1, len(word) - 1)) if len(word) > 4 and rng.random() < 0.5 else len(word)
        for piece in (word[:cut], word[cut:]):
            if piece:
                await asyncio.sleep(rng.uniform(0.5, 1.5) / rate)
                yield piece


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    async with TTSClient.connect(
        args.url, api_key=args.api_key, voice=args.voice, language=args.language
    ) as client:
        turn = client.context()
        t0 = time.perf_counter()

        async def speak() -> None:
            async for token in fake_llm(args.text, args.tokens_per_second, rng):
                await turn.append(token)
            await turn.end()

        producer = asyncio.create_task(speak())
        audio, first = [], None
        async for item in turn:
            if isinstance(item, AudioChunk):
                first = first or time.perf_counter() - t0
                audio.append(item.samples)
                heard = sum(len(a) for a in audio) / item.sample_rate
                if args.barge_in_after and heard >= args.barge_in_after:
                    producer.cancel()
                    await turn.cancel()  # barge-in: nothing of this turn is sent after this
            elif isinstance(item, (DoneEvent, CancelledEvent)):
                print(f"{type(item).__name__}: {item.audio_ms:.0f} ms of audio")
        producer.cancel()
        samples = [s for a in audio for s in a]
        sf.write(args.out, samples, turn.sample_rate or 24000)
        print(f"first audio {first * 1000:.0f} ms after the first token; wrote {args.out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1/tts/stream")
    p.add_argument("--api-key", default=None)
    p.add_argument("--voice", default=None)
    p.add_argument("--language", default="auto")
    p.add_argument("--text", default=ANSWER)
    p.add_argument("--tokens-per-second", type=float, default=30.0)
    p.add_argument(
        "--barge-in-after", type=float, default=0.0, help="cancel after this many seconds of audio"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="answer.wav")
    asyncio.run(main(p.parse_args()))
