"""Layers of the MLX codec decoder (engine/mlx/codec.py), channels last: activations [B, L, C].

Each stateful layer keeps its streaming state in `state[self.state_key]` (batch first), exactly
as in `engine/torch/codec.py`; see that module's docstring for why the decoder streams exactly.
Layers are built from a `Weights` reader with the official checkpoint names, and lay the
weights out for MLX once at load time (convolutions as [k·C_in, C_out] GEMM operands).

Why GEMMs rather than `mx.conv1d`: on the Linux CPU build (mlx 0.32) `mx.conv1d` with dilation
or a long input was 2-5x slower than one im2col product (e.g. 768 channels, k7, dilation 9 over
32 samples: 300 vs 60-100 ms), and a streaming call is a few frames, where a conv is a product of
a few rows with a large weight anyway. Every product then goes to the BLAS that MLX links: on
that build the reference BLAS (~1.5 GFLOP/s here), which bounds the decoder's speed there.
"""

from __future__ import annotations

import mlx.core as mx

from engine.mlx.audio_weights import Weights

# Streaming state of a batch of streams: one array per stateful layer, batch first.
Tensors = dict[str, mx.array]


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as torch's default."""
    return 0.5 * x * (1.0 + mx.erf(x * 0.7071067811865476))


class Linear:
    """y = x W^T + b with the weight stored transposed ([in, out]) for the product."""

    def __init__(self, w: Weights, name: str, d_in: int, d_out: int, bias: bool = True):
        self.weight = w.take(f"{name}.weight", (d_out, d_in)).T
        self.bias = w.take(f"{name}.bias", (d_out,)) if bias else None

    def __call__(self, x: mx.array) -> mx.array:
        if self.bias is None:
            return x @ self.weight
        return mx.addmm(self.bias, x, self.weight)


class SnakeBeta:
    """x + sin²(x·e^α) / (e^β + 1e-9) per channel; α and β are stored as logs."""

    def __init__(self, w: Weights, name: str, channels: int):
        alpha = w.take(f"{name}.alpha", (channels,)).astype(mx.float32)
        beta = w.take(f"{name}.beta", (channels,)).astype(mx.float32)
        self.freq = mx.exp(alpha).astype(w.dtype)
        self.inv_magnitude = (1.0 / (mx.exp(beta) + 1e-9)).astype(w.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        return x + mx.square(mx.sin(x * self.freq)) * self.inv_magnitude


class CausalConv:
    """Conv1d (stride 1) that sees only the past: left context (k-1)·dilation, zero at start.

    The state is the last `context` input samples [B, context, C_in] (after `act`, which is
    applied before the conv, as the official SnakeBeta -> conv pairs do).
    """

    def __init__(
        self,
        w: Weights,
        name: str,
        c_in: int,
        c_out: int,
        kernel: int,
        dilation: int = 1,
        depthwise: bool = False,
    ):
        weight = w.take(f"{name}.conv.weight", (c_out, 1 if depthwise else c_in, kernel))
        self.bias = w.take(f"{name}.conv.bias", (c_out,))
        self.kernel, self.dilation, self.depthwise = kernel, dilation, depthwise
        self.context = (kernel - 1) * dilation
        self.c_in = c_in
        self.state_key = name
        if depthwise:
            self.weight = weight[:, 0, :].T  # [k, C]: tap j scales every channel
        else:
            # im2col order: column j·C_in + c holds input channel c at tap j.
            self.weight = weight.transpose(2, 1, 0).reshape(kernel * c_in, c_out)

    def state_shape(self) -> tuple[int, ...] | None:
        return (self.context, self.c_in) if self.context else None

    def __call__(self, x: mx.array, state: Tensors, act: SnakeBeta | None = None) -> mx.array:
        """conv(act(x)) for x [B, n, C_in] -> [B, n, C_out], continuing from `state`."""
        if act is not None:
            x = act(x)
        n = x.shape[1]
        window = x
        if self.context:
            window = mx.concatenate([state[self.state_key], x], axis=1)  # [B, context + n, C_in]
            state[self.state_key] = window[:, n:]
        d = self.dilation
        taps = [window[:, j * d : j * d + n] for j in range(self.kernel)]
        if self.depthwise:
            out = taps[0] * self.weight[0]
            for j in range(1, self.kernel):
                out = out + taps[j] * self.weight[j]
            return out + self.bias
        cols = taps[0] if self.kernel == 1 else mx.concatenate(taps, axis=-1)  # [B, n, k·C_in]
        return mx.addmm(self.bias, cols, self.weight)


class CausalTransConv:
    """ConvTranspose1d(kernel k, stride s) trimmed by k - s samples on the right (official).

    One GEMM gives every input sample's k-sample response; with k = 2s the second half of the
    last response spills into the next call: that is the state [B, s, C_out] (without bias).
    """

    def __init__(self, w: Weights, name: str, c_in: int, c_out: int, kernel: int, stride: int):
        if kernel not in (stride, 2 * stride):
            raise ValueError(f"transposed conv kernel {kernel} must be stride or 2*stride ({stride})")
        weight = w.take(f"{name}.conv.weight", (c_in, c_out, kernel))  # torch: [C_in, C_out, k]
        self.bias = w.take(f"{name}.conv.bias", (c_out,))
        self.stride, self.halves, self.c_out = stride, kernel // stride, c_out
        # [C_in, (half, i, C_out)]: response sample i of half h, channels last.
        self.weight = weight.reshape(c_in, c_out, self.halves, stride).transpose(0, 2, 3, 1)
        self.weight = self.weight.reshape(c_in, kernel * c_out)
        self.state_key = name

    def state_shape(self) -> tuple[int, ...] | None:
        return (self.stride, self.c_out) if self.halves == 2 else None

    def __call__(self, x: mx.array, state: Tensors) -> mx.array:
        """x [B, T, C_in] -> [B, T·s, C_out]."""
        b, t, _ = x.shape
        s = self.stride
        resp = (x @ self.weight).reshape(b, t, self.halves, s, self.c_out)
        if self.halves == 1:
            return resp.reshape(b, t * s, self.c_out) + self.bias
        first, second = resp[:, :, 0], resp[:, :, 1]  # [B, T, s, C_out]
        # Output block t = first half of response t + second half of response t-1.
        spill = mx.concatenate([state[self.state_key][:, None], second[:, :-1]], axis=1)
        state[self.state_key] = second[:, -1]
        return (first + spill).reshape(b, t * s, self.c_out) + self.bias


class ConvNeXtBlock:
    """Causal depthwise conv k7 -> LayerNorm -> 4x MLP (GELU) -> ·γ, plus the input."""

    def __init__(self, w: Weights, name: str, dim: int):
        self.dwconv = CausalConv(w, f"{name}.dwconv", dim, dim, 7, depthwise=True)
        self.norm_weight = w.take(f"{name}.norm.weight", (dim,))
        self.norm_bias = w.take(f"{name}.norm.bias", (dim,))
        self.pwconv1 = Linear(w, f"{name}.pwconv1", dim, 4 * dim)
        self.pwconv2 = Linear(w, f"{name}.pwconv2", 4 * dim, dim)
        self.gamma = w.take(f"{name}.gamma", (dim,))

    def __call__(self, x: mx.array, state: Tensors) -> mx.array:
        h = mx.fast.layer_norm(self.dwconv(x, state), self.norm_weight, self.norm_bias, 1e-6)
        return x + self.gamma * self.pwconv2(gelu(self.pwconv1(h)))


class ResidualUnit:
    """x + conv_k1(snake(conv_k7,dilated(snake(x))))."""

    def __init__(self, w: Weights, name: str, dim: int, dilation: int):
        self.act1 = SnakeBeta(w, f"{name}.act1", dim)
        self.conv1 = CausalConv(w, f"{name}.conv1", dim, dim, 7, dilation)
        self.act2 = SnakeBeta(w, f"{name}.act2", dim)
        self.conv2 = CausalConv(w, f"{name}.conv2", dim, dim, 1)

    def __call__(self, x: mx.array, state: Tensors) -> mx.array:
        h = self.conv1(x, state, act=self.act1)
        return x + self.conv2(h, state, act=self.act2)


class DecoderBlock:
    """SnakeBeta -> transposed conv (x rate, channels halved) -> residual units, dilation 1/3/9."""

    def __init__(self, w: Weights, name: str, in_dim: int, out_dim: int, rate: int):
        # Checkpoint layout: block.0 SnakeBeta, block.1 the transposed conv, block.2-4 the units.
        self.act = SnakeBeta(w, f"{name}.block.0", in_dim)
        self.up = CausalTransConv(w, f"{name}.block.1", in_dim, out_dim, 2 * rate, rate)
        self.units = [ResidualUnit(w, f"{name}.block.{i + 2}", out_dim, d) for i, d in enumerate((1, 3, 9))]

    def stateful(self) -> list[CausalConv | CausalTransConv]:
        return [self.up] + [c for u in self.units for c in (u.conv1, u.conv2)]

    def __call__(self, x: mx.array, state: Tensors) -> mx.array:
        x = self.up(self.act(x), state)
        for unit in self.units:
            x = unit(x, state)
        return x
