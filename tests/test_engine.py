"""The engine end to end on tiny checkpoints: the official package's output for the whole text,
streamed text equal to whole text, batching equal to running alone, cancel, churn, bad use.
Every test that holds for any backend runs once per backend (the `backend` fixture).

Most tests drive `Engine.step()` by hand (no worker thread), which makes "text arrives between
these two steps" exact and the tests deterministic.
"""

from __future__ import annotations

import gc
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine import (
    AudioChunk,
    CheckpointError,
    Engine,
    EngineError,
    OverloadedError,
    PromptError,
    SamplingParams,
    State,
    Stream,
    StreamClosedError,
    VoiceError,
    load_checkpoint,
)

GREEDY = SamplingParams(temperature=0.0, subtalker_temperature=0.0)
TEXT = "Hello, world. How are you today? I hope the weather is nice where you are."


def run_until_done(engine: Engine, streams: list[Stream], max_steps: int = 100_000) -> None:
    for _ in range(max_steps):
        if all(s.finished for s in streams):
            return
        engine.step()
    raise AssertionError("streams did not finish")


def collect(stream: Stream) -> tuple[np.ndarray, np.ndarray]:
    """(codes [frames, 16], audio) of everything a finished stream delivered."""
    chunks = list(stream.chunks(timeout=5))
    codes = np.concatenate(
        [c.codes for c in chunks if c.codes is not None and len(c.codes)] or [np.zeros((0, 16), int)]
    )
    audio = np.concatenate([c.samples for c in chunks] or [np.zeros(0, np.float32)])
    return codes, audio


def speak(
    engine: Engine, text: str, deltas: list[str] | None = None, **kw: Any
) -> tuple[np.ndarray, np.ndarray]:
    s = engine.open_stream(**kw)
    for d in deltas or [text]:
        s.push_text(d)
    s.end()
    run_until_done(engine, [s])
    return collect(s)


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path, backend: str) -> Engine:
    e = Engine(str(tiny_ckpt), backend=backend, device="cpu", max_streams=4, start=False)
    yield e
    e.close()


def test_whole_text_matches_official(tiny_ckpt: Path, engine: Engine, official_tiny: Any) -> None:
    """Greedy codes identical to qwen-tts for >= 100 frames, and the audio its decode gives."""
    ids = engine.tokenizer.encode(TEXT)
    template = torch.tensor([[151644, 77091, 198, *ids, 151645, 198, 151644, 77091, 198]])
    model = official_tiny.model
    with torch.no_grad():
        ref_codes = model.generate(
            input_ids=[template], languages=["english"], speakers=["ryan"], non_streaming_mode=False,
            do_sample=False, subtalker_dosample=False, max_new_tokens=121,
        )[0][0]  # fmt: skip
        ref_wav = model.speech_tokenizer.decode([{"audio_codes": ref_codes}])[0][0]
    assert ref_codes.shape[0] >= 100
    codes, audio = speak(engine, TEXT, voice="ryan", language="english", sampling=GREEDY, max_frames=120)
    np.testing.assert_array_equal(codes, ref_codes.numpy())
    assert audio.shape == ref_wav.shape
    np.testing.assert_allclose(audio, ref_wav, atol=2e-4, rtol=0)


def test_full_text_mode_matches_official(engine: Engine, official_tiny: Any) -> None:
    ids = engine.tokenizer.encode(TEXT)
    template = torch.tensor([[151644, 77091, 198, *ids, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        ref = official_tiny.model.generate(
            input_ids=[template], languages=["auto"], speakers=["dylan"], non_streaming_mode=True,
            do_sample=False, subtalker_dosample=False, max_new_tokens=41,
        )[0][0]  # fmt: skip
    codes, _ = speak(engine, TEXT, voice="dylan", sampling=GREEDY, max_frames=40, text_mode="full")
    np.testing.assert_array_equal(codes, ref.numpy())


def random_deltas(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(30, len(text) - 1))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_streamed_text_equals_whole_text(engine: Engine, sampling: str) -> None:
    """Any split into deltas, with any number of engine steps between them (stalls), gives the
    codes of the whole text at once."""
    params = GREEDY if sampling == "greedy" else SamplingParams(seed=1234)
    whole, whole_audio = speak(
        engine, TEXT, voice="serena", language="english", sampling=params, max_frames=60
    )
    rng = random.Random(5)
    for _ in range(4):
        s = engine.open_stream(voice="serena", language="english", sampling=params, max_frames=60)
        for d in random_deltas(TEXT, rng):
            s.push_text(d)
            for _ in range(rng.randint(0, 6)):  # the model runs (and stalls) between deltas
                engine.step()
        s.end()
        run_until_done(engine, [s])
        codes, audio = collect(s)
        np.testing.assert_array_equal(codes, whole)
        np.testing.assert_allclose(audio, whole_audio, atol=1e-5, rtol=0)
        assert s.metrics.frames == len(whole)


def test_stall_does_not_feed_pad(engine: Engine) -> None:
    """A stream without its next text token sits out the talker step: its KV length stays."""
    s = engine.open_stream(voice="ryan", sampling=GREEDY, max_frames=50)
    s.push_text("Hello there my")  # commits "Hello", " there" (" my" may grow)
    for _ in range(20):
        engine.step()
    w = s.engine_data
    length, frames = w.length, w.frame
    for _ in range(10):
        engine.step()
    assert (w.length, w.frame) == (length, frames), "the stalled stream advanced without text"
    assert w.consumed == len(w.utterance.ids)
    s.push_text(" friend.")
    engine.step()
    engine.step()
    assert w.length > length
    s.cancel()
    engine.step()


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_batch_equals_alone(engine: Engine, sampling: str) -> None:
    """Streams with different texts, voices, languages and stalls, joining and leaving at random
    steps, each produce exactly the codes they produce alone: greedy, and sampled with a seed
    per stream (each row draws from its own generator, whatever its batch-mates do)."""
    texts = [
        ("ryan", "english", "Good morning! Your table for two is ready."),
        ("serena", "auto", "The quick brown fox jumps over the lazy dog, twice."),
        ("eric", "chinese", "Numbers: 1, 2, 3 and 42."),
        ("vivian", "english", "Short."),
        ("aiden", "auto", "Let's see how batching holds up when streams come and go at random."),
        ("ono_anna", "japanese", "A longer sentence to keep this stream busy for a while, please."),
    ]
    params = {
        i: GREEDY if sampling == "greedy" else SamplingParams(seed=100 + i, top_k=20)
        for i in range(len(texts))
    }
    alone = {
        i: speak(engine, t, voice=v, language=lang, sampling=params[i], max_frames=30)[0]
        for i, (v, lang, t) in enumerate(texts)
    }
    rng = random.Random(11)
    plans = {i: random_deltas(t, rng) for i, (_, _, t) in enumerate(texts)}
    start_at = {i: rng.randint(0, 40) for i in plans}
    streams: dict[int, Stream] = {}
    step = 0
    while len(streams) < len(texts) or not all(s.finished for s in streams.values()):
        for i, (v, lang, _) in enumerate(texts):
            if i not in streams and step >= start_at[i]:
                streams[i] = engine.open_stream(voice=v, language=lang, sampling=params[i], max_frames=30)
            if i in streams and plans[i] and rng.random() < 0.4:
                streams[i].push_text(plans[i].pop(0))
                if not plans[i]:
                    streams[i].end()
        engine.step()
        step += 1
        assert step < 20_000
    for i, s in streams.items():
        np.testing.assert_array_equal(collect(s)[0], alone[i], err_msg=f"stream {i} differs in the batch")
    assert engine.stats.batch_size.counts[1:] != [0] * (len(engine.stats.batch_size.counts) - 1)


def test_flush_then_more_text_starts_new_utterance(engine: Engine) -> None:
    s = engine.open_stream(voice="ryan", sampling=GREEDY, max_frames=12)
    s.push_text("First part.")
    s.flush()
    s.push_text("Second part.")
    s.end()
    run_until_done(engine, [s])
    chunks = list(s.chunks(timeout=5))
    assert sorted({c.utterance for c in chunks}) == [0, 1]
    ends = [c for c in chunks if c.last_in_utterance]
    assert [c.utterance for c in ends] == [0, 1]
    assert chunks[-1].last and sum(c.last for c in chunks) == 1
    # Each utterance is what it would be alone.
    first, _ = speak(engine, "First part.", voice="ryan", sampling=GREEDY, max_frames=12)
    got = np.concatenate([c.codes for c in chunks if c.utterance == 0 and c.frames])
    np.testing.assert_array_equal(got, first)
    assert s.metrics.utterances == 2


def test_chunk_schedule(engine: Engine) -> None:
    s = engine.open_stream(voice="ryan", sampling=GREEDY, max_frames=20, chunk_schedule=[1, 2, 4])
    s.push_text(TEXT)
    s.end()
    run_until_done(engine, [s])
    sizes = [c.frames for c in s.chunks(timeout=1)]
    assert sizes[:4] == [1, 2, 4, 4]
    assert sum(sizes) == 20


def test_cancel_inside_a_step_delivers_nothing_more(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancel that lands while the worker is mid-step (here: while the codec decodes the
    stream's chunk) wins: the chunk being decoded is dropped, not queued behind the end."""
    s = engine.open_stream(voice="ryan", sampling=GREEDY, max_frames=40, chunk_schedule=[1])
    s.push_text(TEXT)
    s.end()
    while s.queued_chunks == 0:
        engine.step()
    decode = engine.backend.decode

    def decode_then_cancel(rows: Any, codes: Any) -> Any:
        out = decode(rows, codes)
        s.cancel()  # the client barges in while this chunk is being decoded
        return out

    monkeypatch.setattr(engine.backend, "decode", decode_then_cancel)
    engine.step()
    monkeypatch.undo()
    for _ in range(5):
        engine.step()
    assert s.state is State.CANCELLED
    # After cancel() only the end marker is queued: a chunk delivered after it would sit behind.
    assert s.queued_chunks == 1, "a chunk was delivered after cancel()"
    assert list(s.chunks(timeout=1)) == []
    engine.step()
    assert engine.active_streams == 0


def test_cancel_stops_delivery_and_frees_slot(tiny_ckpt: Path, backend: str) -> None:
    eng = Engine(str(tiny_ckpt), backend=backend, device="cpu", max_streams=2)  # worker thread running
    try:
        s = eng.open_stream(voice="ryan", sampling=GREEDY, max_frames=200, chunk_schedule=[1])
        s.push_text(TEXT)
        s.end()
        first = next(iter(s))
        assert isinstance(first, AudioChunk)
        s.cancel()
        after = s.queued_chunks
        time.sleep(0.5)  # the worker keeps running; nothing more may arrive
        assert list(s.chunks(timeout=1)) == [] and after <= 1
        assert s.state is State.CANCELLED
        with pytest.raises(StreamClosedError):
            s.push_text("more")
        # Both slots are free again: two new streams run side by side to the end.
        a = eng.open_stream(voice="ryan", sampling=GREEDY, max_frames=5)
        b = eng.open_stream(voice="serena", sampling=GREEDY, max_frames=5)
        for x in (a, b):
            x.push_text("Hi there.")
            x.end()
        assert len(a.read_all(timeout=60)) == 5 * 1920
        assert len(b.read_all(timeout=60)) == 5 * 1920
    finally:
        eng.close()


def test_more_streams_than_slots_are_queued(engine: Engine) -> None:
    streams = [engine.open_stream(voice="ryan", sampling=GREEDY, max_frames=3) for _ in range(9)]
    for s in streams:
        s.push_text("Queue me.")
        s.end()
    engine.step()
    assert engine.active_streams <= engine.max_streams
    assert sum(s.state is State.QUEUED for s in streams) >= 5
    run_until_done(engine, streams)
    assert all(len(collect(s)[1]) == 3 * 1920 for s in streams)


def test_churn_500_streams_no_leak(tiny_ckpt: Path, backend: str) -> None:
    """Open, feed and end or cancel 500 streams in random order under the worker thread: the
    worker survives, no stream fails, every slot is released, memory stays flat, other audio is
    unchanged."""
    eng = Engine(str(tiny_ckpt), backend=backend, device="cpu", max_streams=4, max_queued_streams=64)
    try:
        probe_ref = eng.synthesize(
            "A steady reference stream.", voice="serena", sampling=GREEDY, max_frames=8
        )
        rng = random.Random(3)
        rss = []
        pending: list[Stream] = []
        every: list[Stream] = []
        for i in range(500):
            while True:  # a well-behaved client backs off when the engine says it is overloaded
                try:
                    s = eng.open_stream(
                        voice=rng.choice(["ryan", "serena", "aiden"]), sampling=GREEDY,
                        max_frames=rng.randint(1, 4), chunk_schedule=[1],
                    )  # fmt: skip
                    break
                except OverloadedError:
                    time.sleep(0.01)
            pending.append(s)
            every.append(s)
            s.push_text(rng.choice(["Hi.", "Hello there.", "One, two."]))
            action = rng.random()
            if action < 0.4:
                s.cancel()
            elif action < 0.9:
                s.end()
            # else: left open, cancelled below
            if len(pending) > 12:
                victim = pending.pop(rng.randrange(len(pending)))
                if victim.finished or victim.text_ended:
                    threading.Thread(target=lambda v=victim: list(v.chunks(timeout=60)), daemon=True).start()
                else:
                    victim.cancel()
            if i % 100 == 99:
                gc.collect()
                rss.append(_rss_mb())
        for s in pending:
            s.cancel()
        deadline = time.time() + 120
        while (eng.active_streams or eng.queued_streams) and time.time() < deadline:
            time.sleep(0.05)
        assert eng.active_streams == 0 and eng.queued_streams == 0
        failed = [s for s in every if s.state is State.FAILED]
        assert not failed and eng.stats.failed == 0, f"streams failed: {[(s.id, s.error) for s in failed]}"
        assert all(s.finished for s in every)
        assert sorted(eng._free_codec_rows) == list(range(eng.max_streams))
        assert rss[-1] - rss[0] < 100, f"memory grew: {rss}"
        probe = eng.synthesize("A steady reference stream.", voice="serena", sampling=GREEDY, max_frames=8)
        np.testing.assert_allclose(probe, probe_ref, atol=1e-5)
    finally:
        eng.close()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ---- bad input -----------------------------------------------------------------------------


def test_bad_use_gives_clear_errors(engine: Engine) -> None:
    s = engine.open_stream(voice="ryan", sampling=GREEDY, max_frames=2)
    s.push_text("Done.")
    s.end()
    with pytest.raises(StreamClosedError, match="has ended"):
        s.push_text("more")
    with pytest.raises(VoiceError, match=r"unknown voice 'nobody'.*ryan"):
        engine.open_stream(voice="nobody")
    with pytest.raises(PromptError, match=r"unknown language 'klingon'.*english"):
        engine.open_stream(voice="ryan", language="klingon")
    with pytest.raises(EngineError, match="chunk_schedule"):
        engine.open_stream(voice="ryan", chunk_schedule=[0])
    s2 = engine.open_stream(voice="ryan")
    with pytest.raises(TypeError):
        s2.push_text(123)  # type: ignore[arg-type]
    s2.cancel()
    run_until_done(engine, [s, s2])


def test_empty_text_ends_without_audio(engine: Engine) -> None:
    s = engine.open_stream(voice="ryan", sampling=GREEDY)
    s.push_text("   ")
    s.end()
    run_until_done(engine, [s])
    chunks = list(s.chunks(timeout=1))
    assert len(chunks) == 1 and chunks[0].last and chunks[0].frames == 0


def test_language_names_are_case_insensitive(engine: Engine) -> None:
    a, _ = speak(engine, "Hi.", voice="ryan", language="English", sampling=GREEDY, max_frames=4)
    b, _ = speak(engine, "Hi.", voice="ryan", language="english", sampling=GREEDY, max_frames=4)
    np.testing.assert_array_equal(a, b)


def test_missing_or_corrupt_checkpoint(tmp_path: Path, tiny_ckpt: Path) -> None:
    with pytest.raises(CheckpointError, match="neither a local directory nor a hub id"):
        load_checkpoint(str(tmp_path / "nope" / "x" / "y"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"missing config\.json, model\.safetensors"):
        load_checkpoint(str(empty))
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_ckpt, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        Engine(str(broken), device="cpu", start=False)
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load_checkpoint(str(broken))


def test_hub_id_offline_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        CheckpointError, match=r"not in the local Hugging Face cache and downloads are disabled"
    ):
        load_checkpoint("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")


def test_hub_id_resolves_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_ckpt: Path) -> None:
    """A hub id found in the local cache loads without any network access."""
    import shutil

    import huggingface_hub.constants as c

    cache = tmp_path / "hub"
    snap = cache / "models--Qwen--Qwen3-TTS-12Hz-0.6B-CustomVoice" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_ckpt, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    ckpt = load_checkpoint("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
    assert ckpt.path == snap and ckpt.config.model_type == "custom_voice"


def test_newcomers_prefilled_together_equal_alone(engine: Engine) -> None:
    """Streams that start in the same step share one padded prefill forward (prompts of different
    lengths: auto vs a language, dialect speakers); each still equals its run alone."""
    specs = [
        ("ryan", "auto", "One."),
        ("serena", "english", "Two words."),
        ("eric", "chinese", "Three more words."),
        ("dylan", "auto", "Four."),
    ]
    alone = [
        speak(engine, t, voice=v, language=lang, sampling=GREEDY, max_frames=12)[0] for v, lang, t in specs
    ]
    engine.step()  # let earlier tests' cancelled streams leave
    assert engine.active_streams == 0 and engine.queued_streams == 0
    before = engine.stats.prefills
    streams = []
    for v, lang, t in specs:
        s = engine.open_stream(voice=v, language=lang, sampling=GREEDY, max_frames=12)
        s.push_text(t)
        s.end()
        streams.append(s)
    engine.step()
    assert engine.stats.prefills - before == len(specs), "newcomers were not prefilled in one step"
    run_until_done(engine, streams)
    for s, ref in zip(streams, alone, strict=True):
        np.testing.assert_array_equal(collect(s)[0], ref)


def test_utterance_ending_while_text_still_arrives(engine: Engine) -> None:
    """The frame cap (or an early EOS) ends an utterance whose text is still streaming in: the
    rest of the text continues in a new utterance instead of breaking the stream."""
    s = engine.open_stream(voice="ryan", sampling=GREEDY, max_frames=6, chunk_schedule=[1])
    for _ in range(60):
        s.push_text("word ")
        engine.step()
        engine.step()
    s.end()
    run_until_done(engine, [s])
    chunks = list(s.chunks(timeout=5))
    assert s.state is State.DONE and s.metrics.utterances >= 3
    assert chunks[-1].last and sum(c.last_in_utterance for c in chunks) == s.metrics.utterances


def test_random_spec_ends_utterances_after_the_text() -> None:
    """random:* weights end an utterance by EOS once its text is read, not at the frame cap."""
    eng = Engine("random:tiny", device="cpu", start=False)
    try:
        for text in ("Short one.", "A longer sentence, so the utterance should run for longer as well."):
            s = eng.open_stream(voice="ryan", seed=1)
            s.push_text(text)
            s.end()
            run_until_done(eng, [s])
            last = [c for c in s.chunks(timeout=5) if c.last_in_utterance]
            tokens = len(eng.tokenizer.encode(text))
            assert last[0].end_reason == "eos" and tokens <= s.metrics.frames <= tokens + 3
    finally:
        eng.close()


@pytest.fixture(scope="module")
def eos_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose weights end an utterance by EOS after its text (as the random:*
    specs do), on disk in the official layout so the official package loads it too."""
    from safetensors.torch import load_file, save_file

    from engine.config import ModelConfig
    from engine.torch.model import Talker
    from engine.torch.weights import end_after_text_, write_random_checkpoint

    path = write_random_checkpoint(tmp_path_factory.mktemp("tiny-eos"), "tiny", "custom_voice", seed=4)
    tensors = load_file(str(path / "model.safetensors"))
    cfg = ModelConfig.from_dict(json.loads((path / "config.json").read_text()))
    talker = Talker(cfg.talker)
    talker.load_state_dict({k[len("talker.") :]: v for k, v in tensors.items() if k.startswith("talker.")})
    end_after_text_(talker, cfg)
    tensors |= {f"talker.{k}": v.contiguous() for k, v in talker.state_dict().items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_eos_ended_utterances_match_official(eos_ckpt: Path, backend: str) -> None:
    """Utterances that end by EOS (not the frame cap) have the official package's codes, for
    texts of several lengths: the EOS rule (blocked for 2 tokens, then allowed) and the tts_eos /
    tts_pad feed after the text are the official ones."""
    from oracle import qwen_tts

    qwen_tts()
    from qwen_tts import Qwen3TTSModel

    official = Qwen3TTSModel.from_pretrained(str(eos_ckpt), device_map="cpu", dtype=torch.float32)
    eng = Engine(str(eos_ckpt), backend=backend, device="cpu", max_streams=2, start=False)
    try:
        for text in ("Hi.", "A somewhat longer sentence, so this utterance runs for longer."):
            ids = eng.tokenizer.encode(text)
            template = torch.tensor([[151644, 77091, 198, *ids, 151645, 198, 151644, 77091, 198]])
            with torch.no_grad():
                ref = official.model.generate(
                    input_ids=[template], languages=["english"], speakers=["ryan"], non_streaming_mode=False,
                    do_sample=False, subtalker_dosample=False, max_new_tokens=200,
                )[0][0]  # fmt: skip
            assert 0 < ref.shape[0] < 150, "the official run did not end by EOS"
            s = eng.open_stream(voice="ryan", language="english", sampling=GREEDY)
            s.push_text(text)
            s.end()
            run_until_done(eng, [s])
            chunks = list(s.chunks(timeout=5))
            codes = np.concatenate([c.codes for c in chunks if c.frames])
            assert [c.end_reason for c in chunks if c.last_in_utterance] == ["eos"]
            np.testing.assert_array_equal(codes, ref.numpy())
    finally:
        eng.close()


def test_precision_from_argument_or_environment(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An explicit precision wins; without one the engine reads TTS_PRECISION (how a deployment
    or this test suite pins a mode for every engine it starts), else auto."""
    monkeypatch.setenv("TTS_PRECISION", "bf16")
    eng = Engine(str(tiny_ckpt), device="cpu", start=False)
    assert eng.precision == "bf16" and eng.describe()["precision"] == "bf16"
    eng.close()
    eng = Engine(str(tiny_ckpt), device="cpu", precision="fp32", start=False)
    assert eng.precision == "fp32"
    eng.close()
