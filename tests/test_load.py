"""Load: 32 concurrent sessions streaming text at LLM-like rates against one tiny-model server.

Every context must complete with exactly the audio the server says it generated (frames * 1920
samples at 24 kHz, cross-checked with context.done's audio_ms) and no protocol violation seen by
the client. Latency percentiles are printed (``pytest -s``), not asserted: on a shared 2-core CPU
they measure the machine more than the server.

In exact mode (``--exact``, and always under ``--chaos``) sessions decode greedily and every
context's audio must equal its text's solo run sample for sample; texts whose audio depends on
timing or batching on the model are left out first, with the reason.

Texts stay shorter (in tokens) than the frame cap: an utterance that reaches max_frames while its
text is still arriving currently crashes the session (engine: Stream.utterances left empty).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from clients.client import AudioChunk, AudioFlags, ContextResult, DoneEvent, Metrics
from clients.load import (
    DEFAULT_TEXTS,
    LoadReport,
    expected_samples,
    main,
    percentile,
    record_references,
    run_load,
    serve_in_process,
    split_words,
    underruns,
)
from engine.scheduler import Engine
from engine.torch.weights import write_random_checkpoint

SESSIONS = 32


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    ckpt = write_random_checkpoint(
        tmp_path_factory.mktemp("tiny41"), "tiny", "custom_voice", max_new_tokens=41
    )
    eng = Engine(str(ckpt), device="cpu", max_streams=SESSIONS)
    yield eng
    eng.close()


async def test_32_sessions_at_llm_rates_all_complete(engine: Engine) -> None:
    async with serve_in_process(engine) as url:
        report = await run_load(
            url, sessions=SESSIONS, rate_wps=8.0, rate_spread=0.5, ramp_s=1.0, seed=1, timeout=120
        )
    print("\n" + report.format())
    assert isinstance(report, LoadReport) and len(report.contexts) == SESSIONS
    assert not report.failed, report.format()
    rates = {round(c.rate_wps, 3) for c in report.contexts}
    assert len(rates) > SESSIONS // 2 and all(4.0 <= r <= 12.0 for r in rates)  # LLM-like spread
    for c in report.contexts:
        assert c.frames is not None and c.frames > 0
        assert c.samples == c.expected_samples == c.frames * 1920
        assert c.audio_ms == pytest.approx(c.samples / 24.0, abs=0.01)
        assert c.client_first_audio_ms is not None and c.client_first_audio_ms > 0
        assert c.text_ms is not None and c.total_ms is not None and c.total_ms >= c.text_ms
    s = report.summary()
    assert s["completed"] == SESSIONS and s["failed"] == 0 and not s["errors"]
    p50, p95 = s["client_first_audio_ms"]["p50"], s["client_first_audio_ms"]["p95"]
    assert p50 is not None and p95 is not None and 0 < p50 <= p95
    assert s["rtf"]["p50"] is not None and s["rtf"]["p50"] > 0


async def test_exact_mode_compares_every_context_with_its_solo_run(engine: Engine) -> None:
    """--exact: greedy sessions, and each context's audio equals its text alone, sample for sample."""
    texts = DEFAULT_TEXTS[:2]
    async with serve_in_process(engine) as url:
        refs = await record_references(url, texts, rate_wps=30.0, copies=2, timeout=120)
        report = await run_load(
            url, sessions=6, rate_wps=30.0, ramp_s=0.2, texts=texts, seed=3, timeout=120, references=refs
        )
    print("\n" + report.format())
    assert set(refs.by_text) | set(refs.excluded) == set(texts) and refs.by_text, refs.excluded
    assert not report.failed, report.format()
    assert all(c.exact and c.text in refs.by_text for c in report.contexts)
    exact = report.summary()["exact"]
    assert exact["compared"] == exact["exact"] == 6
    assert "audio equal to the text's solo run: 6/6 contexts" in report.format()


async def test_record_references_leaves_out_texts_whose_audio_is_not_theirs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A text whose streamed runs differ from its whole-text solo run cannot be a reference:
    streamed alone (timing: the model ended it early) or beside others (batching)."""
    import clients.load as load

    base = np.linspace(-0.5, 0.5, 4 * 1920, dtype=np.float32)

    async def fake_speak_alone(url: str, text: str, rate: float | None, **kw: object) -> ContextResult:
        audio = base
        if text == "timing" and rate is not None and rate < 8.0:
            audio = base[: 2 * 1920]  # ended early when the text came slowly
        if text == "batching" and rate is not None and rate > 8.0:
            audio = base.copy()
            audio[3 * 1920 :] *= -1  # another code from frame 3
        assert kw.get("temperature") == 0.0 and kw.get("idle_flush_ms") == 0
        frames = len(audio) // 1920
        done = DoneEvent(
            "c", frames * 80.0, Metrics(frames=frames, audio_ms=frames * 80.0, utterances=1), 1.0
        )
        return ContextResult("c", audio, 24000, [], [], done, None, 0.0, 0.1, [])

    monkeypatch.setattr(load, "speak_alone", fake_speak_alone)
    refs = await record_references("ws://x", ["fine", "timing", "batching", "fine"], rate_wps=8.0, copies=3)
    assert list(refs.by_text) == ["fine"]
    assert "streamed alone at 4.0 words/s (timing)" in refs.excluded["timing"]
    assert "has 3840 samples (2.0 frames) where the solo run has 7680 (4.0)" in refs.excluded["timing"]
    assert "(batching)" in refs.excluded["batching"] and "(frame 3)" in refs.excluded["batching"]
    assert refs.session_config == {"temperature": 0.0, "idle_flush_ms": 0}


def test_bench_cli_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    argv = ["--model", "random:tiny", "--max-frames", "20", "--max-streams", "4", "--sessions", "3",
            "--rate", "30", "--ramp", "0", "--exact", "--reference-copies", "2", "--text", DEFAULT_TEXTS[0],
            "--text", DEFAULT_TEXTS[1], "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "audio equal to the text's solo run: 3/3 contexts" in printed
    data = json.loads(out.read_text())
    assert data["summary"]["exact"]["exact"] == 3 and len(data["references"]["texts"]) >= 1
    assert all(c["exact"] for c in data["contexts"])


def test_bench_cli_starts_a_server_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench.json"
    argv = ["--model", "random:tiny", "--max-frames", "20", "--max-streams", "4", "--sessions", "3",
            "--rate", "30", "--ramp", "0", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "completed 3/3 contexts" in printed and "first audio, client (ms): p50" in printed
    data = json.loads(out.read_text())
    assert data["summary"]["completed"] == 3 and len(data["contexts"]) == 3
    assert all(c["ok"] and c["samples"] == c["frames"] * 1920 for c in data["contexts"])
    assert main(["--sessions", "0"]) == 2


def test_report_fails_a_short_context() -> None:
    """The length check is real: a context missing one chunk is reported, not passed."""
    from clients.client import ContextResult, DoneEvent, Metrics
    from clients.load import ContextReport, check_context

    chunks = [_chunk(i, 1920 * i, 1920) for i in range(3)]
    done = DoneEvent("c", 4 * 80.0, Metrics(frames=4, audio_ms=320.0, utterances=1), 1.0)
    result = ContextResult("c", np.zeros(3 * 1920, np.float32), 24000, chunks, [], done, None, 0.0, 0.1, [])
    report = ContextReport(0, "c", 3, 8.0)
    check_context(report, result)
    assert not report.ok
    assert any("expected 7680" in p for p in report.problems)
    assert any("context.done says 320.0" in p for p in report.problems)


def _chunk(seq: int, offset: int, n: int, at: float = 0.0) -> AudioChunk:
    return AudioChunk("c", 0, seq, offset, AudioFlags(0), np.zeros(n, np.float32), 24000, "pcm_s16le", at)


def test_helpers() -> None:
    text = "Hello there,  world.\nNew line"
    assert split_words(text) == ["Hello", " there,", "  world.", "\nNew", " line"]
    assert "".join(split_words(text)) == text
    assert expected_samples(10, 24000) == 19200 and expected_samples(10, 8000) == 6400
    assert expected_samples(3, 22050) == round(3 * 1920 * 22050 / 24000)
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    # 80 ms chunks arriving at 0, 0.05 and 0.30 s: the third comes 140 ms after the audio ran out
    chunks = [_chunk(0, 0, 1920, 0.0), _chunk(1, 1920, 1920, 0.05), _chunk(2, 3840, 1920, 0.30)]
    count, gap = underruns(chunks)
    assert count == 1 and gap == pytest.approx(140.0)
