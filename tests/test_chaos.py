"""Chaos: reference sessions stay exact while misbehaving clients attack the same server.

The round test runs every misbehaviour of clients/chaos.py once or more beside four greedy
reference sessions on an in-process tiny-model server (write timeout 2 s) and requires: every
reference context equal, sample for sample, to its text's solo run; no internal error (an
``internal`` error event, a close 1011, an HTTP 5xx) and no unexpected answer seen by any
client; nothing left in the engine or the session table afterwards; the stalled client closed by
the server. Its failure message is the whole report, which lists every problem by kind.
Latencies are printed (``pytest -s``), not asserted.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from clients.chaos import (
    KINDS,
    ChaosReport,
    ChaosSettings,
    KindStats,
    Round,
    RSSReport,
    Target,
    leaked,
    run_chaos,
)
from clients.client import ContextResult, DoneEvent, Metrics
from clients.load import (
    AUDIO_NOISE,
    DEFAULT_TEXTS,
    ContextReport,
    LoadReport,
    Reference,
    References,
    compare_audio,
    exact_tolerance,
    main,
    serve_in_process,
)

TEXTS = DEFAULT_TEXTS[:3]


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_chaos_round_keeps_references_exact_and_leaks_nothing(tmp_path: Path) -> None:
    settings = ChaosSettings(clients=len(KINDS), hold_s=3.0, stall_s=120.0)  # stall_s: a deadlock guard
    async with serve_in_process(
        "random:tiny", max_streams=8, max_frames=30, write_timeout=2.0, max_sessions=256
    ) as url:
        report = await run_chaos(
            url, sessions=4, chaos=settings, rate_wps=30.0, ramp_s=0.2, texts=TEXTS, reference_copies=2,
            settle_s=30.0, in_process=True, rss_interval=1.0, timeout=120.0,
        )  # fmt: skip
    text = report.format()
    print("\n" + text)
    json.dumps(report.to_dict())  # the --json output is plain JSON
    summary = report.summary()
    assert report.references.by_text, text
    kinds = report.kinds
    assert set(kinds) == set(KINDS) and all(k.runs >= 1 and k.sent > 0 for k in kinds.values()), text
    refs = [*report.baseline.contexts, *report.chaos_contexts]
    assert len(refs) == 8, text
    not_exact = [f"{c.session}: {c.problems}" for c in refs if not (c.ok and c.exact)]
    assert not not_exact, f"references not exact: {not_exact}\n{text}"
    assert summary["internal_errors"] == 0, text
    assert summary["unexpected_answers"] == 0, text
    assert not leaked(report.baseline_leftover) and not report.leaks, text
    let_go = kinds["stall"].notes["closed by the server"] + kinds["stall"].notes["reset by the server"]
    assert let_go >= 1, f"the stalled client was not let go\n{text}"
    assert summary["rss"]["samples"] >= 1 and summary["rss"]["max_mib"] > 0
    assert report.passed, text


# ---- the pieces, without a server -----------------------------------------------------------


def test_chaos_only_targets_loopback() -> None:
    t = Target.from_url("ws://localhost:8123/v1/tts/stream", "key")
    assert (t.host, t.port, t.http_base) == ("127.0.0.1", 8123, "http://127.0.0.1:8123")
    assert t.headers == {"Authorization": "Bearer key"}
    assert Target.from_url("ws://[::1]:9/v1/tts/stream").http_base == "http://[::1]:9"
    for url in (
        "ws://example.com/v1/tts/stream", "ws://10.0.0.1:8000/v1/tts/stream", "wss://127.0.0.1/v1/tts/stream",
        "http://127.0.0.1:8000/", "ws://127.0.0.1.example.com/",
    ):  # fmt: skip
        with pytest.raises(ValueError):
            Target.from_url(url)
    # the CLI refuses before connecting anywhere, and refuses unknown behaviours
    assert main(["--chaos", "--url", "ws://example.com/v1/tts/stream"]) == 2
    assert main(["--chaos", "--kinds", "garbage,nonsense"]) == 2


def test_compare_audio_allows_codec_noise_not_other_codes() -> None:
    rng = np.random.default_rng(0)
    ref = rng.uniform(-0.5, 0.5, 3 * 1920).astype(np.float32)
    tol = exact_tolerance("pcm_s16le")
    assert tol == pytest.approx(AUDIO_NOISE + 1 / 32768)
    assert exact_tolerance("pcm_mulaw") > exact_tolerance("pcm_s16le") > exact_tolerance("pcm_f32le")
    assert compare_audio(ref, ref, 24000, tol) is None
    assert compare_audio(ref + np.float32(1 / 32768), ref, 24000, tol) is None  # one LSB of rounding
    other = ref.copy()
    other[2 * 1920 + 5] += 0.2  # a different code in frame 2
    problem = compare_audio(other, ref, 24000, tol)
    assert problem is not None and "from sample 3845 (frame 2)" in problem
    problem = compare_audio(ref[:1920], ref, 24000, tol)
    assert problem is not None and "1920 samples (1.0 frames)" in problem
    assert "960 samples (1.0 frames) where the solo run has 1920 (2.0)" in (
        compare_audio(ref[:960], ref[:1920], 12000, tol) or ""
    )


def test_references_check_fails_a_context_whose_audio_differs() -> None:
    audio = np.linspace(-0.5, 0.5, 2 * 1920, dtype=np.float32)
    refs = References({"Hi.": Reference("Hi.", audio, 24000, "pcm_s16le", 2, 1)})

    def result(samples: np.ndarray) -> ContextResult:
        done = DoneEvent(
            "c", len(samples) / 24.0, Metrics(frames=2, audio_ms=len(samples) / 24.0, utterances=1), 1.0
        )
        return ContextResult("c", samples, 24000, [], [], done, None, 0.0, 0.1, [])

    same = ContextReport(0, "c", 1, 8.0, ok=True, text="Hi.")
    refs.check(same, result(audio.copy()))
    assert same.ok and same.exact and same.bit_identical
    noisy = ContextReport(0, "c", 1, 8.0, ok=True, text="Hi.")
    refs.check(noisy, result(audio + np.float32(2e-5)))
    assert noisy.ok and noisy.exact and not noisy.bit_identical
    wrong = ContextReport(0, "c", 1, 8.0, ok=True, text="Hi.")
    changed = audio.copy()
    changed[1920:] = 0
    refs.check(wrong, result(changed))
    assert not wrong.ok and wrong.exact is False and any("frame 1" in p for p in wrong.problems)
    unknown = ContextReport(0, "c", 1, 8.0, ok=True, text="not a reference")
    refs.check(unknown, result(audio))
    assert unknown.ok and unknown.exact is None


def _report(*, exact: bool = True, internal: int = 0, unexpected: int = 0, left: int = 0) -> ChaosReport:
    ctx = ContextReport(0, "turn-0", 3, 8.0, ok=exact, text="Hi.", exact=exact, client_first_audio_ms=100.0)
    load = LoadReport("ws://127.0.0.1:1/v1/tts/stream", 1, 1, 8.0, 1.0, [ctx])
    stats = KindStats("garbage", clients=1, runs=2, sent=10)
    stats.errors["invalid_json"] += 3
    for _ in range(internal):
        stats.add_internal("close 1011")
    for _ in range(unexpected):
        stats.add_unexpected("not JSON: accepted, expected an error")
    clean = {"streams": 0, "queued_streams": 0, "sessions": 0, "waited_s": 0.1}
    rnd = Round(load, {"garbage": stats}, {**clean, "streams": left}, 1.0)
    rss = RSSReport("test", [(0.0, 100 << 20), (1.0, 120 << 20), (2.0, 110 << 20), (3.0, 110 << 20)])
    return ChaosReport(load.url, ChaosSettings(clients=1), References({}), load, clean, [rnd], rss)


def test_chaos_report_passes_only_when_everything_holds() -> None:
    good = _report()
    assert good.passed and "PASSED" in good.format()
    s = good.summary()
    assert s["with_chaos"]["exact_str"] == "1/1" and s["p95_ratio"] == pytest.approx(1.0)
    assert s["rss"]["start_mib"] == 100 and s["rss"]["max_mib"] == 120 and s["rss"]["end_mib"] == 110
    assert s["rss"]["last_half_slope_mib_per_min"] == pytest.approx(0.0)
    data = json.loads(json.dumps(good.to_dict()))
    assert data["misbehaviours"]["garbage"]["errors"] == {"invalid_json": 3}
    for bad, why in (
        (_report(exact=False), "reference not exact"),
        (_report(internal=2), "internal errors"),
        (_report(unexpected=1), "unexpected answers"),
        (_report(left=1), "a leaked stream"),
    ):
        assert not bad.passed, why
        assert "FAILED" in bad.format()
    text = _report(internal=3).format()
    assert "internal [garbage] close 1011 (x3)" in text  # repeated problems are counted, not listed


def test_kind_stats_merge_counts_and_keeps_few_examples() -> None:
    a, b = KindStats("http_speech", clients=2, runs=1), KindStats("http_speech", clients=2, runs=3)
    a.http["400"] += 2
    b.http["400"] += 1
    b.http["500"] += 1
    for i in range(30):
        b.add_unexpected(f"case {i}")
    a.merge(b)
    assert a.runs == 4 and a.clients == 2 and a.http == Counter({"400": 3, "500": 1})
    assert a.unexpected == 30 and len(a.unexpected_samples) == 20
    assert leaked({"streams": 0, "queued_streams": 0, "sessions": 1})
    assert not leaked({"streams": 0, "queued_streams": 0, "sessions": 0, "waited_s": 3})
