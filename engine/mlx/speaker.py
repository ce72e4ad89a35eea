"""Speaker encoder of the Base models in MLX: reference audio -> x-vector (MODEL.md §1.4).

The same two stages as `engine/torch/speaker.py` (read its docstring for the facts about the
official model reproduced here), channels last:

1. `mel_spectrogram`: the official 24 kHz log-mel front end, [N] -> [T, 128], T = N // 256, in
   numpy (reflect pad, STFT, the shared Slaney filterbank of `engine.audio`), always fp32.
2. `SpeakerEncoder`: ECAPA-TDNN -> one `enc_dim` vector per clip.

Shapes: B batch, T mel frames, M mel bins, C channels.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from engine.audio import HOP_LENGTH, N_FFT, WIN_LENGTH, AudioError, mel_filterbank
from engine.checkpoint import Checkpoint, CheckpointError
from engine.config import SpeakerEncoderConfig
from engine.mlx.audio_weights import Weights, checkpoint_weights, evaluate_arrays


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """24 kHz waveform [N] -> log-mel [T, 128] float32, T = N // 256 (needs N > 384).

    Frames are not centred: the signal is reflect-padded by (n_fft - hop) / 2 = 384 on each side
    and frame t covers samples [256 t - 384, 256 t + 640), as the official front end.
    """
    pad = (N_FFT - HOP_LENGTH) // 2
    if wav.ndim != 1 or wav.shape[0] <= pad:
        raise ValueError(f"mel_spectrogram expects [samples > {pad}], got shape {wav.shape}")
    padded = np.pad(wav.astype(np.float32), pad, mode="reflect")  # [N + 768]
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]  # [T, 1024]
    # torch.hann_window: periodic, in fp32.
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WIN_LENGTH) / WIN_LENGTH)).astype(np.float32)
    spec = np.fft.rfft(frames * window, axis=-1)  # [T, 513]
    # The 1e-9 inside the root keeps silent bins finite (official choice).
    magnitude = np.sqrt(spec.real**2 + spec.imag**2 + 1e-9).astype(np.float32)
    mel = magnitude @ mel_filterbank().T  # [T, M]
    return np.log(np.maximum(mel, 1e-5)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# ECAPA-TDNN


def _reflect_pad(x: mx.array, p: int) -> mx.array:
    """Reflect-pad [B, T, C] by p frames on each side (the edge frame itself not repeated)."""
    if p == 0:
        return x
    return mx.concatenate([x[:, p:0:-1], x, x[:, -2 : -p - 2 : -1]], axis=1)


class Conv:
    """Conv1d with "same" reflect padding, as the checkpoint was trained (odd kernels: the pad
    is dilation·(k-1)/2 on each side)."""

    def __init__(self, w: Weights, name: str, c_in: int, c_out: int, kernel: int = 1, dilation: int = 1):
        self.weight = w.take(f"{name}.weight", (c_out, c_in, kernel)).transpose(0, 2, 1)  # [C_out, k, C_in]
        self.bias = w.take(f"{name}.bias", (c_out,))
        self.dilation, self.pad = dilation, dilation * (kernel - 1) // 2

    def __call__(self, x: mx.array) -> mx.array:
        if self.weight.shape[1] == 1:
            return x @ self.weight[:, 0].T + self.bias
        return mx.conv1d(_reflect_pad(x, self.pad), self.weight, dilation=self.dilation) + self.bias


class TDNNBlock:
    """Time-delay layer: dilated conv + ReLU."""

    def __init__(self, w: Weights, name: str, c_in: int, c_out: int, kernel: int, dilation: int):
        self.conv = Conv(w, f"{name}.conv", c_in, c_out, kernel, dilation)

    def __call__(self, x: mx.array) -> mx.array:
        return mx.maximum(self.conv(x), 0.0)


class SERes2NetBlock:
    """1x1 TDNN -> Res2Net (group i > 0 sees group i plus the output of group i - 1) -> 1x1 TDNN
    -> squeeze-excite (channel gates from the clip mean), plus the residual."""

    def __init__(self, w: Weights, name: str, channels: int, scale: int, se: int, kernel: int, dilation: int):
        width = channels // scale
        self.scale = scale
        self.tdnn1 = TDNNBlock(w, f"{name}.tdnn1", channels, channels, 1, 1)
        self.res2net = [
            TDNNBlock(w, f"{name}.res2net_block.blocks.{i}", width, width, kernel, dilation)
            for i in range(scale - 1)
        ]
        self.tdnn2 = TDNNBlock(w, f"{name}.tdnn2", channels, channels, 1, 1)
        self.se1 = Conv(w, f"{name}.se_block.conv1", channels, se)
        self.se2 = Conv(w, f"{name}.se_block.conv2", se, channels)

    def __call__(self, x: mx.array) -> mx.array:  # [B, T, C] -> [B, T, C]
        groups = mx.split(self.tdnn1(x), self.scale, axis=-1)
        outs, prev = [groups[0]], None
        for group, block in zip(groups[1:], self.res2net, strict=True):
            prev = block(group if prev is None else group + prev)
            outs.append(prev)
        h = self.tdnn2(mx.concatenate(outs, axis=-1))
        gates = mx.sigmoid(self.se2(mx.maximum(self.se1(h.mean(axis=1, keepdims=True)), 0.0)))  # [B, 1, C]
        return x + h * gates


def _weighted_stats(x: mx.array, w: mx.array | float) -> tuple[mx.array, mx.array]:
    """Mean and std over time of x [B, T, C] under weights w (summing to 1 over T) -> [B, C]."""
    mean = (w * x).sum(axis=1)
    var = (w * mx.square(x - mean[:, None])).sum(axis=1)
    return mean, mx.sqrt(mx.maximum(var, 1e-12))


class SpeakerEncoder:
    """ECAPA-TDNN x-vector extractor: log-mel [B, T, M] -> x-vector [B, enc_dim].

    blocks[0] is a TDNN on the mels, blocks[1:] SE-Res2Net blocks whose outputs are
    concatenated (`mfa`), pooled with attentive statistics (`asp`) and projected (`fc`)."""

    def __init__(self, cfg: SpeakerEncoderConfig, weights: Weights):
        _validate(cfg)
        w, ch, ks, ds = weights, cfg.enc_channels, cfg.enc_kernel_sizes, cfg.enc_dilations
        self.cfg = cfg
        self.tdnn = TDNNBlock(w, "blocks.0", cfg.mel_dim, ch[0], ks[0], ds[0])
        self.blocks = [
            SERes2NetBlock(w, f"blocks.{i}", ch[i], cfg.enc_res2net_scale, cfg.enc_se_channels, ks[i], ds[i])
            for i in range(1, len(ch) - 1)
        ]
        self.mfa = TDNNBlock(w, "mfa", ch[-1], ch[-1], ks[-1], ds[-1])
        self.asp_tdnn = TDNNBlock(w, "asp.tdnn", 3 * ch[-1], cfg.enc_attention_channels, 1, 1)
        self.asp_conv = Conv(w, "asp.conv", cfg.enc_attention_channels, ch[-1])
        self.fc = Conv(w, "fc", 2 * ch[-1], cfg.enc_dim)
        w.finish()
        evaluate_arrays(self)

    @property
    def min_frames(self) -> int:
        """Fewest mel frames a clip may have: reflect padding needs more frames than its pad."""
        return 1 + max(
            math.ceil(d * (k - 1) / 2)
            for k, d in zip(self.cfg.enc_kernel_sizes, self.cfg.enc_dilations, strict=True)
        )

    def __call__(self, mels: mx.array) -> mx.array:
        x = self.tdnn(mels)  # [B, T, C]
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        # The first TDNN's output is not aggregated, only the SE-Res2Net outputs.
        x = self.mfa(mx.concatenate(feats, axis=-1))  # [B, T, C_mfa]
        # Attentive statistics pooling, conditioned on each frame and the clip's mean and std;
        # uniform weights 1/T (not x.mean) keep the official arithmetic.
        t = x.shape[1]
        mean, std = _weighted_stats(x, 1.0 / t)
        context = mx.concatenate(
            [x, mx.broadcast_to(mean[:, None], x.shape), mx.broadcast_to(std[:, None], x.shape)], axis=-1
        )  # [B, T, 3C]
        attn = mx.softmax(self.asp_conv(mx.tanh(self.asp_tdnn(context))), axis=1)  # over time
        mean, std = _weighted_stats(x, attn)
        return self.fc(mx.concatenate([mean, std], axis=-1)[:, None])[:, 0]  # [B, enc_dim]


def _validate(cfg: SpeakerEncoderConfig) -> None:
    ch = cfg.enc_channels
    # The shapes the official layers need; a checkpoint that breaks them fails here, not mid-run.
    if not len(ch) == len(cfg.enc_kernel_sizes) == len(cfg.enc_dilations) or len(ch) < 3:
        raise ValueError("speaker encoder: enc_channels, enc_kernel_sizes and enc_dilations are inconsistent")
    if any(c != ch[0] for c in ch[1:-1]) or sum(ch[1:-1]) != ch[-1] or ch[0] % cfg.enc_res2net_scale:
        raise ValueError(f"speaker encoder: unsupported channel layout {ch}")


def min_samples(encoder: SpeakerEncoder) -> int:
    """Fewest 24 kHz samples `extract_xvector` accepts (1280 for the released config)."""
    return max(encoder.min_frames * HOP_LENGTH, (N_FFT - HOP_LENGTH) // 2 + 1)


def extract_xvector(encoder: SpeakerEncoder, wav_24k: np.ndarray) -> np.ndarray:
    """x-vector [enc_dim] float32 of one mono 24 kHz clip [N] (or [1, N]), as the official
    `extract_speaker_embedding` computes it: fp32 log-mel, then the encoder."""
    wav = np.asarray(wav_24k)
    if wav.ndim == 2 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.ndim != 1:
        raise AudioError("bad_format", f"expected one mono clip [samples], got shape {wav.shape}")
    need = min_samples(encoder)
    if wav.shape[0] < need:
        raise AudioError(
            "too_short",
            f"audio has {wav.shape[0]} samples at 24 kHz; the speaker encoder needs at least {need}",
        )
    mels = mx.array(mel_spectrogram(wav))[None]  # [1, T, M]
    return np.array(encoder(mels)[0], dtype=np.float32)


def load_speaker_encoder(checkpoint: Checkpoint) -> SpeakerEncoder:
    """The x-vector extractor of a Base checkpoint (fp32: a small model, run once per voice)."""
    cfg = checkpoint.config.speaker_encoder
    if cfg is None:
        raise CheckpointError(
            f"{checkpoint.name} is a {checkpoint.config.model_type} model: it has no speaker encoder"
        )
    return SpeakerEncoder(cfg, checkpoint_weights(checkpoint, "speaker_encoder", mx.float32))
