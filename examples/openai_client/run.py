"""The official `openai` Python client against this server: streamed PCM to a WAV file.

.venv/bin/python -m realtime serve --model random:tiny &
.venv/bin/python examples/openai_client/run.py --base-url http://127.0.0.1:8000/v1 --out speech.wav
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import soundfile as sf
from openai import OpenAI


def main(args: argparse.Namespace) -> None:
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    t0 = time.perf_counter()
    first = None
    pcm = bytearray()
    with client.audio.speech.with_streaming_response.create(
        model="qwen3-tts", voice=args.voice, input=args.text, response_format="pcm"
    ) as response:
        for chunk in response.iter_bytes(4096):
            first = first or time.perf_counter() - t0
            pcm += chunk
    audio = np.frombuffer(bytes(pcm[: len(pcm) // 2 * 2]), "<i2").astype(np.float32) / 32768
    sf.write(args.out, audio, 24000)
    print(f"first bytes after {first * 1000:.0f} ms; {len(audio) / 24000:.2f} s of audio in {args.out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--voice", default="alloy", help="an OpenAI voice name (alias) or a preset/cloned voice")
    p.add_argument("--text", default="Hello from an OpenAI-compatible streaming endpoint.")
    p.add_argument("--out", default="speech.wav")
    main(p.parse_args())
