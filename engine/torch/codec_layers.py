"""The codec decoder's streaming building blocks in PyTorch: causal convolutions and transposed
convolutions that carry their state between calls, SnakeBeta, ConvNeXt and residual blocks, and
the weight-bound products of a few activation rows (see `engine/torch/codec.py` for the whole
decoder and its streaming contract).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Streaming state of a batch of streams: one tensor per stateful layer (batch first), keyed by
# the layer's module name, plus FRAMES, the number of frames each stream has decoded.
StreamState = dict[str, Tensor]
FRAMES = "frames"


class _Stateful(nn.Module):
    """A layer that carries streaming state between calls, stored in `state[self.state_key]`."""

    state_key: str = ""

    def state_shape(self) -> tuple[int, ...] | None:
        """Shape of one stream's state, or None when this instance needs none."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Products with few activation rows

# Streaming decodes a few frames per call, so most products have few activation rows against a
# large weight (up to 75 MB): they are bound by reading the weight. MKL runs such a skinny GEMM
# on one thread at a fraction of the memory bandwidth, and oneDNN's conv is no better; splitting
# the weight's output columns into groups and running one batched GEMM lets ATen put the groups
# on all threads (1.5-3x faster on a 2-core CPU). Many rows, or CUDA: the plain kernels.
# The thresholds are module constants so that tests can force every path.
SKINNY_GROUPS = 16
SKINNY_ROWS = 256  # at most this many activation rows: grouped GEMM
CONV_GEMM_MIN_WEIGHT = 4 << 20  # a k > 1 conv takes the GEMM path only with this many weights


def is_skinny(rows: int, weight: Tensor) -> bool:
    return weight.device.type == "cpu" and rows <= SKINNY_ROWS


def matmul(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [N, K] @ w [K, M] + bias [M] -> [N, M]; w may be any strided view (weight.t(), ...)."""
    n, m = x.shape[0], w.shape[1]
    if not is_skinny(n, w):
        return x @ w if bias is None else torch.addmm(bias, x, w)
    g = math.gcd(m, SKINNY_GROUPS)
    wg = w.unflatten(1, (g, m // g)).transpose(0, 1)  # [G, K, M/G], a view
    xs = x.expand(g, *x.shape)
    out = torch.bmm(xs, wg) if bias is None else torch.baddbmm(bias.view(g, 1, m // g), xs, wg)
    return out.transpose(0, 1).reshape(n, m)  # [G, N, M/G] -> [N, M]


class Linear(nn.Linear):
    """nn.Linear (same parameters) that takes the few-rows path of `matmul`."""

    def forward(self, x: Tensor) -> Tensor:
        out = matmul(x.reshape(-1, x.shape[-1]), self.weight.t(), self.bias)
        return out.view(*x.shape[:-1], -1)


# ----------------------------------------------------------------------------------------------
# Convolutions and activations


class SnakeBeta(nn.Module):
    """x + sin²(x·e^α) / (e^β + 1e-9) per channel; α and β are stored as logs."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        # e^α and 1/(e^β + 1e-9) as [C, 1] columns; the official code recomputes them per call.
        self.register_buffer("freq", torch.ones(channels, 1), persistent=False)
        self.register_buffer("inv_magnitude", torch.ones(channels, 1), persistent=False)

    def prepare(self) -> None:
        alpha, beta = self.alpha.detach().float(), self.beta.detach().float()
        self.freq = alpha.exp()[:, None].to(self.alpha.dtype)
        self.inv_magnitude = (1.0 / (beta.exp() + 1e-9))[:, None].to(self.beta.dtype)

    def forward(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        # x: [B, C, L] -> [B, C, L], written to `out` when given (a conv's input window).
        # Four in-place passes and no temporaries; the products are the official ones in the
        # official order, so the result is bit-identical.
        y = torch.mul(x, self.freq, out=out) if out is not None else x * self.freq
        return y.sin_().square_().mul_(self.inv_magnitude).add_(x)


class CausalConv(_Stateful):
    """Conv1d (stride 1) that sees only the past: left context (k-1)·dilation, zero at start."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1, groups: int = 1
    ):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups)
        self.context = (kernel_size - 1) * dilation

    def state_shape(self) -> tuple[int, ...] | None:
        return (self.conv.in_channels, self.context) if self.context else None

    def forward(self, x: Tensor, state: StreamState, act: SnakeBeta | None = None) -> Tensor:
        """conv(act(x)) for x [B, C_in, L] -> [B, C_out, L], continuing from `state`."""
        if not self.context:
            return self._conv(act(x) if act is not None else x, x.shape[-1])
        b, c, n = x.shape
        # The conv's input window: the stored context, then act(x) written straight into place.
        window = x.new_empty(b, c, self.context + n)
        window[..., : self.context] = state[self.state_key]
        if act is not None:
            act(x, out=window[..., self.context :])
        else:
            window[..., self.context :] = x
        state[self.state_key] = window[..., n:]
        return self._conv(window, n)

    def _conv(self, window: Tensor, n: int) -> Tensor:
        """The conv over window [B, C_in, context + n] -> [B, C_out, n]."""
        b, c, _ = window.shape
        w = self.conv.weight  # [C_out, C_in, k]
        if self.conv.groups > 1 or not self.gemm_preferred(b * n):
            return self.conv(window)
        # im2col: row (b, t) holds window[b, c, t + j·dilation] for c, j in the weight's order.
        k, d = self.conv.kernel_size[0], self.conv.dilation[0]
        sb, sc, st = window.stride()
        cols = window.as_strided((b, n, c, k), (sb, st, sc, d * st), window.storage_offset())
        out = matmul(cols.reshape(b * n, c * k), w.view(w.shape[0], -1).t(), self.conv.bias)
        return out.view(b, n, -1).transpose(1, 2)

    def gemm_preferred(self, rows: int) -> bool:
        """oneDNN's conv is fast except for weight-heavy convs over a short window."""
        return is_skinny(rows, self.conv.weight) and (
            self.conv.kernel_size[0] == 1 or self.conv.weight.numel() >= CONV_GEMM_MIN_WEIGHT
        )


class CausalTransConv(_Stateful):
    """ConvTranspose1d(kernel k, stride s) trimmed by k - s samples on the right (official).

    Every input sample t adds a k-sample response at output t·s. With k = 2s the second half
    of the last sample's response belongs to the next frame: that is exactly what the official
    code trims, and it is the streaming state here (kept without the bias, which is added once,
    with the first half). For a few input samples against a large weight (75 MB for the first
    decoder block) torch's ConvTranspose1d is slow: that case is one GEMM plus an overlap-add.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        if kernel_size not in (stride, 2 * stride):
            raise ValueError(f"transposed conv kernel {kernel_size} must be stride or 2*stride ({stride})")
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.stride = stride
        self.halves = kernel_size // stride
        # The bias as a row of the GEMM's output [C_out, half, s]: on the first half only.
        self.register_buffer("bias_row", torch.zeros(out_channels * kernel_size), persistent=False)

    def state_shape(self) -> tuple[int, ...] | None:
        return (self.conv.out_channels, self.stride) if self.halves == 2 else None

    def prepare(self) -> None:
        bias = self.conv.bias.detach()
        row = torch.zeros(bias.shape[0], self.halves, self.stride, dtype=bias.dtype, device=bias.device)
        row[:, 0] = bias[:, None]
        self.bias_row = row.reshape(-1)

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        """x [B, C_in, T] -> [B, C_out, T·s]."""
        b, c_in, t = x.shape
        c_out, s, w = self.conv.out_channels, self.stride, self.conv.weight  # w: [C_in, C_out, k]
        if not is_skinny(b * t, w):
            y = F.conv_transpose1d(x, w, self.conv.bias, stride=s)  # [B, C_out, (T + halves - 1)·s]
            if self.halves == 2:
                y[..., :s] += state[self.state_key]
                state[self.state_key] = y[..., t * s :] - self.conv.bias[:, None]
            return y[..., : t * s]
        # resp[b, c, j, t, i]: sample i of half j of input sample t's response (+ bias if j = 0).
        rows = x.transpose(1, 2).reshape(b * t, c_in)
        resp = matmul(rows, w.view(c_in, -1), self.bias_row).view(b, t, c_out, self.halves, s)
        resp = resp.permute(0, 2, 3, 1, 4)
        if self.halves == 1:
            return resp[:, :, 0].reshape(b, c_out, t * s)
        first, second = resp[:, :, 0], resp[:, :, 1]  # [B, C_out, T, s]
        out = x.new_empty(b, c_out, t, s)
        # Output block t = first half of response t + second half of response t-1.
        torch.add(first[:, :, 1:], second[:, :, :-1], out=out[:, :, 1:])
        torch.add(first[:, :, 0], state[self.state_key], out=out[:, :, 0])
        state[self.state_key] = second[:, :, -1]
        return out.view(b, c_out, t * s)


class ConvNeXtBlock(nn.Module):
    """Causal depthwise conv k7 -> LayerNorm -> 4x MLP (GELU) -> ·γ, plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = Linear(dim, 4 * dim)
        self.pwconv2 = Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        # x: [B, C, L] -> [B, C, L]
        h = self.dwconv(x, state).transpose(1, 2)  # [B, L, C]
        h = self.pwconv2(F.gelu(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class ResidualUnit(nn.Module):
    """x + conv_k1(snake(conv_k7,dilated(snake(x))))."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv(dim, dim, 7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv(dim, dim, 1)

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        h = self.conv1(x, state, act=self.act1)
        return self.conv2(h, state, act=self.act2).add_(x)


class DecoderBlock(nn.Module):
    """SnakeBeta -> transposed conv (x rate, channels halved) -> residual units, dilation 1/3/9."""

    def __init__(self, in_dim: int, out_dim: int, rate: int):
        super().__init__()
        # One list, as in the checkpoint: block.0 SnakeBeta, block.1 the transposed conv, ...
        self.block = nn.ModuleList(
            [SnakeBeta(in_dim), CausalTransConv(in_dim, out_dim, 2 * rate, rate)]
            + [ResidualUnit(out_dim, d) for d in (1, 3, 9)]
        )
        self.outputs_per_sample = out_dim * rate

    def forward(self, x: Tensor, state: StreamState) -> Tensor:
        act, up, *units = self.block
        x = up(act(x), state)
        for unit in units:
            x = unit(x, state)
        return x
