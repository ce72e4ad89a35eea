"""`python -m engine bench`: the whole engine measured through real streams, the official
`generate` beside it at the same batch sizes, and the precision's quality report, as JSON."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from engine.bench import main, percentile
from engine.cpu_features import cpu_features


def test_percentile_interpolates() -> None:
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    assert main(["--model", "random:tiny", "--frames", "6", "--repeats", "2", "--json", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_fp32_bench_measures_streams_end_to_end(tmp_path: Path) -> None:
    other = "int8" if cpu_features().quantized_engine else "fp32"  # fp32: no second run
    r = _run(tmp_path, "--precision", "fp32", "--batches", "1,2", "--no-official", "--compare", other)
    m = r["machine"]
    assert m["precision"] == "fp32" and m["threads"] >= 1 and m["cpu"]
    assert m["cpu_features"] == cpu_features().summary()["flags"]
    assert [e["batch"] for e in r["engine"]] == [1, 2]
    for e in r["engine"]:
        # Every stream ran to its frame cap through the real engine, audio read by its reader.
        assert e["frames_per_stream"] == 6
        assert len(e["wall_ms_runs"]) == 2
        assert 0 < e["first_audio_ms_p50"] <= e["first_audio_ms_p95"]
        # Every phase ran inside the measured wall time: prefill, talker, predictor, codec.
        assert {"prefill", "talker_step", "predict_codes", "decode_chunks"} <= set(e["phase_ms_per_frame"])
        # wall ms per 80 ms frame of each stream: the median run's wall over its 6 frames
        assert e["ms_per_frame_per_stream"] == pytest.approx(
            statistics.median(e["wall_ms_runs"]) / 6, rel=0.01
        )
    assert set(r["scaling"]) == {"batch1_vs_batch1", "batch2_vs_batch1"}
    assert "quality" not in r  # fp32 is the reference itself
    if other == "fp32":
        assert "compare" not in r
        return
    # The other precision, same run, same measurement
    assert r["compare"]["precision"] == "int8"
    assert [e["frames_per_stream"] for e in r["compare"]["engine"]] == [6, 6]
    assert set(r["speedup_vs_int8"]) == {"batch1", "batch2"}


@pytest.mark.oracle
@pytest.mark.skipif(importlib.util.find_spec("qwen_tts") is None, reason="official package not installed")
@pytest.mark.skipif(cpu_features().quantized_engine is None, reason="no int8 kernels on this CPU")
def test_int8_bench_has_official_rows_and_a_passing_quality_report(tmp_path: Path) -> None:
    r = _run(tmp_path, "--precision", "int8", "--batches", "1,2", "--official-frames", "4")
    assert r["machine"]["precision"] == "int8"
    assert [o["batch"] for o in r["official"]] == [1, 2]  # official measured at our batch sizes
    for o in r["official"]:
        assert o["generate_ms_per_step"] > 0 and o["ours_speedup"] > 0
        assert o["runs"] == 2  # timed once after each of our 2 timed runs (interleaved)
    q = r["quality"]
    assert q["talker"]["count"] >= 200
    assert all(q["passes"].values()), q


def test_bench_runs_the_mlx_backend(tmp_path: Path) -> None:
    """`python -m engine bench --backend mlx`: the same end-to-end measurement on MLX."""
    pytest.importorskip("mlx.core")
    r = _run(tmp_path, "--backend", "mlx", "--precision", "fp32", "--batches", "1", "--no-official")
    assert (r["machine"]["backend"], r["machine"]["precision"]) == ("mlx", "fp32")
    assert r["engine"][0]["frames_per_stream"] == 6 and r["engine"][0]["first_audio_ms_p50"] > 0
