"""int8 linear layers for the talker and the code predictor (CPU).

Weights are int8 with one scale per output channel (symmetric, max-abs), packed once for the
quantized engine that `engine.cpu_features` picks (fbgemm on x86 with AVX2 or better, qnnpack on
ARM). Activations stay fp32 between layers; each product quantizes its input row block on the
fly to uint8 with one scale and zero point per call ("dynamic" quantization), which is what
these kernels take. Accumulation is int32 and the output is fp32.

Why dynamic int8 and not weight-only int8 (`torch._weight_int8pack_mm`): a decode step
multiplies one row per stream by each weight, so it is bound by reading the weights, and the
dynamic kernels read them as int8 and use VNNI dot products. Measured on the 2-core dev CPU
(Xeon with AVX-512, VNNI, AMX), one 0.6B decoder layer at one row: fp32 1.51 ms, bf16 1.46 ms,
weight-only int8 with bf16 activations 0.65 ms (with fp32 activations 10.7 ms: no fast path),
dynamic int8 fbgemm 0.39 ms, x86 0.42 ms, onednn 0.71 ms.

The packed weights are torch's quantized-engine objects (`torch.ops.quantized.linear_prepack`);
torch marks the *quantized tensor* API deprecated, so `pack_int8` is the one place that makes
one (`quantize_per_channel`), and a failure there surfaces when the model loads, not mid-stream.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from engine.torch.model import FusedLinear


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8: (q int8 [out, in], scale fp32 [out]), w ≈ q * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def pack_int8(weight: Tensor, bias: Tensor | None, engine: str) -> torch.ScriptObject:
    """A packed int8 weight for `torch.ops.quantized.linear_dynamic` on `engine`."""
    q, scale = quantize_weight(weight)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine  # the packing format follows the engine set now
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated.*")
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*deprecated.*")
            zeros = torch.zeros(q.shape[0], dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zeros, 0)
        b = bias.detach().float() if bias is not None else None
        return torch.ops.quantized.linear_prepack(qw, b)
    finally:
        torch.backends.quantized.engine = previous


class Int8Linear(nn.Module):
    """A FusedLinear's product with int8 weights: same `forward` / `split` contract (fp32 in/out).

    `reduce_range` quantizes activations to 7 bits: needed where the kernel's u8 x s8 products
    can saturate 16-bit sums (AVX2 without VNNI); with VNNI the full 8 bits are exact to int32.
    """

    def __init__(
        self, weight: Tensor, bias: Tensor | None, splits: list[int], engine: str, reduce_range: bool
    ):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.splits = splits
        self.engine = engine
        self.reduce_range = reduce_range
        self.packed = pack_int8(weight, bias, engine)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = torch.ops.quantized.linear_dynamic(
            x.reshape(-1, self.in_features).float(), self.packed, self.reduce_range
        )
        return y.view(*lead, self.out_features)

    def split(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(self(x).split(self.splits, dim=-1))


def fused_weight(lin: FusedLinear) -> Tensor:
    """The [out, in] weight of a FusedLinear in either of its layouts."""
    if lin.groups > 1:  # [G, in, out/G] -> [out, in]
        return lin.weight.permute(1, 0, 2).reshape(lin.in_features, lin.out_features).t()
    return lin.weight


@torch.no_grad()
def quantize_linears(module: nn.Module, engine: str, reduce_range: bool, skip: tuple[str, ...] = ()) -> int:
    """Replace every FusedLinear below `module` (inference form) by an Int8Linear, except those
    whose qualified name starts with one of `skip`. Returns how many were replaced."""
    count = 0
    for name, child in list(module.named_modules()):
        for cname, sub in list(child.named_children()):
            full = f"{name}.{cname}" if name else cname
            if isinstance(sub, FusedLinear) and not any(full.startswith(s) for s in skip):
                q = Int8Linear(fused_weight(sub), sub.bias, list(sub.splits), engine, reduce_range)
                setattr(child, cname, q)
                count += 1
    return count
