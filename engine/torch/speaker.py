"""Speaker encoder of the Base models: reference audio -> x-vector (MODEL.md §1.4).

Three stages, each usable alone:

1. `load_audio` / `prepare_audio`: any file libsndfile reads (WAV, FLAC, OGG/Vorbis/Opus, MP3,
   ...) or an in-memory array -> float32 mono at 24 kHz, with every unusable input refused as an
   `AudioError` that carries a stable `code`.
2. `mel_spectrogram`: the official 24 kHz log-mel front end ([B, N] -> [B, T, 128], T = N // 256).
3. `SpeakerEncoder`: ECAPA-TDNN (Desplanques et al., 2020) -> one `enc_dim` vector per clip.

`extract_xvector` chains 2 and 3 exactly as the official `extract_speaker_embedding` does. Module
and parameter names equal the official checkpoint keys under `speaker_encoder.` (prefix removed),
so those weights load with `load_state_dict(strict=True)`.

Shapes: B batch, N samples, T mel frames, M mel bins, C channels, A attention channels.

Facts about the official model that an integrator should know (all reproduced here):
- Every convolution pads "same" with *reflect* padding, so a clip needs at least
  `SpeakerEncoder.min_frames` frames (5 for the released config) or the forward pass fails.
- There is no BatchNorm anywhere (the SpeechBrain ECAPA has one after every TDNN); the released
  model is conv + ReLU only, so there are no running statistics and eval() changes nothing.
- The attention inside the statistics pooling sees ReLU(conv(.)) before its tanh: the TDNN block
  always includes its ReLU.
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
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import SpeakerEncoderConfig

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


def mel_spectrogram(wav: Tensor) -> Tensor:
    """24 kHz waveform [B, N] -> log-mel [B, T, 128] with T = N // 256 (needs N > 384).

    Frames are not centred: the signal is reflect-padded by (n_fft - hop) / 2 = 384 on each side
    and the STFT runs with center=False, so frame t covers samples [256 t - 384, 256 t + 640).
    Always computed in fp32 (as the official code does even for a bf16 model).
    """
    pad = (N_FFT - HOP_LENGTH) // 2
    if wav.ndim != 2 or wav.shape[1] <= pad:
        raise ValueError(f"mel_spectrogram expects [batch, samples > {pad}], got shape {tuple(wav.shape)}")
    wav = wav.to(torch.float32)
    padded = F.pad(wav[:, None], (pad, pad), mode="reflect")[:, 0]  # [B, N + 768]
    window = torch.hann_window(WIN_LENGTH, device=wav.device)  # periodic, as torch/official
    spec = torch.stft(
        padded,
        N_FFT,
        hop_length=HOP_LENGTH,
        win_length=WIN_LENGTH,
        window=window,
        center=False,
        normalized=False,
        onesided=True,
        return_complex=True,
    )  # [B, 513, T]
    # The 1e-9 inside the root keeps silent bins differentiable and finite (official choice).
    magnitude = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    fbank = torch.tensor(mel_filterbank(), device=wav.device)  # [M, 513], a copy of the cached array
    mel = torch.matmul(fbank, magnitude)  # [B, M, T]
    return torch.log(torch.clamp(mel, min=1e-5)).transpose(1, 2)  # [B, T, M]


# --------------------------------------------------------------------------------------------
# ECAPA-TDNN


def _same_reflect_conv(c_in: int, c_out: int, kernel_size: int = 1, dilation: int = 1) -> nn.Conv1d:
    # "same" output length with reflect padding, as the checkpoint was trained; for the odd
    # kernels used here the padding is symmetric, dilation * (kernel - 1) / 2 per side.
    return nn.Conv1d(c_in, c_out, kernel_size, dilation=dilation, padding="same", padding_mode="reflect")


class TDNNBlock(nn.Module):
    """Time-delay layer: dilated Conv1d + ReLU, [B, C_in, T] -> [B, C_out, T]."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dilation: int):
        super().__init__()
        self.conv = _same_reflect_conv(c_in, c_out, kernel_size, dilation)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))


class Res2Net(nn.Module):
    """Hierarchical split: channel group i > 0 sees group i plus the output of group i - 1.

    Group 0 passes through, so `scale` groups need `scale - 1` convolutions; the receptive field
    grows with the group index, giving multi-scale features at the cost of one conv width.
    """

    def __init__(self, channels: int, scale: int, kernel_size: int, dilation: int):
        super().__init__()
        width = channels // scale
        self.scale = scale
        self.blocks = nn.ModuleList(TDNNBlock(width, width, kernel_size, dilation) for _ in range(scale - 1))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, C, T]
        groups = x.chunk(self.scale, dim=1)  # scale x [B, C / scale, T]
        outs = [groups[0]]
        prev: Tensor | None = None
        for group, block in zip(groups[1:], self.blocks, strict=True):
            prev = block(group if prev is None else group + prev)
            outs.append(prev)
        return torch.cat(outs, dim=1)


class SqueezeExcite(nn.Module):
    """Channel gates from the clip-level mean: x * sigmoid(W2 relu(W1 mean_t(x)))."""

    def __init__(self, channels: int, se_channels: int):
        super().__init__()
        self.conv1 = _same_reflect_conv(channels, se_channels)
        self.conv2 = _same_reflect_conv(se_channels, channels)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T]
        s = x.mean(dim=2, keepdim=True)  # [B, C, 1]
        s = torch.sigmoid(self.conv2(F.relu(self.conv1(s))))
        return x * s


class SERes2NetBlock(nn.Module):
    """1x1 TDNN -> Res2Net -> 1x1 TDNN -> squeeze-excite, plus the residual."""

    def __init__(self, channels: int, scale: int, se_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.tdnn1 = TDNNBlock(channels, channels, 1, 1)
        self.res2net_block = Res2Net(channels, scale, kernel_size, dilation)
        self.tdnn2 = TDNNBlock(channels, channels, 1, 1)
        self.se_block = SqueezeExcite(channels, se_channels)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T] -> [B, C, T]
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


def _weighted_stats(x: Tensor, w: Tensor | float) -> tuple[Tensor, Tensor]:
    """Mean and std over time of x [B, C, T] under weights w (summing to 1 over T) -> [B, C] each."""
    mean = (w * x).sum(dim=2)
    var = (w * (x - mean[..., None]).pow(2)).sum(dim=2)
    # Clamping the variance (not the std) keeps sqrt finite for constant channels.
    return mean, var.clamp(min=1e-12).sqrt()


class AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling, [B, C, T] -> [B, 2C, 1].

    Per-channel attention over time, conditioned on each frame and on the clip's global mean
    and std ("context"), then the attention-weighted mean and std.
    """

    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TDNNBlock(3 * channels, attention_channels, 1, 1)
        self.conv = _same_reflect_conv(attention_channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[-1]
        # Uniform weights 1/T (not x.mean) to keep the official arithmetic and its rounding.
        mean, std = _weighted_stats(x, 1.0 / t)  # [B, C] each
        context = torch.cat(
            [x, mean[..., None].expand_as(x), std[..., None].expand_as(x)], dim=1
        )  # [B, 3C, T]
        attn = torch.softmax(self.conv(torch.tanh(self.tdnn(context))), dim=2)  # [B, C, T]
        mean, std = _weighted_stats(x, attn)
        return torch.cat([mean, std], dim=1)[..., None]  # [B, 2C, 1]


class SpeakerEncoder(nn.Module):
    """ECAPA-TDNN x-vector extractor: log-mel [B, T, M] -> x-vector [B, enc_dim].

    blocks[0] is a TDNN on the mels; blocks[1:] are SE-Res2Net blocks of growing dilation whose
    outputs are concatenated (multi-layer feature aggregation, `mfa`), pooled (`asp`) and
    projected (`fc`, a 1x1 conv on the single pooled frame).
    """

    def __init__(self, cfg: SpeakerEncoderConfig):
        super().__init__()
        _validate(cfg)
        ch, ks, ds = cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        self.cfg = cfg
        self.blocks = nn.ModuleList([TDNNBlock(cfg.mel_dim, ch[0], ks[0], ds[0])])
        for i in range(1, len(ch) - 1):
            self.blocks.append(
                SERes2NetBlock(ch[i], cfg.enc_res2net_scale, cfg.enc_se_channels, ks[i], ds[i])
            )
        self.mfa = TDNNBlock(ch[-1], ch[-1], ks[-1], ds[-1])
        self.asp = AttentiveStatsPool(ch[-1], cfg.enc_attention_channels)
        self.fc = _same_reflect_conv(2 * ch[-1], cfg.enc_dim)

    @property
    def min_frames(self) -> int:
        """Fewest mel frames a clip may have: reflect padding needs more frames than its pad."""
        return 1 + max(
            math.ceil(d * (k - 1) / 2)
            for k, d in zip(self.cfg.enc_kernel_sizes, self.cfg.enc_dilations, strict=True)
        )

    def forward(self, mels: Tensor) -> Tensor:
        x = mels.transpose(1, 2)  # [B, M, T]
        feats = []
        for block in self.blocks:
            x = block(x)  # [B, C_i, T]
            feats.append(x)
        # The first TDNN's output is not aggregated, only the SE-Res2Net outputs.
        x = self.mfa(torch.cat(feats[1:], dim=1))  # [B, C_mfa, T]
        x = self.asp(x)  # [B, 2 C_mfa, 1]
        return self.fc(x)[..., 0]  # [B, enc_dim]


def _validate(cfg: SpeakerEncoderConfig) -> None:
    ch = cfg.enc_channels
    if not len(ch) == len(cfg.enc_kernel_sizes) == len(cfg.enc_dilations):
        raise ValueError("speaker encoder: enc_channels, enc_kernel_sizes and enc_dilations differ in length")
    if len(ch) < 3:
        raise ValueError("speaker encoder: needs a TDNN, at least one SE-Res2Net block and the MFA layer")
    # The official layers would fail only at forward time on these; refuse them at build time.
    if any(c != ch[0] for c in ch[1:-1]):
        raise ValueError(f"speaker encoder: SE-Res2Net blocks are residual, channels must all be equal: {ch}")
    if sum(ch[1:-1]) != ch[-1]:
        raise ValueError(
            f"speaker encoder: MFA width {ch[-1]} must be the sum of the block widths {ch[1:-1]}"
        )
    if ch[0] % cfg.enc_res2net_scale:
        raise ValueError(
            f"speaker encoder: {ch[0]} channels do not split into {cfg.enc_res2net_scale} groups"
        )


def min_samples(encoder: SpeakerEncoder) -> int:
    """Fewest 24 kHz samples `extract_xvector` accepts (1280 for the released config)."""
    # T = N // 256 frames, and the front end's reflect pad of 384 needs N > 384.
    return max(encoder.min_frames * HOP_LENGTH, (N_FFT - HOP_LENGTH) // 2 + 1)


@torch.no_grad()
def extract_xvector(encoder: SpeakerEncoder, wav_24k: np.ndarray | Tensor) -> Tensor:
    """x-vector [enc_dim] of one mono 24 kHz clip [N] (or [1, N]), in the encoder's dtype/device.

    Mirrors the official `extract_speaker_embedding`: fp32 log-mel, then the encoder in its own
    dtype (bf16 for a bf16-loaded model; the vector then differs from an fp32 run). The mel is
    computed on the encoder's device rather than on the CPU as the official code does; the two
    agree to fp32 rounding. Uses no_grad, not inference_mode, so the result can later be
    written into other tensors outside inference mode.
    """
    wav = torch.as_tensor(wav_24k)
    if wav.ndim == 2 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.ndim != 1:
        raise AudioError("bad_format", f"expected one mono clip [samples], got shape {tuple(wav.shape)}")
    need = min_samples(encoder)
    if wav.shape[0] < need:
        raise AudioError(
            "too_short",
            f"audio has {wav.shape[0]} samples at 24 kHz; the speaker encoder needs at least {need}",
        )
    param = next(encoder.parameters())
    mels = mel_spectrogram(wav[None].to(param.device))  # [1, T, 128] fp32
    return encoder(mels.to(param.dtype))[0]  # [enc_dim]
