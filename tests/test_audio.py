"""Audio encoding: s16 clipping, G.711 against reference values, streaming resampling, WAV."""

from __future__ import annotations

import io
import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.audio import (
    BYTES_PER_SAMPLE,
    AudioEncoder,
    alaw_to_s16,
    decode_pcm,
    encode_pcm,
    float_to_s16,
    read_wav,
    resample,
    s16_to_alaw,
    s16_to_ulaw,
    silence,
    ulaw_to_s16,
    wav_bytes,
    wav_header,
    write_wav,
)
from realtime.protocol import ENCODINGS, SAMPLE_RATES

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop
    except ImportError:  # Python >= 3.13: the reference tables below still apply
        audioop = None  # type: ignore[assignment]

ALL_S16 = np.arange(-32768, 32768, dtype=np.int16)
CODES = np.arange(256, dtype=np.uint8)


def speech_like(n: int, seed: int = 0) -> np.ndarray:
    """Noise shaped like speech: band-limited-ish, some silence, peaks near full scale."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 24000
    x = 0.5 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) + 0.05 * rng.standard_normal(n)
    return x.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Sample formats


def test_float_to_s16_clips_and_rounds() -> None:
    x = np.array([-2.0, -1.0, -0.5, 0.0, 1 / 32768, 0.49999 / 32768, 0.5, 1.0, 2.0, np.nan, np.inf, -np.inf])
    assert float_to_s16(x).tolist() == [
        -32768,
        -32768,
        -16384,
        0,
        1,
        0,
        16384,
        32767,
        32767,
        0,
        32767,
        -32768,
    ]
    # s16 -> float -> s16 is lossless, so 16-bit sources pass through untouched.
    assert np.array_equal(float_to_s16(ALL_S16.astype(np.float32) / 32768), ALL_S16)


def test_s16le_and_f32le_payloads() -> None:
    x = np.array([0.0, 0.5, -1.5, 1.0], dtype=np.float32)
    assert encode_pcm(x, "pcm_s16le") == np.array([0, 16384, -32768, 32767], dtype="<i2").tobytes()
    assert encode_pcm(x, "pcm_f32le") == np.array([0.0, 0.5, -1.0, 1.0], dtype="<f4").tobytes()
    for enc in ENCODINGS:
        assert len(encode_pcm(x, enc)) == 4 * BYTES_PER_SAMPLE[enc]
        assert encode_pcm(np.zeros(0, np.float32), enc) == b""


# ITU-T G.711 codes (the Sun g711.c reference that audioop implements): input -> code.
ULAW_REFERENCE = {
    0: 0xFF,
    1: 0xFF,
    -1: 0x7E,
    100: 0xF2,
    -100: 0x72,
    1000: 0xCE,
    -1000: 0x4E,
    32767: 0x80,
    -32768: 0x00,
}
ALAW_REFERENCE = {
    0: 0xD5,
    1: 0xD5,
    -1: 0x55,
    100: 0xD3,
    -100: 0x53,
    1000: 0xFA,
    -1000: 0x7A,
    32767: 0xAA,
    -32768: 0x2A,
}
ULAW_DECODE = {0x00: -32124, 0x80: 32124, 0xFF: 0, 0x7F: 0, 0xF2: 104, 0x7E: -8}
ALAW_DECODE = {0xD5: 8, 0x55: -8, 0xAA: 32256, 0x2A: -32256, 0xD3: 104}


def test_g711_reference_values() -> None:
    assert s16_to_ulaw(list(ULAW_REFERENCE)).tolist() == list(ULAW_REFERENCE.values())
    assert s16_to_alaw(list(ALAW_REFERENCE)).tolist() == list(ALAW_REFERENCE.values())
    assert ulaw_to_s16(list(ULAW_DECODE)).tolist() == list(ULAW_DECODE.values())
    assert alaw_to_s16(list(ALAW_DECODE)).tolist() == list(ALAW_DECODE.values())


def test_g711_codes_round_trip_and_are_monotonic() -> None:
    # Every code decodes to a value that encodes back to it (µ-law's "negative zero" 0x7F aside).
    ulaw = s16_to_ulaw(ulaw_to_s16(CODES))
    assert np.array_equal(ulaw[CODES != 0x7F], CODES[CODES != 0x7F]) and ulaw[0x7F] == 0xFF
    assert np.array_equal(s16_to_alaw(alaw_to_s16(CODES)), CODES)
    # Encoding then decoding is monotonic in the input and within half a quantization step.
    for enc, dec in ((s16_to_ulaw, ulaw_to_s16), (s16_to_alaw, alaw_to_s16)):
        y = dec(enc(ALL_S16)).astype(np.int32)
        assert np.all(np.diff(y) >= 0)
        assert np.all(np.abs(y - ALL_S16) <= np.maximum(1100, np.abs(ALL_S16.astype(np.int32)) // 15))


@pytest.mark.skipif(audioop is None, reason="audioop was removed in Python 3.13")
def test_g711_bit_exact_with_audioop_for_every_sample() -> None:
    data = ALL_S16.astype("<i2").tobytes()
    assert s16_to_ulaw(ALL_S16).tobytes() == audioop.lin2ulaw(data, 2)
    assert s16_to_alaw(ALL_S16).tobytes() == audioop.lin2alaw(data, 2)
    assert ulaw_to_s16(CODES).astype("<i2").tobytes() == audioop.ulaw2lin(CODES.tobytes(), 2)
    assert alaw_to_s16(CODES).astype("<i2").tobytes() == audioop.alaw2lin(CODES.tobytes(), 2)


def test_g711_payloads_from_float() -> None:
    x = np.array([0.0, 1.0, -1.0, 2.0, -2.0], dtype=np.float32)
    assert encode_pcm(x, "pcm_mulaw") == bytes([0xFF, 0x80, 0x00, 0x80, 0x00])
    assert encode_pcm(x, "pcm_alaw") == bytes([0xD5, 0xAA, 0x2A, 0xAA, 0x2A])
    assert silence(3, "pcm_mulaw") == b"\xff\xff\xff"
    assert silence(2, "pcm_alaw") == b"\xd5\xd5"
    assert silence(2, "pcm_s16le") == bytes(4)
    assert np.all(decode_pcm(silence(5, "pcm_mulaw"), "pcm_mulaw") == 0)


@pytest.mark.parametrize(
    ("encoding", "tolerance"),
    [("pcm_s16le", 2e-5), ("pcm_f32le", 0), ("pcm_mulaw", 0.04), ("pcm_alaw", 0.04)],
)
def test_decode_inverts_encode(encoding: str, tolerance: float) -> None:
    x = speech_like(4800)
    y = decode_pcm(encode_pcm(x, encoding), encoding)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= tolerance


def test_bad_encoding_or_shape_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="encoding"):
        encode_pcm(np.zeros(3, np.float32), "mp3")
    with pytest.raises(ValueError, match="encoding"):
        AudioEncoder("opus")
    with pytest.raises(ValueError, match="rate"):
        AudioEncoder("pcm_s16le", 11025)
    with pytest.raises(ValueError, match="1-D"):
        AudioEncoder().encode(np.zeros((2, 3), np.float32))


# --------------------------------------------------------------------------------------------
# The per-context encoder


def test_native_rate_passes_through_sample_for_sample() -> None:
    enc = AudioEncoder("pcm_s16le", 24000)
    x = speech_like(3000)
    out = enc.encode(x[:1920]) + enc.encode(x[1920:])
    assert out == encode_pcm(x, "pcm_s16le")
    assert enc.sample_offset == 3000 and enc.audio_ms == 125.0
    assert enc.flush() == b""


def _encode_in_chunks(enc: AudioEncoder, x: np.ndarray, cuts: list[int]) -> bytes:
    bounds = [0, *sorted(cuts), len(x)]
    parts = [enc.encode(x[a:b]) for a, b in itertools.pairwise(bounds)]
    return b"".join(parts) + enc.flush()


@pytest.mark.parametrize("rate", [r for r in SAMPLE_RATES if r != 24000])
def test_resampled_length_tracks_input(rate: int) -> None:
    enc = AudioEncoder("pcm_f32le", rate)
    x = speech_like(24000 * 2 + 77)
    out = _encode_in_chunks(enc, x, list(range(1920, len(x), 1920)))
    n = len(out) // 4
    assert n == enc.sample_offset
    assert abs(n - len(x) * rate / 24000) <= 1
    # A tone keeps its pitch: the spectrum peaks at 1 kHz at every output rate.
    tone = np.sin(2 * np.pi * 1000 * np.arange(24000) / 24000).astype(np.float32)
    y = decode_pcm(AudioEncoder("pcm_f32le", rate).encode(tone, last=True), "pcm_f32le")
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert abs(np.argmax(spectrum) * rate / len(y) - 1000) < 5


@settings(max_examples=25, deadline=None)
@given(
    rate=st.sampled_from([r for r in SAMPLE_RATES if r != 24000]),
    cuts=st.lists(st.integers(0, 12000), max_size=12),
    encoding=st.sampled_from(["pcm_f32le", "pcm_s16le"]),
)
def test_resampling_is_chunk_invariant(rate: int, cuts: list[int], encoding: str) -> None:
    x = speech_like(12000, seed=rate)
    whole = _encode_in_chunks(AudioEncoder(encoding, rate), x, [])
    pieces = _encode_in_chunks(AudioEncoder(encoding, rate), x, cuts)
    assert len(pieces) == len(whole)
    a, b = decode_pcm(whole, encoding), decode_pcm(pieces, encoding)
    assert np.abs(a - b).max() <= 1e-5 + 1 / 32768
    one_shot = resample(x, 24000, rate)
    assert len(one_shot) == len(a)
    assert np.abs(np.clip(one_shot, -1, 1) - a).max() <= 1e-5 + 1 / 32768


def test_utterances_flush_and_offsets_keep_counting() -> None:
    enc = AudioEncoder("pcm_s16le", 16000)
    first = enc.encode(speech_like(1920))
    assert 0 < len(first) // 2 < 1280  # the resampler holds back its look-ahead...
    first += enc.flush()  # ...until the utterance ends
    assert len(first) // 2 == 1280 == enc.sample_offset
    second = enc.encode(speech_like(3840, seed=1), last=True)
    assert len(second) // 2 == 2560 and enc.sample_offset == 3840
    assert enc.flush() == b"" and enc.sample_offset == 3840  # nothing pending: flushing is idempotent
    assert enc.encode(np.zeros(0, np.float32)) == b""


def test_encode_last_equals_encode_then_flush() -> None:
    x = speech_like(5000)
    a = AudioEncoder("pcm_mulaw", 8000)
    b = AudioEncoder("pcm_mulaw", 8000)
    assert a.encode(x, last=True) == b.encode(x) + b.flush()
    assert a.sample_offset == b.sample_offset


def test_reset_drops_pending_audio() -> None:
    enc = AudioEncoder("pcm_s16le", 48000)
    enc.encode(speech_like(1920))
    offset = enc.sample_offset
    enc.reset()
    assert enc.flush() == b"" and enc.sample_offset == offset


# --------------------------------------------------------------------------------------------
# WAV


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("known_length", [False, True])
def test_streaming_wav_header_is_readable(encoding: str, known_length: bool) -> None:
    x = speech_like(2401)
    payload = encode_pcm(x, encoding)
    header = wav_header(16000, encoding, num_samples=len(x) if known_length else None)
    if not known_length:
        assert header[4:8] == b"\xff\xff\xff\xff" and header[-4:] == b"\xff\xff\xff\xff"
    y, rate = read_wav(header + payload)
    assert rate == 16000
    assert np.array_equal(y, decode_pcm(payload, encoding))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_finite_wav_holds_the_streamed_samples(encoding: str) -> None:
    x = speech_like(2401)
    data = wav_bytes(x, 22050, encoding=encoding)
    payload = encode_pcm(x, encoding)
    y, rate = read_wav(data)
    assert rate == 22050 and np.array_equal(y, decode_pcm(payload, encoding))
    header = wav_header(22050, encoding, num_samples=len(x))
    if encoding != "pcm_f32le":  # libsndfile writes float files with a PEAK chunk; ours has none
        assert data.startswith(header) and data[len(header) :].startswith(payload)
    if encoding in ("pcm_s16le", "pcm_mulaw"):  # the header is byte for byte what libsndfile writes
        buf = io.BytesIO()
        subtype = "PCM_16" if encoding == "pcm_s16le" else "ULAW"
        sf.write(buf, float_to_s16(x), 22050, subtype=subtype, format="WAV")
        assert buf.getvalue()[: len(header)] == header


def test_wav_files_round_trip(tmp_path: Path) -> None:
    x = speech_like(4000)
    path = tmp_path / "out.wav"
    write_wav(path, x, 24000)
    assert sf.info(str(path)).subtype == "PCM_16"
    y, rate = read_wav(path)
    assert rate == 24000 and np.abs(y - x).max() <= 1 / 32768
    buf = io.BytesIO(wav_bytes(x, 24000, encoding="pcm_f32le"))
    assert sf.info(buf).subtype == "FLOAT"
    buf.seek(0)
    y, _ = read_wav(buf)
    assert np.array_equal(y, x)
