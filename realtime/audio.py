"""Audio output: the engine's float32 mono 24 kHz chunks to wire payloads, and WAV helpers.

One :class:`AudioEncoder` per context turns chunks into the session's encoding and rate. Resampling
is ``soxr.ResampleStream``: the filter state carries across chunks, so the output of a stream cut
into any chunks equals the output of the whole signal (no clicks at chunk boundaries), and its
length tracks the input exactly (``round(n * out_rate / in_rate)`` per utterance) so the
``sample_offset`` of each frame is the true position. The stream holds back roughly 10-20 ms of
filter delay until more audio or :meth:`AudioEncoder.flush` arrives, which is why every utterance
end must be flushed.

G.711 µ-law and A-law follow CPython's ``audioop`` (the Sun reference ``g711.c``: µ-law on the top
14 bits, A-law on the top 13 bits of a 16-bit sample), vectorized with numpy; ``audioop`` is gone
from Python 3.13, and a per-sample loop would be too slow for a telephony bridge anyway.

Exceptions: ``ValueError`` for an unsupported encoding or rate, or a chunk that is not 1-D. These
are programming errors: client input is validated by ``realtime.protocol`` before it gets here.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np
import numpy.typing as npt
import soundfile as sf
import soxr

from realtime.protocol import ENCODINGS, NATIVE_SAMPLE_RATE, SAMPLE_RATES

FloatArray = npt.NDArray[np.float32]

BYTES_PER_SAMPLE: Final = {"pcm_s16le": 2, "pcm_f32le": 4, "pcm_mulaw": 1, "pcm_alaw": 1}
# The code of a zero sample: what a paced sink pads with when it has no audio.
SILENCE_BYTE: Final = {"pcm_s16le": 0x00, "pcm_f32le": 0x00, "pcm_mulaw": 0xFF, "pcm_alaw": 0xD5}
RESAMPLE_QUALITY: Final = "HQ"  # VHQ withholds whole chunks at a time; HQ is transparent for speech


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported encoding {encoding!r}; expected one of {ENCODINGS}")


# --------------------------------------------------------------------------------------------
# Sample formats


def float_to_s16(samples: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """Float samples in [-1, 1] to int16, clipped and rounded (scale 32768: exact inverse of
    ``s16 / 32768``, so 16-bit audio survives a round trip). NaN becomes 0, ±inf full scale."""
    x = np.nan_to_num(np.asarray(samples, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.rint(x * np.float32(32768.0)), -32768, 32767).astype(np.int16)


_SEG_UEND: Final = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_SEG_AEND: Final = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def s16_to_ulaw(samples: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """G.711 µ-law codes of int16 samples, bit-exact with ``audioop.lin2ulaw(data, 2)``."""
    v = np.asarray(samples, dtype=np.int16).astype(np.int32) >> 2  # 14-bit, floor like audioop
    neg = v < 0
    mask = np.where(neg, 0x7F, 0xFF)
    mag = np.minimum(np.abs(v), 8159) + 0x21  # clip, then add the bias (0x84 >> 2)
    seg = np.searchsorted(_SEG_UEND, mag)  # first segment whose end >= mag; 8 = out of range
    code = (np.minimum(seg, 7) << 4) | ((mag >> (np.minimum(seg, 7) + 1)) & 0x0F)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def s16_to_alaw(samples: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """G.711 A-law codes of int16 samples, bit-exact with ``audioop.lin2alaw(data, 2)``."""
    v = np.asarray(samples, dtype=np.int16).astype(np.int32) >> 3  # 13-bit
    neg = v < 0
    mask = np.where(neg, 0x55, 0xD5)  # even-bit inversion; the sign bit set means positive
    mag = np.where(neg, -v - 1, v)  # 0..4095, so the segment is always in range
    seg = np.searchsorted(_SEG_AEND, mag)
    code = (seg << 4) | ((mag >> np.maximum(seg, 1)) & 0x0F)
    return (code ^ mask).astype(np.uint8)


def _ulaw_table() -> npt.NDArray[np.int16]:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_table() -> npt.NDArray[np.int16]:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = ((a & 0x0F) << 4) + np.where(seg == 0, 8, 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ULAW_TO_S16: Final = _ulaw_table()
_ALAW_TO_S16: Final = _alaw_table()


def ulaw_to_s16(codes: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """Decode µ-law codes (``audioop.ulaw2lin(data, 2)``)."""
    return _ULAW_TO_S16[np.asarray(codes, dtype=np.uint8)]


def alaw_to_s16(codes: npt.ArrayLike) -> npt.NDArray[np.int16]:
    """Decode A-law codes (``audioop.alaw2lin(data, 2)``)."""
    return _ALAW_TO_S16[np.asarray(codes, dtype=np.uint8)]


def encode_pcm(samples: npt.ArrayLike, encoding: str) -> bytes:
    """Float samples (already at the output rate) to payload bytes; stateless."""
    _check_encoding(encoding)
    if encoding == "pcm_f32le":
        x = np.nan_to_num(np.asarray(samples, dtype=np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
        return np.clip(x, -1.0, 1.0).astype("<f4").tobytes()
    s16 = float_to_s16(samples)
    if encoding == "pcm_s16le":
        return s16.astype("<i2").tobytes()
    if encoding == "pcm_mulaw":
        return s16_to_ulaw(s16).tobytes()
    return s16_to_alaw(s16).tobytes()


def decode_pcm(payload: bytes | bytearray | memoryview, encoding: str) -> FloatArray:
    """Payload bytes back to float32 samples in [-1, 1] (clients, tests, the WAV writer)."""
    _check_encoding(encoding)
    if encoding == "pcm_f32le":
        return np.frombuffer(payload, dtype="<f4").astype(np.float32)
    if encoding == "pcm_s16le":
        s16 = np.frombuffer(payload, dtype="<i2")
    elif encoding == "pcm_mulaw":
        s16 = ulaw_to_s16(np.frombuffer(payload, dtype=np.uint8))
    else:
        s16 = alaw_to_s16(np.frombuffer(payload, dtype=np.uint8))
    return (s16.astype(np.float32) / np.float32(32768.0)).astype(np.float32)


def silence(num_samples: int, encoding: str) -> bytes:
    """``num_samples`` of digital silence in ``encoding`` (µ-law pads with 0xFF, A-law 0xD5)."""
    _check_encoding(encoding)
    return bytes([SILENCE_BYTE[encoding]]) * (num_samples * BYTES_PER_SAMPLE[encoding])


def resample(samples: npt.ArrayLike, in_rate: int, out_rate: int) -> FloatArray:
    """One-shot resampling of a whole signal; equal to an :class:`AudioEncoder` fed any chunks."""
    x = np.ascontiguousarray(samples, dtype=np.float32)
    if in_rate == out_rate:
        return x
    return np.asarray(soxr.resample(x, in_rate, out_rate, quality=RESAMPLE_QUALITY), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# The per-context encoder


class AudioEncoder:
    """Stateful converter for one context: engine chunks in, payload bytes out.

    ``sample_offset`` is the position (at the output rate, from the context start) of the next
    sample :meth:`encode` returns: read it before encoding a chunk to fill the frame header. At
    the native rate there is no resampler and output samples equal input samples one for one.
    """

    def __init__(
        self,
        encoding: str = "pcm_s16le",
        sample_rate: int = NATIVE_SAMPLE_RATE,
        *,
        input_rate: int = NATIVE_SAMPLE_RATE,
    ) -> None:
        _check_encoding(encoding)
        if sample_rate not in SAMPLE_RATES:
            raise ValueError(f"unsupported sample rate {sample_rate}; expected one of {SAMPLE_RATES}")
        self.encoding = encoding
        self.sample_rate = sample_rate
        self.input_rate = input_rate
        self.bytes_per_sample: int = BYTES_PER_SAMPLE[encoding]
        self._resampler = (
            None
            if sample_rate == input_rate
            else soxr.ResampleStream(input_rate, sample_rate, 1, dtype="float32", quality=RESAMPLE_QUALITY)
        )
        self._samples_out = 0
        self._pending = False  # input went into the resampler since the last flush

    @property
    def sample_offset(self) -> int:
        """Output samples emitted so far = offset of the next one."""
        return self._samples_out

    @property
    def audio_ms(self) -> float:
        return self._samples_out * 1000.0 / self.sample_rate

    def encode(self, chunk: npt.ArrayLike, *, last: bool = False) -> bytes:
        """Encode one chunk of float32 mono audio at ``input_rate``.

        ``last=True`` also flushes (the chunk ends an utterance or the context), so the returned
        payload holds everything up to the end of ``chunk``. Without it, a resampling encoder
        keeps the filter's look-ahead (10-20 ms) for the next call; the result may even be empty.
        """
        x = np.ascontiguousarray(chunk, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"expected a 1-D mono chunk, got shape {x.shape}")
        if self._resampler is not None:
            if x.size:
                x = self._resampler.resample_chunk(x)
                self._pending = True
            if last:
                x = np.concatenate([x, self._drain()])
        return self._emit(x)

    def flush(self) -> bytes:
        """The audio still inside the resampler, at the end of an utterance or context.

        The resampler is then reset, so later text (a new utterance of the same context) starts
        from clean filter state, and ``sample_offset`` keeps counting.
        """
        if self._resampler is None:
            return b""
        return self._emit(self._drain())

    def reset(self) -> None:
        """Drop buffered audio without emitting it (cancel)."""
        if self._resampler is not None:
            self._resampler.clear()
        self._pending = False

    def _drain(self) -> FloatArray:
        assert self._resampler is not None
        if not self._pending:
            return np.zeros(0, dtype=np.float32)
        tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._resampler.clear()
        self._pending = False
        return np.asarray(tail, dtype=np.float32)

    def _emit(self, x: FloatArray) -> bytes:
        self._samples_out += len(x)
        return encode_pcm(x, self.encoding)


# --------------------------------------------------------------------------------------------
# WAV

_WAV_FORMAT: Final = {  # encoding -> (WAVE format tag, bits per sample, soundfile subtype)
    "pcm_s16le": (1, 16, "PCM_16"),
    "pcm_f32le": (3, 32, "FLOAT"),
    "pcm_alaw": (6, 8, "ALAW"),
    "pcm_mulaw": (7, 8, "ULAW"),
}
WAV_UNKNOWN_SIZE: Final = 0xFFFFFFFF


def wav_header(sample_rate: int, encoding: str = "pcm_s16le", *, num_samples: int | None = None) -> bytes:
    """A mono RIFF/WAVE header to put before streamed payload bytes of ``encoding``.

    With ``num_samples`` None the RIFF and data sizes are 0xFFFFFFFF ("until the end of the
    stream", as OpenAI's streamed WAV does; libsndfile, ffmpeg and browsers read it). Non-PCM
    formats get the 18-byte fmt chunk and the fact chunk the WAVE spec asks for.
    """
    _check_encoding(encoding)
    tag, bits, _ = _WAV_FORMAT[encoding]
    block = bits // 8
    fmt = struct.pack("<HHIIHH", tag, 1, sample_rate, sample_rate * block, block, bits)
    chunks = b""
    if tag != 1:
        fmt += struct.pack("<H", 0)
        fact = WAV_UNKNOWN_SIZE if num_samples is None else num_samples
        chunks = b"fact" + struct.pack("<II", 4, fact)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + chunks
    if num_samples is None:
        data_size = riff_size = WAV_UNKNOWN_SIZE
    else:
        data_size = num_samples * block
        riff_size = 4 + len(chunks) + 8 + data_size + (data_size & 1)
    return b"RIFF" + struct.pack("<I", riff_size) + b"WAVE" + chunks + b"data" + struct.pack("<I", data_size)


def wav_bytes(samples: npt.ArrayLike, sample_rate: int, *, encoding: str = "pcm_s16le") -> bytes:
    """A complete mono WAV file in memory whose samples are exactly ``encode_pcm(samples, encoding)``.

    PCM and float go through soundfile, fed our own int16 / clipped float32 so the samples equal
    the streamed ones. G.711 does not: libsndfile's µ-law/A-law rounds a few hundred negative
    inputs differently from the G.711 reference, so those files are our header plus our payload.
    """
    _check_encoding(encoding)
    if encoding in ("pcm_mulaw", "pcm_alaw"):
        payload = encode_pcm(samples, encoding)
        pad = b"\0" if len(payload) & 1 else b""  # RIFF chunks are word-aligned
        return wav_header(sample_rate, encoding, num_samples=len(payload)) + payload + pad
    if encoding == "pcm_s16le":
        data: np.ndarray = float_to_s16(samples)
    else:
        data = np.frombuffer(encode_pcm(samples, encoding), dtype="<f4")
    buf = io.BytesIO()
    sf.write(buf, data, sample_rate, subtype=_WAV_FORMAT[encoding][2], format="WAV")
    return buf.getvalue()


def write_wav(
    file: str | Path | BinaryIO, samples: npt.ArrayLike, sample_rate: int, *, encoding: str = "pcm_s16le"
) -> None:
    """Write float samples as a complete mono WAV file (s16 by default, or f32 / µ-law / A-law)."""
    data = wav_bytes(samples, sample_rate, encoding=encoding)
    if isinstance(file, (str, Path)):
        Path(file).write_bytes(data)
    else:
        file.write(data)


def read_wav(file: str | Path | BinaryIO | bytes) -> tuple[FloatArray, int]:
    """Float32 samples (first channel) and the rate of a WAV file, path or bytes."""
    src: Any = io.BytesIO(file) if isinstance(file, bytes) else file
    data, rate = sf.read(src, dtype="float32", always_2d=True)
    return np.ascontiguousarray(data[:, 0]), int(rate)


class ContainerEncoder:
    """Streams compressed containers (mp3, ogg/opus, flac) through libsndfile as audio arrives.

    libsndfile writes into a virtual file; whatever it appends is handed out after each write.
    It may seek back at close to patch a header (a total length); those rewrites of bytes that
    were already sent are dropped, which leaves a valid stream of unknown length.
    """

    _FORMATS: Final = {"mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS"), "flac": ("FLAC", "PCM_16")}

    def __init__(self, fmt: str, sample_rate: int):

        if fmt not in self._FORMATS:
            raise ValueError(f"unsupported container {fmt!r}; choose one of {', '.join(self._FORMATS)}")
        self._io = _AppendOnlyFile()
        container, subtype = self._FORMATS[fmt]
        self._sf = sf.SoundFile(
            self._io, mode="w", samplerate=sample_rate, channels=1, format=container, subtype=subtype
        )

    def encode(self, chunk: npt.ArrayLike) -> bytes:
        x = np.clip(np.asarray(chunk, dtype=np.float32), -1.0, 1.0)
        if x.size:
            self._sf.write(x)
        return self._io.take()

    def close(self) -> bytes:
        self._sf.close()
        return self._io.take()


class _AppendOnlyFile(io.RawIOBase):
    """A seekable sink for libsndfile that keeps only bytes written at or past what was sent."""

    def __init__(self) -> None:
        self._pos = 0
        self._sent = 0
        self._buf = bytearray()  # bytes from self._sent on

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        start = self._pos - self._sent
        if start < 0:
            return 0
        data = self._buf[start : start + len(b)]
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def write(self, b: Any) -> int:
        data = bytes(b)
        start = self._pos - self._sent
        if start < 0:  # rewriting bytes that already left: drop that part
            skip = min(len(data), -start)
            data, start = data[skip:], 0
            self._pos += skip
        end = start + len(data)
        if end > len(self._buf):
            self._buf.extend(b"\0" * (end - len(self._buf)))
        self._buf[start:end] = data
        self._pos += len(data)
        return len(b)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self._sent + len(self._buf) + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def take(self) -> bytes:
        """Bytes ready to send: everything before the write position, sent exactly once."""
        n = min(len(self._buf), max(0, self._pos - self._sent))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._sent += n
        return out
