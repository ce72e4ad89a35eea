"""Reference audio for voice cloning, shared by every backend: reading, checking, resampling,
and the official speaker encoder's mel filterbank (numpy; each backend runs its own STFT).

`load_audio` / `prepare_audio`: any file libsndfile reads (WAV, FLAC, OGG/Vorbis/Opus, MP3, ...)
or an in-memory array -> float32 mono at 24 kHz, with every unusable input refused as an
`AudioError` that carries a stable `code`.
"""

from __future__ import annotations

import io
import math
import os
from functools import lru_cache
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

# Front-end parameters hard-coded by the official `extract_speaker_embedding`.
SAMPLE_RATE = 24000
N_FFT = 1024
HOP_LENGTH = 256
WIN_LENGTH = 1024
N_MELS = 128
F_MIN = 0.0
F_MAX = 12000.0


# --------------------------------------------------------------------------------------------
# Reference audio


class AudioError(ValueError):
    """Reference audio that cannot be used.

    `code` is stable and safe to send to a client: "unreadable", "empty", "non_finite",
    "too_long", "too_short", "bad_sample_rate", "bad_format". The message names the problem and
    the numbers involved, and is about the caller's input only (never a library's message or an
    object's repr).
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# Sample rates accepted for reference audio: telephone band to the highest studio rate. Below
# 8 kHz there is no usable voice left; above 384 kHz a header is lying or hostile.
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 384000
MAX_CHANNELS = 8  # 7.1 surround; more is not a voice recording
_BLOCK_SAMPLES = 1 << 20  # decoded per read (frames x channels): 4 MiB of float32

_SF_COUNT_MAX = 2**63 - 1

AudioSource = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO


def load_audio(
    source: AudioSource,
    target_sr: int = SAMPLE_RATE,
    *,
    max_seconds: float = 60.0,
    min_seconds: float = 0.5,
) -> np.ndarray:
    """Read an audio file (path, encoded bytes or a binary file object) -> float32 mono [N'].

    Channels are averaged and the result is resampled to `target_sr` with soxr "HQ", which is
    what the official wrapper gets from `librosa.load` + `librosa.resample` (see
    `prepare_audio`). Integer PCM is scaled to [-1, 1) by soundfile (int16 / 32768).

    Decoding is bounded before it starts: the header's sample rate must lie in
    [MIN_SAMPLE_RATE, MAX_SAMPLE_RATE], its channels be at most MAX_CHANNELS and its length at
    most `max_seconds`, so a small compressed file cannot expand into hundreds of MB. The
    file is then decoded in blocks, each averaged to mono at once, and reading stops as soon
    as it passes `max_seconds` (for streams whose header has no length, or lies): memory is
    bounded by `max_seconds` of mono audio at the declared rate. `min_seconds` bounds the
    other end (the speaker encoder needs a few frames, and a speaker embedding from a blip is
    meaningless anyway).
    """
    if isinstance(source, str | os.PathLike) and not os.path.isfile(source):
        raise AudioError("unreadable", f"audio file not found: {os.fspath(source)!r}")
    file: str | os.PathLike[str] | BinaryIO
    file = io.BytesIO(bytes(source)) if isinstance(source, bytes | bytearray | memoryview) else source
    try:
        with sf.SoundFile(file) as f:
            sr = _check_header(int(f.samplerate), int(f.channels), int(f.frames), max_seconds)
            mono = _read_mono(f, max_seconds)
    except AudioError:
        raise
    except (sf.SoundFileError, RuntimeError, OSError, TypeError, ValueError, EOFError):
        # libsndfile's messages name the Python file object ("<_io.BytesIO object at 0x..>"):
        # not something to show a client. What went wrong is always the same to the caller.
        raise AudioError(
            "unreadable", "could not decode the audio: unsupported format or corrupt file"
        ) from None
    return prepare_audio(mono, sr, target_sr, max_seconds=max_seconds, min_seconds=min_seconds)


def _check_header(sr: int, channels: int, frames: int, max_seconds: float) -> int:
    """Refuse from the header alone what would be refused (or too costly) after decoding."""
    _check_rate(sr)
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError("bad_format", f"audio has {channels} channels; at most {MAX_CHANNELS} are accepted")
    # A stream that does not know its length reports SF_COUNT_MAX; _read_mono stops it.
    if max_seconds * sr < frames < _SF_COUNT_MAX:
        raise AudioError(
            "too_long", f"audio is {frames / sr:.1f} s long; at most {max_seconds:g} s is accepted"
        )
    return sr


def _check_rate(sr: int) -> None:
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioError(
            "bad_sample_rate",
            f"audio sample rate is {sr} Hz; {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz is accepted",
        )


def _read_mono(f: sf.SoundFile, max_seconds: float) -> np.ndarray:
    """Decode block by block into one mono buffer, averaging channels per block (the same
    per-sample mean as over the whole file); too_long as soon as it passes `max_seconds`."""
    max_frames = math.floor(max_seconds * f.samplerate)
    block = max(1, _BLOCK_SAMPLES // f.channels)
    buf = np.empty(f.frames if 0 <= f.frames <= max_frames else 0, dtype=np.float32)
    n = 0
    while (data := f.read(block, dtype="float32", always_2d=True)).shape[0]:  # [k, channels]
        k = data.shape[0]
        if n + k > max_frames:
            raise AudioError("too_long", f"audio is longer than {max_seconds:g} s, the most accepted")
        if n + k > buf.shape[0]:  # the header had no length (or a wrong one): grow geometrically
            buf = np.concatenate([buf[:n], np.empty(max(k, n), dtype=np.float32)])
        data.mean(axis=1, dtype=np.float32, out=buf[n : n + k])
        n += k
    return buf[:n]


def prepare_audio(
    samples: np.ndarray,
    sample_rate: int,
    target_sr: int = SAMPLE_RATE,
    *,
    max_seconds: float = 60.0,
    min_seconds: float = 0.5,
) -> np.ndarray:
    """Validate, downmix and resample an in-memory waveform -> float32 mono [N'] at `target_sr`.

    `samples` is [N] or [N, channels] (soundfile's layout), float or signed-integer PCM
    (integers are scaled by 2^(bits-1), as soundfile does). Values beyond [-1, 1] are kept:
    the official code only prints a warning for them.
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer) or sample_rate <= 0:
        raise AudioError("bad_sample_rate", f"sample rate must be a positive integer, got {sample_rate!r}")
    _check_rate(int(sample_rate))
    if target_sr <= 0:
        raise ValueError(f"target_sr must be positive, got {target_sr}")
    x = np.asarray(samples)
    if x.ndim not in (1, 2):
        raise AudioError("bad_format", f"audio must be [samples] or [samples, channels], got shape {x.shape}")
    if np.issubdtype(x.dtype, np.signedinteger):
        x = x.astype(np.float32) / float(2 ** (8 * x.dtype.itemsize - 1))
    elif not np.issubdtype(x.dtype, np.floating):
        raise AudioError("bad_format", f"audio samples must be float or signed integers, got {x.dtype}")
    if x.size == 0:
        raise AudioError("empty", "audio contains no samples")
    if not np.isfinite(x).all():
        raise AudioError("non_finite", "audio contains NaN or infinite samples")
    seconds = x.shape[0] / sample_rate
    if seconds > max_seconds:
        raise AudioError("too_long", f"audio is {seconds:.1f} s long; at most {max_seconds:g} s is accepted")
    if seconds < min_seconds:
        raise AudioError("too_short", f"audio is {seconds:.3f} s long; at least {min_seconds:g} s is needed")

    mono = x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x.astype(np.float32, copy=False)
    if sample_rate == target_sr:
        return np.ascontiguousarray(mono)
    out = soxr.resample(mono, sample_rate, target_sr, quality="HQ")
    # librosa.resample trims/zero-pads soxr's output to ceil(N * ratio) computed in floating
    # point; using the same float expression keeps the length (and so the mel frame count)
    # identical to the official path, where an exact integer ceil differs for ~0.5% of lengths
    # at 44.1 kHz.
    n_out = math.ceil(mono.shape[0] * (float(target_sr) / sample_rate))
    if out.shape[0] >= n_out:
        out = out[:n_out]
    else:
        out = np.pad(out, (0, n_out - out.shape[0]))
    return np.ascontiguousarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Log-mel front end


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3.0  # Hz per mel in the linear part
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = math.log(6.4) / 27.0  # 27 mels per factor 6.4 in frequency
    mel = f / f_sp
    log_part = f >= min_log_hz
    mel[log_part] = min_log_mel + np.log(f[log_part] / min_log_hz) / logstep
    return mel


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = math.log(6.4) / 27.0
    f = m * f_sp
    log_part = m >= min_log_mel
    f[log_part] = min_log_hz * np.exp(logstep * (m[log_part] - min_log_mel))
    return f


@lru_cache(maxsize=8)
def mel_filterbank(
    sample_rate: int = SAMPLE_RATE,
    n_fft: int = N_FFT,
    n_mels: int = N_MELS,
    fmin: float = F_MIN,
    fmax: float | None = F_MAX,
) -> np.ndarray:
    """Slaney-normalised triangular mel filterbank [n_mels, n_fft // 2 + 1], float32.

    Same values as `librosa.filters.mel(norm="slaney", htk=False)`: n_mels + 2 edges evenly
    spaced on the Slaney mel scale, triangles between neighbouring edges evaluated at the FFT
    bin frequencies, each scaled by 2 / (bandwidth in Hz) so every filter has unit area.
    Computed here so that the engine does not need librosa at run time. Cached: treat the
    returned array as read-only.
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    bin_hz = np.arange(n_fft // 2 + 1, dtype=np.float64) * (sample_rate / n_fft)  # [F]
    mel_lo, mel_hi = _hz_to_mel(np.array([fmin, fmax]))
    edges = _mel_to_hz(np.linspace(mel_lo, mel_hi, n_mels + 2))  # [M + 2] Hz
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [M, 1] each
    rising = (bin_hz - lo) / (mid - lo)  # [M, F]
    falling = (hi - bin_hz) / (hi - mid)
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    # Rounding the triangles to float32 before the area scaling (and again after) reproduces
    # librosa's float32 storage bit for bit, so our log-mels equal the official ones exactly
    # instead of to 1 ulp; random-weight encoders amplify such ulps to ~1e-6 of their output.
    out = (triangles.astype(np.float32).astype(np.float64) * (2.0 / (hi - lo))).astype(np.float32)
    out.setflags(write=False)
    return out
