"""Speaker encoder of the Base models: reference audio -> x-vector (MODEL.md §1.4).

Three stages, each usable alone:

1. `engine.audio.load_audio` / `prepare_audio` (shared by every backend): any file libsndfile
   reads or an in-memory array -> float32 mono at 24 kHz, unusable input refused as `AudioError`.
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

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.audio import HOP_LENGTH, N_FFT, WIN_LENGTH, AudioError, mel_filterbank
from engine.config import SpeakerEncoderConfig


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
