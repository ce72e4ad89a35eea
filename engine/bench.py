"""`python -m engine bench`: model and codec speed, batched, beside the official package.

Everything is measured in one run, on the same weights, on this machine:
- talker + code predictor: time per batched step at batch 1, 2, 4, 8 (prefill excluded), from
  the engine's own phase timers while B streams generate;
- codec: our streaming decoder per frame (chunks of 1, 4 and 8 frames; batch 1 and 4);
- the whole engine (model + codec with the default chunk schedule): aggregate frames/s and
  real-time factor per stream;
- the official `generate` (per frame, from the difference of two lengths so its prefill drops
  out) and the official `decode` per frame.
It prints a table and can write JSON. Random weights (`random:0.6b`) make the speed
representative without a download; the audio is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import torch

from engine.checkpoint import Checkpoint, load_checkpoint, random_config_dicts
from engine.sampling import SamplingParams

TEXT = (
    "The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly. "
    "Pack my box with five dozen liquor jugs, then sphinx of black quartz, judge my vow. "
    "How vexingly quick daft zebras jump, and the jay, pig, fox, zebra and my wolves quack! "
) * 4
FRAME_MS = 80.0


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _model_ms(engine: Any) -> float:
    ph = engine.stats.phase_ms
    return ph.get("_predict_codes", 0.0) + ph.get("_talker_step", 0.0)


def bench_model(
    engine: Any, batch: int, frames: int, warmup: int, chunk_schedule: list[int]
) -> dict[str, float]:
    """B streams generating together, from `warmup` to `warmup + frames` frames each.

    Reports the median over steps (shared machines have outliers) of the talker + code
    predictor time of a step that advanced all B streams, and the codec time per decoded frame
    (total over the run, so small first chunks and large later ones weigh as they cost).
    """
    sampling = SamplingParams.from_generation_config(engine.checkpoint.generation)
    streams = [
        engine.open_stream(
            voice=engine.default_voice(), sampling=sampling, seed=i, max_frames=warmup + frames,
            chunk_schedule=chunk_schedule,
        )
        for i in range(batch)
    ]  # fmt: skip
    for s in streams:
        s.push_text(TEXT)
        s.end()
    while min(s.metrics.frames for s in streams) < warmup:
        engine.step()
    model_steps: list[float] = []
    codec_ms, codec_frames = 0.0, 0
    while not all(s.finished for s in streams):
        f0, m0 = sum(s.metrics.frames for s in streams), _model_ms(engine)
        c0, d0 = (
            engine.stats.phase_ms.get("_decode_chunks", 0.0),
            sum(len(s.engine_data.pending) for s in streams),
        )
        engine.step()
        _sync(engine.device)
        advanced = sum(s.metrics.frames for s in streams) - f0
        if advanced == batch:
            model_steps.append(_model_ms(engine) - m0)
        decoded = d0 + advanced - sum(len(s.engine_data.pending) for s in streams)
        codec_ms += engine.stats.phase_ms.get("_decode_chunks", 0.0) - c0
        codec_frames += max(0, decoded)
    for s in streams:
        list(s.chunks(timeout=1))
    step = statistics.median(model_steps)
    return {"model_ms_per_step": step, "codec_ms_per_frame": codec_ms / max(1, codec_frames)}


def bench_codec(engine: Any, batch: int, chunk: int, frames: int) -> float:
    """Our streaming codec decoder: median ms per decoded frame, `chunk` frames per call for
    `batch` streams at once (so batch 4 reports the cost of each of the 4 streams' frames)."""
    from engine.torch.codec import CodecStreams

    pool = CodecStreams(engine.backend.codec, batch, device=engine.device, dtype=engine.backend.dtype)
    rows = list(range(batch))
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 2048, (batch, 16, frames + chunk), generator=g).to(engine.device)
    pool.decode(rows, codes[:, :, :chunk])  # warm up
    times = []
    done = 0
    while done < frames:
        _sync(engine.device)
        t0 = time.perf_counter()
        pool.decode(rows, codes[:, :, done : done + chunk])
        _sync(engine.device)
        times.append((time.perf_counter() - t0) * 1000.0 / (chunk * batch))
        done += chunk
    return statistics.median(times)


def official_models(ckpt: Checkpoint, engine: Any) -> tuple[Any, Any]:
    """The official talker and speech-tokenizer models holding exactly our weights."""
    from engine.official import import_official

    import_official()
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Config
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model

    if ckpt.is_random:
        from engine.checkpoint import parse_random_spec

        dicts = random_config_dicts(*parse_random_spec(ckpt.name))
    else:
        assert ckpt.path is not None
        dicts = {
            k: json.loads((ckpt.path / k).read_text())
            for k in ("config.json", "speech_tokenizer/config.json")
        }
    from engine.torch.weights import load_talker

    model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**dicts["config.json"])).eval()
    # The engine's talker is in its fused inference form; load the checkpoint layout afresh.
    model.talker.load_state_dict(load_talker(ckpt, torch.device("cpu"), torch.float32).state_dict())
    model.to(device=engine.device, dtype=engine.backend.dtype)
    codec_cfg = {
        k: v
        for k, v in dicts["speech_tokenizer/config.json"].items()
        if k not in ("architectures", "model_type", "transformers_version")
    }
    tok = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**codec_cfg)).eval()
    tok.decoder.load_state_dict(engine.backend.codec.state_dict())
    tok.to(device=engine.device, dtype=engine.backend.dtype)
    return model, tok


def bench_official(engine: Any, model: Any, tok: Any, short: int, long: int) -> tuple[float, float]:
    """(generate ms per frame, decode ms per frame) of the official code."""
    ids = engine.tokenizer.encode(TEXT)
    template = torch.tensor(
        [[151644, 77091, 198, *ids, 151645, 198, 151644, 77091, 198]], device=engine.device
    )
    speaker = engine.default_voice()
    times = {}
    frames = {}
    for n in (short, long):
        torch.manual_seed(0)
        _sync(engine.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            codes = model.generate(
                input_ids=[template],
                languages=["auto"],
                speakers=[speaker],
                non_streaming_mode=False,
                max_new_tokens=n + 1,
            )[0][0]
        _sync(engine.device)
        times[n], frames[n] = time.perf_counter() - t0, codes.shape[0]
    gen = (times[long] - times[short]) * 1000.0 / max(1, frames[long] - frames[short])
    codes = torch.randint(0, 2048, (1, long, 16), device=engine.device)
    with torch.no_grad():
        tok.decode(codes[:, :4])  # warm up
        _sync(engine.device)
        t0 = time.perf_counter()
        tok.decode(codes)
        _sync(engine.device)
    dec = (time.perf_counter() - t0) * 1000.0 / long
    return gen, dec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:0.6b")
    p.add_argument("--device", default=None)
    p.add_argument("--batches", default="1,2,4,8", help="comma-separated batch sizes")
    p.add_argument("--frames", type=int, default=12, help="measured frames per stream and batch size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--codec-frames", type=int, default=24)
    p.add_argument("--no-official", action="store_true", help="skip the official package's timings")
    p.add_argument("--official-frames", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    from engine.scheduler import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    batches = [int(b) for b in args.batches.split(",")]
    ckpt = load_checkpoint(args.model)
    engine = Engine(ckpt, device=args.device, max_streams=max(batches), start=False)
    info = {
        "model": args.model,
        "device": str(engine.device),
        "dtype": str(engine.backend.dtype).replace("torch.", ""),
        **machine(),
    }
    print(
        f"# {args.model} on {info['device']} ({info.get('gpu') or info['cpu']}), {info['dtype']}, {info['threads']} threads"
    )

    results: dict[str, Any] = {"machine": info, "model": [], "codec": [], "engine": [], "official": {}}
    for b in batches:  # model only: the codec decodes once at the end (largest chunk size)
        step = bench_model(engine, b, args.frames, args.warmup, chunk_schedule=[64])["model_ms_per_step"]
        results["model"].append(
            {"batch": b, "ms_per_step": round(step, 2), "frames_per_s": round(1000.0 * b / step, 2)}
        )
        print(f"model    batch {b}: {step:8.1f} ms/step  {1000.0 * b / step:7.2f} frames/s")
    for chunk in (1, 4, 8):
        for b in (1, 4):
            ms = bench_codec(engine, b, chunk, args.codec_frames)
            results["codec"].append({"chunk": chunk, "batch": b, "ms_per_frame": round(ms, 2)})
            print(f"codec    chunk {chunk} batch {b}: {ms:8.1f} ms/frame")
    for b in batches:  # the whole engine with the default chunk schedule
        r = bench_model(
            engine, b, args.frames, args.warmup, chunk_schedule=list(engine.default_chunk_schedule)
        )
        per_step = r["model_ms_per_step"] + b * r["codec_ms_per_frame"]  # one frame for each stream
        fps = 1000.0 * b / per_step
        rtf = per_step / FRAME_MS  # wall time per 80 ms frame of each stream
        results["engine"].append(
            {
                "batch": b,
                "frames_per_s": round(fps, 2),
                "rtf": round(rtf, 3),
                "audio_s_per_s": round(fps * FRAME_MS / 1000.0, 3),
            }
        )
        print(
            f"engine   batch {b}: {fps:7.2f} frames/s  ({fps * FRAME_MS / 1000.0:.2f} s audio/s, RTF {rtf:.2f} per stream)"
        )
    if not args.no_official:
        try:
            model, tok = official_models(ckpt, engine)
            gen, dec = bench_official(engine, model, tok, 2, 2 + args.official_frames)
            results["official"] = {
                "generate_ms_per_frame": round(gen, 2),
                "decode_ms_per_frame": round(dec, 2),
            }
            ours1 = results["model"][0]["ms_per_step"]
            codec1 = next(c["ms_per_frame"] for c in results["codec"] if c["chunk"] == 1 and c["batch"] == 1)
            results["ratios"] = {
                "model_batch1_vs_official_generate": round(gen / ours1, 2),
                "codec_stream_chunk1_vs_official_decode": round(dec / codec1, 2),
            }
            print(f"official generate: {gen:8.1f} ms/frame  -> ours batch 1 is {gen / ours1:.2f}x faster")
            print(
                f"official decode:   {dec:8.1f} ms/frame  -> ours streaming (chunk 1) is {dec / codec1:.2f}x faster"
            )
        except ImportError as e:
            print(f"official package unavailable: {e}")
    base = results["engine"][0]["frames_per_s"]
    results["scaling"] = {
        f"batch{e['batch']}_vs_batch1": round(e["frames_per_s"] / base, 2) for e in results["engine"]
    }
    print(
        "aggregate frames/s vs batch 1: "
        + ", ".join(f"{k.split('_')[0]} {v:.2f}x" for k, v in results["scaling"].items())
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    engine.close()
    return 0
