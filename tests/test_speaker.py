"""Speaker encoder: reference-audio loading, the log-mel front end and the ECAPA-TDNN x-vector.

Parity is checked against the official qwen-tts code on random weights (no download): the same
state dict is loaded into both models, which only works because our parameter names equal the
checkpoint's. The official model has no BatchNorm (so no running statistics to randomise); every
weight and bias is redrawn with a seeded generator (He-scaled weights, so nothing vanishes).
"""

from __future__ import annotations

import importlib
import io
import math
from pathlib import Path
from types import SimpleNamespace

import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from oracle import qwen_tts

from engine.audio import AudioError, load_audio, mel_filterbank, prepare_audio
from engine.config import SpeakerEncoderConfig
from engine.torch.speaker import SpeakerEncoder, extract_xvector, mel_spectrogram, min_samples

TINY = SpeakerEncoderConfig(
    enc_dim=24,
    enc_channels=(16, 16, 16, 16, 48),
    enc_attention_channels=8,
    enc_res2net_scale=4,
    enc_se_channels=8,
)
RELEASED_0B6 = SpeakerEncoderConfig()  # the released files set only enc_dim (1024) and sample_rate
RELEASED_1B7 = SpeakerEncoderConfig(enc_dim=2048)

# fp32 on both sides with the same operations in the same order: on the 2-core CPU used to write
# this, mels and x-vectors are bit-identical to the official ones. The tolerances leave room for
# other kernels (oneDNN/MKL paths, thread counts): a deep random-weight net amplifies a 1e-7
# relative change of the mels to ~1e-6 of its output scale, so x-vectors are compared with an
# absolute tolerance relative to that scale.
MEL_TOL = {"rtol": 1e-5, "atol": 1e-5}
XVEC_RTOL, XVEC_ATOL_PER_SCALE = 1e-5, 1e-5


def assert_xvector_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=XVEC_RTOL, atol=XVEC_ATOL_PER_SCALE * scale)


def signal(n: int, seed: int, sr: int = 24000) -> np.ndarray:
    """Log sine sweep 80 Hz -> 10 kHz plus white noise and a little DC, peak below 1."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    dur = n / sr
    f0, f1 = 80.0, 10000.0
    phase = 2 * np.pi * f0 * dur / math.log(f1 / f0) * (np.exp(t / dur * math.log(f1 / f0)) - 1)
    x = 0.5 * np.sin(phase) + 0.05 * rng.standard_normal(n) + 0.01
    return x.astype(np.float32)


def randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight"):
                fan_in = p.shape[1] * p.shape[2]
                p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def official() -> SimpleNamespace:
    qwen_tts()
    modeling = importlib.import_module("qwen_tts.core.models.modeling_qwen3_tts")
    configuration = importlib.import_module("qwen_tts.core.models.configuration_qwen3_tts")
    return SimpleNamespace(M=modeling, C=configuration)


def official_encoder(official: SimpleNamespace, cfg: SpeakerEncoderConfig) -> torch.nn.Module:
    c = official.C.Qwen3TTSSpeakerEncoderConfig(
        mel_dim=cfg.mel_dim,
        enc_dim=cfg.enc_dim,
        enc_channels=list(cfg.enc_channels),
        enc_kernel_sizes=list(cfg.enc_kernel_sizes),
        enc_dilations=list(cfg.enc_dilations),
        enc_attention_channels=cfg.enc_attention_channels,
        enc_res2net_scale=cfg.enc_res2net_scale,
        enc_se_channels=cfg.enc_se_channels,
        sample_rate=cfg.sample_rate,
    )
    return official.M.Qwen3TTSSpeakerEncoder(c).eval()


def twin(
    official: SimpleNamespace, cfg: SpeakerEncoderConfig, seed: int
) -> tuple[torch.nn.Module, SpeakerEncoder]:
    """An official encoder with random weights and ours loaded (strictly) from its state dict."""
    theirs = official_encoder(official, cfg)
    randomize(theirs, seed)
    ours = SpeakerEncoder(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def official_xvector(official: SimpleNamespace, encoder: torch.nn.Module, wav: np.ndarray) -> torch.Tensor:
    # Call the official method itself, with a stand-in `self` holding what it reads.
    fake_self = SimpleNamespace(speaker_encoder=encoder, device=torch.device("cpu"), dtype=torch.float32)
    return official.M.Qwen3TTSForConditionalGeneration.extract_speaker_embedding(
        fake_self, audio=wav, sr=24000
    )


# --------------------------------------------------------------------------------------------
# Front end


@pytest.mark.parametrize(
    ("sr", "n_fft", "n_mels", "fmin", "fmax"),
    [(24000, 1024, 128, 0.0, 12000.0), (16000, 512, 80, 0.0, None), (22050, 1024, 64, 50.0, 8000.0)],
)
def test_mel_filterbank_matches_librosa(
    sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None
) -> None:
    ours = mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
    ref = librosa.filters.mel(
        sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, norm="slaney", htk=False
    )
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    # Bit-identical, not merely close: ours rounds to float32 where librosa stores float32.
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("n", [385, 1280, 24000, 33333])
def test_mel_frame_count(n: int) -> None:
    mels = mel_spectrogram(torch.from_numpy(signal(n, 0))[None])
    assert mels.shape == (1, n // 256, 128)
    assert mels.dtype == torch.float32 and torch.isfinite(mels).all()


def test_mel_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="samples > 384"):
        mel_spectrogram(torch.zeros(1, 384))
    with pytest.raises(ValueError, match="batch"):
        mel_spectrogram(torch.zeros(24000))


def test_mel_is_batch_independent_and_fp32() -> None:
    a, b = signal(12000, 1), signal(12000, 2)
    both = mel_spectrogram(torch.from_numpy(np.stack([a, b])))
    one = mel_spectrogram(torch.from_numpy(b)[None])
    torch.testing.assert_close(both[1:], one)
    # A float64 or bf16 input is computed in fp32, as the official front end.
    assert mel_spectrogram(torch.from_numpy(b.astype(np.float64))[None]).dtype == torch.float32


@pytest.mark.oracle
@pytest.mark.parametrize("n", [24000, 33333, 7777])
def test_mel_matches_official(official: SimpleNamespace, n: int) -> None:
    wav = torch.from_numpy(np.stack([signal(n, 3), 0.3 * signal(n, 4)]))
    ref = official.M.mel_spectrogram(
        wav, n_fft=1024, num_mels=128, sampling_rate=24000, hop_size=256, win_size=1024, fmin=0, fmax=12000
    ).transpose(1, 2)
    ours = mel_spectrogram(wav)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, **MEL_TOL)


# --------------------------------------------------------------------------------------------
# Encoder


@pytest.mark.oracle
@pytest.mark.parametrize("cfg", [TINY, RELEASED_0B6, RELEASED_1B7], ids=["tiny", "0b6", "1b7"])
def test_state_dict_matches_official(official: SimpleNamespace, cfg: SpeakerEncoderConfig) -> None:
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in official_encoder(official, cfg).state_dict().items()}
        ours = {k: tuple(v.shape) for k, v in SpeakerEncoder(cfg).state_dict().items()}
    assert ours == theirs
    if cfg is RELEASED_0B6:
        assert ours["fc.weight"] == (1024, 3072, 1) and ours["blocks.0.conv.weight"] == (512, 128, 5)


@pytest.mark.oracle
@pytest.mark.parametrize(("n", "seed"), [(24000, 0), (31337, 1), (1280, 2), (72000, 3)])
def test_xvector_matches_official_tiny(official: SimpleNamespace, n: int, seed: int) -> None:
    theirs, ours = twin(official, TINY, seed)
    wav = signal(n, seed)
    ref = official_xvector(official, theirs, wav)
    got = extract_xvector(ours, wav)
    assert got.shape == (TINY.enc_dim,)
    assert ref.abs().max() > 0.1  # random weights must give a non-degenerate vector
    assert_xvector_close(got, ref)


@pytest.mark.oracle
def test_xvector_matches_official_released_shape(official: SimpleNamespace) -> None:
    theirs, ours = twin(official, RELEASED_0B6, 7)
    wav = signal(36000, 7)
    ref = official_xvector(official, theirs, wav)
    got = extract_xvector(ours, torch.from_numpy(wav))
    assert got.shape == (1024,)
    assert_xvector_close(got, ref)
    # A batch through forward() agrees with one clip at a time (no cross-row leakage).
    mels = mel_spectrogram(torch.from_numpy(np.stack([wav, signal(36000, 8)])))
    with torch.no_grad():
        assert_xvector_close(ours(mels)[0], got)


def test_extract_xvector_inputs_and_dtype() -> None:
    enc = SpeakerEncoder(TINY).eval()
    randomize(enc, 5)
    wav = signal(10000, 5)
    ref = extract_xvector(enc, wav)
    torch.testing.assert_close(extract_xvector(enc, wav.astype(np.float64)), ref)
    torch.testing.assert_close(extract_xvector(enc, torch.from_numpy(wav)[None]), ref)
    assert not ref.requires_grad
    # bf16 weights: the mel stays fp32, the encoder runs (and answers) in bf16.
    bf = extract_xvector(enc.to(torch.bfloat16), wav)
    assert bf.dtype == torch.bfloat16 and bf.shape == ref.shape and torch.isfinite(bf.float()).all()


def test_extract_xvector_minimum_length() -> None:
    enc = SpeakerEncoder(RELEASED_0B6).eval()
    assert enc.min_frames == 5 and min_samples(enc) == 1280  # dilation 4, kernel 3: reflect pad 4
    extract_xvector(enc, signal(1280, 0))
    with pytest.raises(AudioError, match="at least 1280") as e:
        extract_xvector(enc, signal(1279, 0))
    assert e.value.code == "too_short"
    with pytest.raises(AudioError, match="mono"):
        extract_xvector(enc, np.zeros((2, 5000), np.float32))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"enc_kernel_sizes": (5, 3, 3, 1)}, "length"),
        ({"enc_channels": (16, 16, 24, 16, 48)}, "equal"),
        ({"enc_channels": (16, 16, 16, 16, 40)}, "sum"),
        ({"enc_res2net_scale": 3}, "groups"),
    ],
)
def test_bad_config_is_refused(change: dict[str, object], match: str) -> None:
    cfg = SpeakerEncoderConfig(**{**TINY.__dict__, **change})
    with pytest.raises(ValueError, match=match):
        SpeakerEncoder(cfg)


# --------------------------------------------------------------------------------------------
# Reference audio


def tone(n: int, sr: int, hz: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(n) / sr)).astype(np.float32)


def encode(data: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("sr", "fmt", "subtype", "channels"),
    [
        (16000, "WAV", "PCM_16", 1),
        (44100, "FLAC", "PCM_16", 1),
        (44100, "WAV", "FLOAT", 2),
        (16000, "FLAC", "PCM_24", 2),
        (24000, "WAV", "PCM_16", 1),
    ],
)
def test_load_audio_formats_and_rates(tmp_path: Path, sr: int, fmt: str, subtype: str, channels: int) -> None:
    n = int(1.3 * sr) + 7  # odd length: exercises the output-length rule
    mono = tone(n, sr)
    data = np.stack([mono, 0.5 * mono], axis=1) if channels == 2 else mono
    path = tmp_path / f"ref.{fmt.lower()}"
    sf.write(path, data, sr, format=fmt, subtype=subtype)

    got = load_audio(path)
    assert got.dtype == np.float32 and got.ndim == 1
    assert got.shape[0] == math.ceil(n * (24000 / sr))
    # The official wrapper's path: librosa.load (mono mean) then librosa.resample (soxr HQ).
    ref, ref_sr = librosa.load(path, sr=None, mono=True)
    if ref_sr != 24000:
        ref = librosa.resample(ref, orig_sr=ref_sr, target_sr=24000)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    # Content survives: still a 440 Hz tone at the mono mean's amplitude (0.75 x 0.5 for stereo).
    amp = 0.5 * (0.75 if channels == 2 else 1.0)
    mid = got[2400:-2400]
    expect = amp * np.sin(2 * np.pi * 440 * (np.arange(got.shape[0]) / 24000))[2400:-2400]
    np.testing.assert_allclose(mid, expect, atol=2e-3 if subtype == "PCM_16" else 1e-4)
    # Bytes and file objects read the same.
    raw = path.read_bytes()
    np.testing.assert_array_equal(load_audio(raw), got)
    np.testing.assert_array_equal(load_audio(io.BytesIO(raw)), got)


def test_load_audio_int16_scaling_and_target_rate() -> None:
    pcm = np.array([0, 16384, -32768, 32767] * 4000, dtype=np.int16)
    got = load_audio(encode(pcm, 16000, "WAV", "PCM_16"), target_sr=16000)
    np.testing.assert_array_equal(got, pcm.astype(np.float32) / 32768)
    np.testing.assert_array_equal(prepare_audio(pcm, 16000, 16000), got)
    assert load_audio(encode(pcm, 16000, "WAV", "PCM_16"), target_sr=8000).shape == (8000,)


def test_load_audio_end_to_end_xvector() -> None:
    enc = SpeakerEncoder(TINY).eval()
    wav = load_audio(encode(tone(44100, 44100), 44100, "FLAC", "PCM_16"))
    assert extract_xvector(enc, wav).shape == (TINY.enc_dim,)


def _expect(code: str, match: str, source: object, **kw: float) -> None:
    with pytest.raises(AudioError, match=match) as e:
        load_audio(source, **kw)  # type: ignore[arg-type]
    assert e.value.code == code and isinstance(e.value, ValueError)


def test_load_audio_unreadable(tmp_path: Path) -> None:
    _expect("unreadable", "not found", tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00")
    sources = [b"this is not audio at all" * 10, io.BytesIO(b"\x00" * 100), tmp_path / "junk.wav"]
    for source in sources:
        # One clear sentence, never libsndfile's text naming the Python object it was given
        # ("Error opening <_io.BytesIO object at 0x...>"): it is shown to HTTP clients.
        with pytest.raises(AudioError) as e:
            load_audio(source)  # type: ignore[arg-type]
        assert e.value.code == "unreadable"
        assert str(e.value) == "could not decode the audio: unsupported format or corrupt file"


def test_load_audio_empty() -> None:
    _expect("empty", "no samples", encode(np.zeros(0, np.float32), 16000, "WAV", "PCM_16"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_load_audio_non_finite(bad: float) -> None:
    x = tone(16000, 16000)
    x[1234] = bad
    _expect("non_finite", "NaN or infinite", encode(x, 16000, "WAV", "FLOAT"))


def test_load_audio_too_long() -> None:
    raw = encode(tone(3 * 16000, 16000), 16000, "WAV", "PCM_16")
    _expect("too_long", r"3\.0 s long; at most 2 s", raw, max_seconds=2.0)
    assert load_audio(raw, max_seconds=3.0).shape == (72000,)
    with pytest.raises(AudioError, match="at most 60 s") as e:
        prepare_audio(np.zeros(61 * 8000, np.float32), 8000)
    assert e.value.code == "too_long"


def test_load_audio_too_short() -> None:
    raw = encode(tone(1600, 16000), 16000, "WAV", "PCM_16")  # 0.1 s
    _expect("too_short", r"0\.100 s long; at least 0.5 s", raw)
    assert load_audio(raw, min_seconds=0.1).shape == (2400,)


def test_prepare_audio_bad_inputs() -> None:
    with pytest.raises(AudioError, match="sample rate") as e:
        prepare_audio(np.zeros(16000, np.float32), 0)
    assert e.value.code == "bad_sample_rate"
    with pytest.raises(AudioError, match="shape") as e:
        prepare_audio(np.zeros((2, 2, 16000), np.float32), 16000)
    assert e.value.code == "bad_format"
    with pytest.raises(AudioError, match="float or signed") as e:
        prepare_audio(np.zeros(16000, np.uint8), 16000)
    assert e.value.code == "bad_format"


@pytest.mark.parametrize("sr", [1, 4000, 7999, 400_000])
def test_load_audio_refuses_sample_rates_outside_8k_384k(sr: int) -> None:
    """Issue 13 item 8: a 1 Hz WAV was accepted (a 2-sample "voice" upsampled 24000x)."""
    n = max(2, sr)  # one second
    _expect("bad_sample_rate", "8000-384000 Hz", encode(tone(n, sr, hz=sr / 8), sr, "WAV", "PCM_16"))
    with pytest.raises(AudioError) as e:
        prepare_audio(np.zeros(n, np.float32), sr)
    assert e.value.code == "bad_sample_rate"


def test_load_audio_edge_rates_accepted() -> None:
    for sr in (8000, 384000):
        got = load_audio(encode(tone(sr, sr, hz=300), sr, "WAV", "PCM_16"))
        assert got.shape == (24000,)


def test_load_audio_refuses_too_many_channels_from_the_header() -> None:
    raw = encode(np.zeros((16000, 9), np.float32), 16000, "WAV", "PCM_16")
    _expect("bad_format", "9 channels; at most 8", raw)


def _silent_flac(seconds: int, sr: int, channels: int) -> bytes:
    """A FLAC of silence: a few KB that decode to seconds x sr x channels samples."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=sr, channels=channels, format="FLAC", subtype="PCM_16") as f:
        block = np.zeros((sr, channels), np.int16)
        for _ in range(seconds):
            f.write(block)
    return buf.getvalue()


def test_load_audio_memory_is_bounded_by_mono_at_the_declared_rate() -> None:
    """Issue 13 item 8: a tiny FLAC that decodes to 59 s x 8 ch x 192 kHz took +420 MB before
    being refused. Decoding now keeps one mono buffer plus a block: here 20 s x 8 ch x 192 kHz
    (123 MB as float32 [N, 8]) peaks near its 15 MB of mono."""
    import tracemalloc

    raw = _silent_flac(20, 192000, 8)
    assert len(raw) < 100_000
    tracemalloc.start()
    try:
        got = load_audio(raw, max_seconds=30.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.shape == (20 * 24000,) and not got.any()
    assert peak < 40e6, f"decoding peaked at {peak / 1e6:.0f} MB"


def test_load_audio_too_long_is_refused_from_the_header_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw = _silent_flac(3, 192000, 8)
    reads: list[int] = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(
        sf.SoundFile, "read", lambda self, *a, **k: reads.append(1) or real_read(self, *a, **k)
    )
    _expect("too_long", r"3\.0 s long; at most 2 s", raw, max_seconds=2.0)
    assert not reads, "decoded before refusing"


def test_load_audio_stops_decoding_past_the_limit_without_a_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """A header without a length (a stream; mp3 may not know it): reading stops once past the
    limit instead of decoding the rest."""
    raw = _silent_flac(10, 16000, 1)
    monkeypatch.setattr(sf.SoundFile, "frames", property(lambda self: 2**63 - 1))
    reads: list[int] = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(
        sf.SoundFile, "read", lambda self, *a, **k: reads.append(1) or real_read(self, *a, **k)
    )
    monkeypatch.setattr("engine.audio._BLOCK_SAMPLES", 16000)
    _expect("too_long", "longer than 2 s", raw, max_seconds=2.0)
    assert len(reads) == 3  # 1 s blocks: the third passes 2 s


def test_load_audio_block_downmix_equals_whole_file_mean(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    x = (0.3 * rng.standard_normal((50_000, 3))).astype(np.float32)
    raw = encode(x, 24000, "WAV", "FLOAT")
    whole = load_audio(raw)
    np.testing.assert_array_equal(whole, x.mean(axis=1, dtype=np.float32))
    monkeypatch.setattr("engine.audio._BLOCK_SAMPLES", 3 * 777)  # many odd-sized blocks
    np.testing.assert_array_equal(load_audio(raw), whole)
