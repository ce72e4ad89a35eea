"""`python -m engine bench-backends`: the same phases on each backend, side by side, one run.

Each phase is driven through the `engine.backend.Backend` interface exactly as the scheduler
drives it, on the same weights (a random spec draws the same tensors for every backend), warmed
up, and timed as the median of several repeats:
- prefill of one prompt; one talker step at batch 1 and 4; one code-predictor pass (15 steps)
  at batch 1 and 4; the streaming codec at 1- and 8-frame chunks, batch 1 and 4;
- the whole engine end to end through a real stream (prefill, scheduler, codec and all).
It prints a table with each backend's ratio to the first one and can write JSON. A Mac runs the
same command (mlx then uses the Metal GPU unless `--device cpu`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from engine.backend import Backend, PrefillRow, StepRow, load_backend
from engine.bench import machine
from engine.checkpoint import Checkpoint, load_checkpoint
from engine.prompt import VoiceSpec, build_prefill, role_ids
from engine.sampling import SamplingParams
from engine.text import TextTokenizer

GREEDY = SamplingParams(temperature=0.0, subtalker_temperature=0.0)
TEXT = "The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly."


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def _prompt(ckpt: Checkpoint, tok: TextTokenizer) -> list[Any]:
    cfg = ckpt.config
    name = cfg.speakers[0]
    voice = VoiceSpec(
        name=name, speaker_id=cfg.talker.spk_id[name], dialect=cfg.talker.spk_is_dialect.get(name)
    )
    pre = build_prefill(
        cfg, role=role_ids(cfg, tok.encode("assistant\n")), instruct=None, voice=voice, lang_id=None,
        queue=tok.encode(TEXT), mode="streaming", text_complete=True,
    )  # fmt: skip
    return pre.slots


def phases(backend: Backend, ckpt: Checkpoint, tok: TextTokenizer, repeats: int) -> dict[str, float]:
    """Median ms per call of each phase, through the Backend interface."""
    from engine.backend import ResolvedVoice

    slots = _prompt(ckpt, tok)
    voice = ResolvedVoice(spec=None)
    out: dict[str, float] = {}
    states = [backend.new_row_state(GREEDY) for _ in range(4)]
    rows = [PrefillRow(state=s, row=i, codec_row=i, slots=slots, voice=voice) for i, s in enumerate(states)]
    out["prefill, 1 prompt"] = _median_ms(lambda: backend.prefill(rows[:1]), repeats)
    c0 = backend.prefill(rows)
    n = len(slots)
    for b in (1, 4):
        sub = states[:b]
        first = [0 if c == ckpt.config.talker.codec_eos_id else c for c in c0[:b]]
        hidden = [s.hidden for s in sub]  # a pass consumes the talker hidden: put it back each call

        def predict(sub: list[Any] = sub, first: list[int] = first, hidden: list[Any] = hidden) -> None:
            for s, h in zip(sub, hidden, strict=True):
                s.hidden = h
            backend.predict_codes(sub, first)

        out[f"code predictor (15 steps), batch {b}"] = _median_ms(predict, repeats)
        inputs = [s.frame_embed for s in sub]  # a step consumes its input: put it back each call
        items = [
            StepRow(state=s, row=i, text_id=ckpt.config.tts_pad_id, block_eos=False)
            for i, s in enumerate(sub)
        ]

        def step(
            b: int = b, sub: list[Any] = sub, inputs: list[Any] = inputs, items: list[StepRow] = items
        ) -> None:
            for s, x in zip(sub, inputs, strict=True):
                s.frame_embed = x
            # The same position each call: the step overwrites it, as a retried step would.
            backend.talker_step((0, b), [n] * b, items)

        out[f"talker step, batch {b}"] = _median_ms(step, repeats)
    rng = np.random.default_rng(0)
    for chunk in (1, 8):
        for b in (1, 4):
            codes = rng.integers(0, 2048, size=(b, 16, chunk))
            ms = _median_ms(lambda codes=codes, b=b: backend.decode(list(range(b)), codes), repeats)
            out[f"codec, {chunk}-frame chunks, batch {b} (per frame, all rows)"] = ms / chunk
    return out


def whole_engine(name: str, ckpt: Checkpoint, device: str | None, repeats: int) -> dict[str, float]:
    """One stream end to end through the Engine: ms per 80 ms frame and first audio."""
    from engine.scheduler import Engine

    eng = Engine(ckpt, backend=name, device=device, precision="fp32", max_streams=4)
    try:
        eng.synthesize("Warm up.", sampling=GREEDY, max_frames=8)
        per_frame, first = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s = eng.open_stream(sampling=GREEDY, max_frames=48)
            s.push_text(TEXT)
            s.end()
            t_first = None
            for chunk in s.chunks(timeout=600):
                if chunk.frames and t_first is None:
                    t_first = time.perf_counter() - t0
            per_frame.append((time.perf_counter() - t0) * 1000.0 / max(1, s.metrics.frames))
            first.append((t_first or 0.0) * 1000.0)
        return {"whole engine, 1 stream (ms per frame)": statistics.median(per_frame),
                "whole engine, first audio (ms)": statistics.median(first)}  # fmt: skip
    finally:
        eng.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine bench-backends", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="random:0.6b", help="directory, hub id or random:<shape>")
    p.add_argument("--backends", default="torch,mlx", help="comma-separated; ratios are to the first")
    p.add_argument("--device", default=None, help="passed to every backend (default: each one's own)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    ckpt = load_checkpoint(args.model)
    tok = TextTokenizer.from_dir(ckpt.tokenizer_dir)
    results: dict[str, dict[str, float]] = {}
    for name in names:
        backend = load_backend(
            name, ckpt, max_streams=4, kv_capacity=256, device=args.device, precision="fp32"
        )
        results[name] = phases(backend, ckpt, tok, args.repeats)
        del backend
        results[name] |= whole_engine(name, ckpt, args.device, max(1, args.repeats // 2))
    info = machine()
    print(f"model {args.model}, fp32; {info['cpu']}, {info['cores']} cores, torch threads {info['threads']}")
    base = names[0]
    header = (
        f"{'phase':52s}"
        + "".join(f"{n:>12s}" for n in names)
        + "".join(f"{n + '/' + base:>14s}" for n in names[1:])
    )
    print(header)
    for phase in results[base]:
        row = f"{phase:52s}" + "".join(f"{results[n][phase]:10.1f}ms" for n in names)
        row += "".join(f"{results[n][phase] / results[base][phase]:13.2f}x" for n in names[1:])
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "model": args.model, "precision": "fp32", "ms": results}, f, indent=2)
    return 0
