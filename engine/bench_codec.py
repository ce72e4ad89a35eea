"""Codec decoder speed at the released shape (random weights): ours, streaming, vs the official.

    python -m engine.bench_codec [--threads 2] [--official-frames 50] [--dtype float32]

Prints ms per decoded frame (80 ms of audio per stream): the official `decoder(codes)` on one
block of frames (what `Qwen3TTSTokenizerV2Model.decode` runs for <= 300 frames), our full pass on
the same block, and our `CodecStreams.decode` fed in chunks of 1/4/8 frames for 1 and 4 streams.
For B streams, "ms/frame" is the wall time of a call divided by chunk x B (throughput); the
latency of one call is in "ms/call". The official column needs the qwen-tts package (dev extra).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable

import torch

from engine.checkpoint import codec_config_dict
from engine.config import CodecDecoderConfig
from engine.torch.codec import CodecDecoder, CodecStreams
from engine.torch.weights import init_random_

RELEASED = codec_config_dict(tiny=False)["decoder_config"]


def _timed(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of `repeat` calls in seconds, after one untimed call (allocations, kernel choice).
    The minimum, because other jobs on a shared machine only ever add time."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _official_decoder(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module | None:
    if importlib.util.find_spec("qwen_tts") is None:
        return None
    from engine.official import import_official  # the torchaudio stub (MODEL.md §8)

    import_official()
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import (
        Qwen3TTSTokenizerV2DecoderConfig,
    )
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Decoder

    official = Qwen3TTSTokenizerV2Decoder(Qwen3TTSTokenizerV2DecoderConfig(**RELEASED)).eval()
    official.load_state_dict(state_dict, strict=True)
    return official.to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--official-frames", type=int, default=50)
    ap.add_argument("--calls", type=int, default=6, help="timed streaming calls per configuration")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)

    ours = init_random_(CodecDecoder(CodecDecoderConfig.from_dict(RELEASED, "released decoder_config")))
    official = _official_decoder(ours.state_dict(), dtype) if args.device == "cpu" else None
    ours.to(args.device, dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    q, n_off = ours.cfg.num_quantizers, args.official_frames
    codes = torch.randint(0, ours.cfg.codebook_size, (4, q, max(n_off, 8 * (args.calls + 1))))

    print(
        f"threads={args.threads} dtype={args.dtype} device={args.device}  (ms per 80 ms frame; lower is better)"
    )
    rows: list[tuple[str, float, float]] = []

    def official_pass() -> float:
        assert official is not None
        with torch.inference_mode():
            return _timed(lambda: official(codes[:1, :, :n_off]), 3)

    # The official pass is timed before and after ours, and the faster kept: a shared machine
    # that slows down in between must not flatter either side.
    official_s = official_pass() if official is not None else 0.0

    def full() -> None:
        ours(codes[:1, :, :n_off].to(args.device))
        sync()

    s = _timed(full, 3)
    rows.append((f"ours forward, {n_off} frames", s * 1e3, s * 1e3 / n_off))
    for batch in (1, 4):
        for chunk in (1, 4, 8):
            streams = CodecStreams(ours, batch, args.device, dtype)
            rows_idx = list(range(batch))
            pos = 0

            def call(
                streams: CodecStreams = streams, rows_idx: list[int] = rows_idx, chunk: int = chunk
            ) -> None:
                nonlocal pos
                streams.decode(rows_idx, codes[: len(rows_idx), :, pos : pos + chunk])
                pos = (pos + chunk) % (codes.shape[-1] - chunk)
                sync()

            for _ in range(3):  # warm up: allocations, kernel choice
                call()
            s = _timed(call, args.calls)
            rows.append((f"ours streaming, batch {batch}, chunk {chunk}", s * 1e3, s * 1e3 / (chunk * batch)))
    if official is not None:
        s = min(official_s, official_pass())
        rows.insert(0, (f"official decoder(codes), {n_off} frames", s * 1e3, s * 1e3 / n_off))
    ref = rows[0][2] if official is not None else None
    print(f"{'':48s} {'ms/call':>9s} {'ms/frame':>9s} {'vs official':>11s}")
    for name, per_call, per_frame in rows:
        speedup = f"{ref / per_frame:10.2f}x" if ref else ""
        print(f"{name:48s} {per_call:9.1f} {per_frame:9.1f} {speedup}")


if __name__ == "__main__":
    main()
