"""Voice cloning on tiny random Base checkpoints, against the official qwen-tts.

Compared with the official package on the same checkpoint: x-vectors and reference codes of the
same reference audio, the x-vector and ICL prefill embeddings (both text modes), and greedy
codes + audio of `generate_voice_clone` (after its reference trim). Then the engine's own
promises: ICL text streamed in deltas equals the whole text, voices survive a restart,
concurrent registrations, and a specific error for every kind of bad input.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from engine.audio import AudioError
from engine.prompt import build_prefill, resolve_language, role_ids
from engine.sampling import SamplingParams
from engine.scheduler import Engine, VoiceError
from engine.voices import VoiceStoreError

GREEDY = SamplingParams(temperature=0.0, subtalker_temperature=0.0)
REF_TEXT = "This is the reference voice speaking slowly."
TEXT = "Hello, world. Cloned voices sound like their reference."


def reference_audio(seconds: float = 2.0, sr: int = 24000, seed: int = 0) -> np.ndarray:
    """A voice-like test signal: a gliding harmonic tone with syllable-rate amplitude and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    return (0.3 * voiced * env + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.torch.weights import write_random_checkpoint

    return write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-base"), "tiny", "base", seed=5, max_new_tokens=61
    )


@pytest.fixture(scope="module")
def official_base(base_ckpt: Path) -> Any:
    from oracle import qwen_tts

    qwen_tts()
    from qwen_tts import Qwen3TTSModel

    return Qwen3TTSModel.from_pretrained(str(base_ckpt), device_map="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def engine(base_ckpt: Path, backend: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One engine per backend: cloning (both encoders) and cloned speech hold for each."""
    e = Engine(
        str(base_ckpt), backend=backend, device="cpu", start=False,
        voices_db=tmp_path_factory.mktemp("db") / "voices.sqlite",
    )  # fmt: skip
    yield e
    e.close()


@pytest.fixture(scope="module")
def voices(engine: Engine) -> dict[str, Any]:
    wav = reference_audio()
    return {
        "icl": engine.create_voice("icl-voice", wav, sample_rate=24000, ref_text=REF_TEXT),
        "xvec": engine.create_voice("xvec-voice", wav, sample_rate=24000, x_vector_only=True),
    }


def run(engine: Engine, stream: Any) -> tuple[np.ndarray, np.ndarray]:
    while not stream.finished:
        engine.step()
    chunks = list(stream.chunks(timeout=5))
    codes = np.concatenate([c.codes for c in chunks if c.frames] or [np.zeros((0, 16), int)])
    return codes, np.concatenate([c.samples for c in chunks])


def speak(
    engine: Engine, voice: str, deltas: list[str], steps_between: int = 0, **kw: Any
) -> tuple[np.ndarray, np.ndarray]:
    s = engine.open_stream(voice=voice, language="english", sampling=GREEDY, **kw)
    for d in deltas:
        s.push_text(d)
        for _ in range(steps_between):
            engine.step()
    s.end()
    return run(engine, s)


def test_xvector_and_reference_codes_match_official(
    engine: Engine, voices: dict[str, Any], official_base: Any
) -> None:
    wav = reference_audio()
    item = official_base.create_voice_clone_prompt(ref_audio=(wav, 24000), ref_text=REF_TEXT)[0]
    np.testing.assert_allclose(voices["icl"].xvector, item.ref_spk_embedding.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(voices["icl"].ref_codes, item.ref_code.numpy())
    assert voices["xvec"].ref_codes is None and voices["xvec"].mode == "xvector"


@pytest.mark.parametrize("mode", ["streaming", "full"])
@pytest.mark.parametrize("kind", ["icl", "xvec"])
def test_clone_prefill_matches_official(
    engine: Engine, voices: dict[str, Any], official_base: Any, kind: str, mode: str
) -> None:
    if engine.backend.name != "torch":
        pytest.skip("compares the torch talker's prompt embedding; other backends: greedy codes below")
    clone = voices[kind]
    resolved = engine.resolve_voice(clone.id)
    ids = engine.tokenizer.encode(TEXT)
    template = torch.tensor([[151644, 77091, 198, *ids, 151645, 198, 151644, 77091, 198]])
    vcp = dict(
        ref_code=[torch.from_numpy(clone.ref_codes.astype(np.int64)) if kind == "icl" else None],
        ref_spk_embedding=[torch.from_numpy(clone.xvector)],
        x_vector_only_mode=[kind == "xvec"], icl_mode=[kind == "icl"],
    )  # fmt: skip
    ref_ids = [torch.tensor([[151644, *engine.tokenizer.encode("assistant\n" + REF_TEXT), 151645, 198]])]
    seen: dict[str, torch.Tensor] = {}

    class Stop(Exception):
        pass

    def grab(**kw: Any) -> None:
        seen.update(kw)
        raise Stop

    model = official_base.model
    orig, model.talker.generate = model.talker.generate, grab
    try:
        with pytest.raises(Stop):
            model.generate(
                input_ids=[template], ref_ids=ref_ids if kind == "icl" else None, voice_clone_prompt=vcp,
                languages=["english"], non_streaming_mode=(mode == "full"),
            )  # fmt: skip
    finally:
        model.talker.generate = orig
    spec = resolved.spec
    queue = [*(spec.ref_text_ids or ()), *ids]
    pre = build_prefill(
        engine.cfg, role=role_ids(engine.cfg, engine.tokenizer.encode("assistant\n")), instruct=None, voice=spec,
        lang_id=resolve_language(engine.cfg, "english", spec), queue=queue, mode=mode, text_complete=True,  # type: ignore[arg-type]
    )  # fmt: skip
    with torch.no_grad():
        xvec = torch.from_numpy(resolved.xvector) if resolved.xvector is not None else None
        ref = torch.from_numpy(resolved.ref_codes) if resolved.ref_codes is not None else None
        x = engine.backend.talker.embed_slots(pre.slots, xvec, ref)
    torch.testing.assert_close(x, seen["inputs_embeds"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["icl", "xvec"])
def test_clone_greedy_matches_official(
    engine: Engine, voices: dict[str, Any], official_base: Any, kind: str
) -> None:
    """Codes and audio (after the official reference trim) equal generate_voice_clone's."""
    wav = reference_audio()
    assert official_base.processor(text=TEXT)["input_ids"][0] == engine.tokenizer.encode(TEXT)
    wavs, sr = official_base.generate_voice_clone(
        text=TEXT, language="english", ref_audio=(wav, 24000), ref_text=REF_TEXT if kind == "icl" else None,
        x_vector_only_mode=kind == "xvec", do_sample=False, subtalker_dosample=False, max_new_tokens=61,
    )  # fmt: skip
    ref = wavs[0]
    codes, audio = speak(engine, voices[kind].id, [TEXT], max_frames=60)
    assert sr == 24000 and len(codes) == 60
    # The official cut int(ref_len / total_len * wav_len) can keep one extra leading sample.
    assert len(ref) - len(audio) in (0, 1)
    np.testing.assert_allclose(audio, ref[len(ref) - len(audio) :], atol=1e-4, rtol=0)


def test_icl_streamed_deltas_equal_whole_text(engine: Engine, voices: dict[str, Any]) -> None:
    vid = voices["icl"].id
    whole, whole_audio = speak(engine, vid, [TEXT], max_frames=40)
    words = TEXT.split(" ")
    codes, audio = speak(
        engine, vid, [w if i == 0 else " " + w for i, w in enumerate(words)], steps_between=3, max_frames=40
    )
    np.testing.assert_array_equal(codes, whole)
    np.testing.assert_allclose(audio, whole_audio, atol=1e-5)


def test_icl_waits_for_enough_text(engine: Engine, voices: dict[str, Any]) -> None:
    """ICL's prefill aligns text with the reference: the stream says how many tokens it needs
    and produces nothing before it has them (or the end of the text)."""
    s = engine.open_stream(voice=voices["icl"].id, sampling=GREEDY, max_frames=10)
    need = s.tokens_to_start
    ref_ids = len(engine.tokenizer.encode("assistant\n" + REF_TEXT)) - 2
    assert need == max(1, len(voices["icl"].ref_codes) + 1 - ref_ids) and need > 1
    s.push_text("Hi there")
    for _ in range(10):
        engine.step()
    assert s.queued_chunks == 0 and s.metrics.frames == 0
    s.end()  # the end of the text is enough too
    codes, audio = run(engine, s)
    assert len(codes) == 10 and len(audio) == 10 * 1920
    x = engine.open_stream(voice=voices["xvec"].id, sampling=GREEDY)
    assert x.tokens_to_start == 1
    x.cancel()


def test_voice_survives_restart(base_ckpt: Path, tmp_path: Path) -> None:
    db = tmp_path / "voices.sqlite"
    e1 = Engine(str(base_ckpt), device="cpu", start=False, voices_db=db)
    v = e1.create_voice("persisted", reference_audio(seed=3), sample_rate=24000, ref_text=REF_TEXT)
    before = speak(e1, v.id, ["Still me after a restart."], max_frames=8)[1]
    e1.close()
    e2 = Engine(str(base_ckpt), device="cpu", start=False, voices_db=db)
    assert [x["id"] for x in e2.describe_voices() if x["type"] == "clone"] == [v.id]
    after = speak(e2, "persisted", ["Still me after a restart."], max_frames=8)[1]  # by name too
    np.testing.assert_allclose(after, before, atol=1e-6)
    assert e2.delete_voice(v.id) and not e2.delete_voice(v.id)
    e2.close()


def test_concurrent_registrations(engine: Engine) -> None:
    before = len(engine.voice_store.list())
    errors: list[Exception] = []

    def register(i: int) -> None:
        try:
            engine.create_voice(
                f"conc-{i % 6}", reference_audio(1.0, seed=i), sample_rate=24000, ref_text="Some words."
            )
        except Exception as e:  # collected and checked below
            errors.append(e)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 6 distinct names, each registered twice: exactly one of each pair wins.
    assert len(errors) == 6 and all(
        isinstance(e, VoiceStoreError) and "already exists" in str(e) for e in errors
    )
    stored = engine.voice_store.list()
    assert len(stored) == before + 6
    for v in stored:
        if not v.name.startswith("conc-"):
            continue
        assert v.xvector.shape == (engine.cfg.speaker_encoder.enc_dim,) and v.ref_codes is not None


def test_bad_reference_input(engine: Engine, tmp_path: Path, tiny_ckpt: Path) -> None:
    count = len(engine.voice_store.list())
    with pytest.raises(AudioError, match="could not decode the audio") as e:
        engine.create_voice("bad1", b"this is not audio at all", ref_text="x")
    assert e.value.code == "unreadable"
    silent = io.BytesIO()
    sf.write(silent, np.zeros(0, dtype=np.float32), 24000, format="WAV")
    with pytest.raises(AudioError) as e:
        engine.create_voice("bad2", silent.getvalue(), ref_text="x")
    assert e.value.code in ("empty", "too_short")
    long_file = tmp_path / "ten_minutes.wav"
    with sf.SoundFile(long_file, "w", samplerate=8000, channels=1, subtype="PCM_16") as f:
        f.write(np.zeros(8000 * 600, dtype=np.int16))
    with pytest.raises(AudioError, match=r"600\.0 s long") as e:
        engine.create_voice("bad3", str(long_file), ref_text="x")
    assert e.value.code == "too_long"
    with pytest.raises(AudioError):
        engine.create_voice(
            "bad4", np.array([[1, 2, 3]], dtype=np.complex64), sample_rate=24000, ref_text="x"
        )
    with pytest.raises(VoiceError, match="transcript"):
        engine.create_voice("bad5", reference_audio(), sample_rate=24000)
    with pytest.raises(VoiceError, match="sample_rate"):
        engine.create_voice("bad6", reference_audio(), ref_text="x")
    with pytest.raises(VoiceStoreError, match="voice name"):
        engine.create_voice("", reference_audio(), sample_rate=24000, ref_text="x")
    with pytest.raises(VoiceError, match="unknown voice 'v_doesnotexist'"):
        engine.open_stream(voice="v_doesnotexist")
    assert len(engine.voice_store.list()) == count, "a failed registration left something behind"
    cv = Engine(str(tiny_ckpt), device="cpu", start=False, voices_db=tmp_path / "cv.sqlite")
    with pytest.raises(VoiceError, match="needs a Base model"):
        cv.create_voice("x", reference_audio(), sample_rate=24000, ref_text="x")
    cv.close()


def test_transcript_used_verbatim_like_official(engine: Engine, official_base: Any) -> None:
    """A transcript read from a file ends in a newline; the official package keeps it (and its
    ids), so the engine must too: stripping it gave different audio."""
    wav = reference_audio(seed=7)
    ref_text = " " + REF_TEXT + "\n"
    clone = engine.create_voice("verbatim", wav, sample_rate=24000, ref_text=ref_text)
    assert clone.ref_text == ref_text
    wavs, _ = official_base.generate_voice_clone(
        text=TEXT, language="english", ref_audio=(wav, 24000), ref_text=ref_text,
        do_sample=False, subtalker_dosample=False, max_new_tokens=61,
    )  # fmt: skip
    codes, audio = speak(engine, clone.id, [TEXT], max_frames=60)
    ref = wavs[0]
    assert len(codes) == 60 and len(ref) - len(audio) in (0, 1)
    np.testing.assert_allclose(audio, ref[len(ref) - len(audio) :], atol=1e-4, rtol=0)
