"""Command line: synthesize a WAV without a server, or run the engine benchmark.

python -m engine --model M --voice V --language L --text T --out F.wav
python -m engine bench --model random:0.6b
python -m engine bench-backends --model random:0.6b --backends torch,mlx
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np


def _synth_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description="Synthesize speech to a WAV file.")
    p.add_argument(
        "--model", default="Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice", help="directory, hub id or random:<shape>"
    )
    p.add_argument("--voice", default=None, help="preset speaker (CustomVoice); default: the model's first")
    p.add_argument("--language", default="auto", help="'auto' or a language name such as english")
    p.add_argument("--text", required=True)
    p.add_argument("--out", required=True, help="output WAV (24 kHz mono, 32-bit float)")
    p.add_argument("--instructions", default=None, help="style instructions (VoiceDesign, 1.7B CustomVoice)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; default from the checkpoint")
    p.add_argument("--stream-text", action="store_true", help="feed the text word by word (incremental path)")
    p.add_argument(
        "--word-delay-ms", type=float, default=100.0, help="stall between words with --stream-text"
    )
    p.add_argument("--text-mode", choices=["streaming", "full"], default="streaming")
    p.add_argument("--max-frames", type=int, default=None, help="cap on generated frames (80 ms each)")
    p.add_argument(
        "--backend", choices=["auto", "torch", "mlx"], default="auto", help="default: mlx on Apple Silicon"
    )
    p.add_argument(
        "--device", default=None, help="torch: cpu|cuda (default cuda when available); mlx: cpu|gpu"
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "int8"],
        default=None,
        help="fp32 is exact against the official package (default: $TTS_PRECISION, else auto)",
    )
    return p


def synth_main(argv: list[str]) -> int:
    args = _synth_parser().parse_args(argv)
    import soundfile as sf

    from engine import (
        BackendError,
        CheckpointError,
        Engine,
        EngineError,
        PromptError,
        SamplingError,
        SamplingParams,
    )

    try:
        engine = Engine(
            args.model, backend=None if args.backend == "auto" else args.backend, device=args.device,
            precision=args.precision,
        )  # fmt: skip
        info = engine.describe()
        print(
            f"engine: {info['backend']} on {info['device']}, precision {info['precision']}", file=sys.stderr
        )
        sampling = None
        if args.temperature is not None:
            base = SamplingParams.from_generation_config(engine.checkpoint.generation)
            sampling = base.with_overrides(temperature=args.temperature)
        if not args.text.strip():
            raise EngineError("empty text: nothing to speak")
        stream = engine.open_stream(
            voice=args.voice, language=args.language, instructions=args.instructions, sampling=sampling,
            seed=args.seed, text_mode=args.text_mode, max_frames=args.max_frames,
        )  # fmt: skip
    except (BackendError, CheckpointError, EngineError, PromptError, SamplingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.stream_text:
        words = args.text.split(" ")
        for i, word in enumerate(words):
            stream.push_text(word if i == 0 else " " + word)
            time.sleep(args.word_delay_ms / 1000.0)
    else:
        stream.push_text(args.text)
    stream.end()
    parts = []
    first_audio = None
    for chunk in stream:
        if chunk.frames and first_audio is None:
            first_audio = time.perf_counter() - t0
        parts.append(chunk.samples)
    elapsed = time.perf_counter() - t0
    engine.close()
    audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    sf.write(args.out, audio, engine.sample_rate, subtype="FLOAT")
    m = stream.metrics
    seconds = len(audio) / engine.sample_rate
    print(
        f"wrote {args.out}: {seconds:.2f} s of audio, {m.frames} frames, {m.utterances} utterance(s); "
        f"first audio after {first_audio * 1000 if first_audio else float('nan'):.0f} ms; "
        f"wall {elapsed:.2f} s (RTF {elapsed / seconds if seconds else float('nan'):.2f})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "bench":
        from engine.bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "bench-backends":
        from engine.bench_backends import main as backends_main

        return backends_main(argv[1:])
    return synth_main(argv)


if __name__ == "__main__":
    sys.exit(main())
