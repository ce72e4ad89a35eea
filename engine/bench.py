"""`python -m engine bench`: the whole engine, end to end through real streams, beside the
official package, with the precision's quality report. Everything in one run, on one machine:

- engine: B streams opened on a running `Engine` (its worker thread), each text pushed at once
  and ended, every chunk read by a reader thread, exactly as a server uses it: prefill, the
  scheduler, the talker, the code predictor and the codec are all inside the wall time. Per
  batch size: aggregate frames/s, wall ms per 80 ms frame of each stream, first audio (text
  pushed -> first samples in the reader's hands) p50/p95 over every stream of every repeat.
  One warm-up run first; the figures are medians over `--repeats` runs.
- official: `Qwen3TTSForConditionalGeneration.generate` on the same weights (fp32, its CPU
  default) at each batch size ours runs (it takes lists), per frame from the difference of two
  lengths (its prefill drops out), warmed up, one timing after each of our timed runs (so both
  sides see the same machine load), median.
- quality: for a non-fp32 precision, `engine.torch.quality` against an fp32 copy of the same
  weights (teacher-forced talker and code predictor logits, codec SNR) and the thresholds.
- machine: CPU model, the features that steer kernel choice, torch's level, threads.

It prints a table and writes JSON (`--json`). Random weights (`random:0.6b`) make the speed
representative without a download; the audio is noise. Timing on a shared machine: compare
ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from engine.checkpoint import Checkpoint, load_checkpoint, random_config_dicts
from engine.cpu_features import cpu_features
from engine.sampling import SamplingParams

TEXT = (
    "The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly. "
    "Pack my box with five dozen liquor jugs, then sphinx of black quartz, judge my vow. "
    "How vexingly quick daft zebras jump, and the jay, pig, fox, zebra and my wolves quack! "
) * 4
FRAME_MS = 80.0
TEMPLATE = (151644, 77091, 198)  # <|im_start|>assistant\n ... as the official prompt builds it
TEMPLATE_END = (151645, 198, 151644, 77091, 198)


def machine() -> dict[str, Any]:
    f = cpu_features()
    info: dict[str, Any] = {
        "cpu": f.model or platform.processor(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "cpu_features": f.summary()["flags"], "torch_capability": f.torch_capability,
        "torch": torch.__version__, "platform": platform.platform(),
    }  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ---- the engine, end to end ---------------------------------------------------------------------


def run_streams(engine: Any, batch: int, frames: int, seed: int = 0) -> dict[str, Any]:
    """B streams through the running engine, text pushed at once: wall time, frames, first audio."""
    sampling = SamplingParams.from_generation_config(engine.checkpoint.generation)
    streams = [
        engine.open_stream(voice=engine.default_voice(), sampling=sampling, seed=seed + i, max_frames=frames)
        for i in range(batch)
    ]
    first: list[float | None] = [None] * batch
    samples = [0] * batch
    errors: list[BaseException] = []

    def read(i: int, t0: float) -> None:
        try:
            for chunk in streams[i].chunks(timeout=600):
                if chunk.frames and first[i] is None:
                    first[i] = (time.perf_counter() - t0) * 1000.0
                samples[i] += len(chunk.samples)
        except BaseException as e:  # reported by the caller
            errors.append(e)

    t0 = time.perf_counter()
    readers = [threading.Thread(target=read, args=(i, t0), daemon=True) for i in range(batch)]
    for r in readers:
        r.start()
    for s in streams:
        s.push_text(TEXT)
        s.end()
    for r in readers:
        r.join()
    wall = (time.perf_counter() - t0) * 1000.0
    if errors:
        raise errors[0]
    total = sum(s.metrics.frames for s in streams)
    for s in streams:
        s.close()
    return {"wall_ms": wall, "frames": total, "first_audio_ms": [f for f in first if f is not None]}


def bench_engine(
    engine: Any, batch: int, frames: int, repeats: int, between: Callable[[], None] | None = None
) -> dict[str, Any]:
    """`repeats` timed runs after one warm-up; `between` (the official timing) runs after each,
    so both sides see the same machine load, interleaved, instead of one after the other."""
    run_streams(engine, batch, min(frames, 8), seed=1000)  # warm-up: allocations, kernel choice
    runs = []
    phases: dict[str, float] = {}
    for r in range(repeats):
        before = dict(engine.stats.phase_ms)
        runs.append(run_streams(engine, batch, frames, seed=100 * r))
        for k, v in engine.stats.phase_ms.items():
            phases[k] = phases.get(k, 0.0) + v - before.get(k, 0.0)
        if between is not None:
            between()
    walls = [r["wall_ms"] for r in runs]
    wall = statistics.median(walls)
    n = statistics.median([r["frames"] for r in runs])
    firsts = [f for r in runs for f in r["first_audio_ms"]]
    fps = 1000.0 * n / wall
    per_frame = wall * batch / n  # wall ms per 80 ms frame of each stream
    return {
        "batch": batch,
        "frames_per_stream": round(n / batch, 1),
        "frames_per_s": round(fps, 2),
        "ms_per_frame_per_stream": round(per_frame, 1),
        "rtf": round(per_frame / FRAME_MS, 3),
        "first_audio_ms_p50": round(percentile(firsts, 50), 1) if firsts else None,
        "first_audio_ms_p95": round(percentile(firsts, 95), 1) if firsts else None,
        "wall_ms_runs": [round(w, 1) for w in walls],
        # Where the worker's time went (its own phase timers), per frame of one stream; the
        # headline figures above are wall time, not this sum.
        "phase_ms_per_frame": {
            k.lstrip("_"): round(v / sum(r["frames"] for r in runs) * batch, 1)
            for k, v in sorted(phases.items())
        },
    }


# ---- the official package -----------------------------------------------------------------------


def official_model(ckpt: Checkpoint) -> Any:
    """The official model holding exactly our weights, fp32 on the CPU (its CPU default)."""
    from engine.official import import_official

    import_official()
    import transformers

    transformers.logging.set_verbosity_error()  # per-call generate notices, config defaults
    logging.getLogger("qwen_tts").setLevel(logging.WARNING)
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    from engine.torch.weights import load_talker

    if ckpt.is_random:
        from engine.checkpoint import parse_random_spec

        config = random_config_dicts(*parse_random_spec(ckpt.name))["config.json"]
    else:
        assert ckpt.path is not None
        config = json.loads((ckpt.path / "config.json").read_text())
    model = Qwen3TTSForConditionalGeneration(Qwen3TTSConfig(**config)).eval()
    model.talker.load_state_dict(load_talker(ckpt, torch.device("cpu"), torch.float32).state_dict())
    return model


class OfficialTimer:
    """The official `generate` at `batch` texts: ms per batched step (one frame each), from the
    difference of two lengths so its prefill drops out. `measure()` adds one sample."""

    def __init__(self, engine: Any, model: Any, batch: int, frames: int):
        ids = engine.tokenizer.encode(TEXT)
        self.template = torch.tensor([[*TEMPLATE, *ids, *TEMPLATE_END]])
        self.speaker = engine.default_voice()
        self.model, self.batch, self.frames = model, batch, frames
        self.samples: list[float] = []
        self._run(2)  # warm-up

    def _run(self, n: int) -> tuple[float, int]:
        b = self.batch
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.no_grad():
            codes = self.model.generate(
                input_ids=[self.template] * b, languages=["auto"] * b, speakers=[self.speaker] * b,
                non_streaming_mode=False, max_new_tokens=n + 1,
            )[0]  # fmt: skip
        return time.perf_counter() - t0, min(c.shape[0] for c in codes)

    def measure(self) -> None:
        (t_short, f_short), (t_long, f_long) = self._run(2), self._run(2 + self.frames)
        self.samples.append((t_long - t_short) * 1000.0 / max(1, f_long - f_short))


# ---- quality ------------------------------------------------------------------------------------


def quality(engine: Any, ckpt: Checkpoint) -> dict[str, Any]:
    """The running precision's quality report against fp32 on the same weights."""
    from engine.torch.quality import THRESHOLDS, codec_report, model_report, passes
    from engine.torch.weights import load_codec_decoder, load_talker

    backend = engine.backend
    cpu = torch.device("cpu")
    ref = load_talker(ckpt, cpu, torch.float32).to_inference(groups=1)
    report: dict[str, Any] = model_report(ref, backend.talker, backend.dtype)
    del ref
    report["codec"] = codec_report(load_codec_decoder(ckpt, cpu, torch.float32), backend.codec)
    report["passes"] = passes(report)
    report["thresholds"] = THRESHOLDS
    return report


# ---- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:0.6b")
    p.add_argument(
        "--backend", default="auto", choices=["auto", "torch", "mlx"], help="default: the platform's"
    )
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "int8"])
    p.add_argument("--batches", default="1,4", help="comma-separated stream counts")
    p.add_argument("--frames", type=int, default=40, help="frames per stream per run (80 ms each)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--no-official", action="store_true", help="skip the official package's timings")
    p.add_argument("--official-frames", type=int, default=8, help="frames per official timing run")
    p.add_argument("--no-quality", action="store_true", help="skip the quality report")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--compare",
        default=None,
        choices=["fp32", "bf16", "int8"],
        help="also run the engine in this precision",
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    logging.getLogger("engine").setLevel(logging.WARNING)  # per-stream notices would drown the table
    from engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    batches = [int(b) for b in args.batches.split(",")]
    ckpt = load_checkpoint(args.model)
    t0 = time.perf_counter()
    backend = None if args.backend == "auto" else args.backend
    engine = Engine(
        ckpt, backend=backend, device=args.device, precision=args.precision, max_streams=max(batches)
    )
    load_s = time.perf_counter() - t0
    info = {"model": args.model, **engine.describe(), "load_s": round(load_s, 1), **machine()}
    print(
        f"# {args.model}: {info['backend']} on {info['device']} ({info.get('gpu') or info['cpu']}), "
        f"precision {info['precision']}, {info['threads']} threads; features {' '.join(info['cpu_features'])}"
    )
    results: dict[str, Any] = {"machine": info, "engine": [], "official": []}
    try:
        official = None if args.no_official else _official_model(ckpt)
        results["engine"] = _engine_rows(engine, batches, args, official, results["official"])
        base = results["engine"][0]["frames_per_s"]
        results["scaling"] = {
            f"batch{e['batch']}_vs_batch1": round(e["frames_per_s"] / base, 2) for e in results["engine"]
        }
        del official
        if not args.no_quality and engine.precision != "fp32" and info["backend"] == "torch":
            q = quality(engine, ckpt)
            results["quality"] = q
            print(f"quality  {engine.precision} vs fp32: talker {q['talker']}")
            print(f"         predictor {q['predictor']}")
            print(f"         codec {q['codec']}  passes {q['passes']}")
    finally:
        engine.close()
    if args.compare and args.compare != results["machine"]["precision"]:
        # Another precision on the same machine in the same run: the ratio is what to trust.
        with Engine(
            ckpt, backend=backend, device=args.device, precision=args.compare, max_streams=max(batches)
        ) as other:
            rows = _engine_rows(other, batches, args)
        results["compare"] = {"precision": args.compare, "engine": rows}
        results["speedup_vs_" + args.compare] = {
            f"batch{a['batch']}": round(a["frames_per_s"] / b["frames_per_s"], 2)
            for a, b in zip(results["engine"], rows, strict=True)
        }
        print(f"speedup vs {args.compare}: {results['speedup_vs_' + args.compare]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def _engine_rows(
    engine: Any,
    batches: list[int],
    args: argparse.Namespace,
    official: Any = None,
    official_rows: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Ours at each batch size; with `official`, its `generate` at the same batch size, timed
    between our repeats (appended to `official_rows`)."""
    rows = []
    for b in batches:
        timer = OfficialTimer(engine, official, b, args.official_frames) if official is not None else None
        r = {
            "precision": engine.precision,
            **bench_engine(engine, b, args.frames, args.repeats, timer.measure if timer else None),
        }
        rows.append(r)
        print(
            f"engine   {engine.precision} {b} stream(s): {r['frames_per_s']:7.2f} frames/s, "
            f"{r['ms_per_frame_per_stream']:7.1f} ms per 80 ms frame (RTF {r['rtf']:.2f}), "
            f"first audio p50 {r['first_audio_ms_p50']} p95 {r['first_audio_ms_p95']} ms"
        )
        if timer is not None and official_rows is not None:
            ms = statistics.median(timer.samples)
            row = {
                "batch": b,
                "generate_ms_per_step": round(ms, 1),
                "runs": len(timer.samples),  # one after each of our timed runs
                "frames_per_s": round(1000.0 * b / ms, 2),
                # Ours includes prefill and the codec; theirs is generation alone (no audio).
                "ours_speedup": round(r["frames_per_s"] / (1000.0 * b / ms), 2),
                "ours_ms_per_frame_vs_official": round(r["ms_per_frame_per_stream"] / ms, 3),
            }
            official_rows.append(row)
            print(
                f"official generate, batch {b}: {ms:8.1f} ms/step ({row['frames_per_s']:.2f} frames/s), timed "
                f"between ours -> the whole engine is {row['ours_speedup']:.2f}x faster"
            )
    return rows


def _official_model(ckpt: Checkpoint) -> Any:
    try:
        return official_model(ckpt)
    except ImportError as e:
        print(f"official package unavailable: {e}")
        return None
