"""Which numeric form the torch backend runs its models in, and loading them in that form.

Modes:
- `fp32`: exact against the official package; every parity test runs it.
- `int8` (CPU): the talker's and code predictor's linears with int8 weights (per output channel)
  through the quantized engine's dynamic kernels (`engine.torch.quant`); activations, norms,
  attention and the KV cache stay fp32. The codec runs in bf16 where the CPU has native bf16
  (AVX512_BF16 / AMX) and in fp32 elsewhere.
- `bf16`: everything in bf16. The GPU mode; on a CPU only with native bf16.
- `auto`: CUDA -> bf16. CPU -> the first mode of CPU_AUTO_ORDER this CPU runs well (int8 needs
  a fast quantized engine: fbgemm, AVX2 or better; bf16 needs native bf16; fp32 always runs).
  Every mode `auto` may pick must pass the quality report's thresholds (`engine.torch.quality`;
  tests/test_precision.py runs it on tiny checkpoints, the bench on the real shapes).
  The exact tests pin fp32 (TTS_PRECISION=fp32 in tests/conftest.py), so `auto` may pick a
  faster mode here without touching them.

Why int8 before bf16 on a CPU: one decode step multiplies one row per stream by every weight,
so it is bound by reading weights; int8 reads a quarter of fp32's bytes and bf16 half, and the
dev Xeon's measurements agree (one 0.6B layer at one row: int8 0.39 ms, bf16 1.46, fp32 1.51).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.backend import BackendError
from engine.checkpoint import Checkpoint
from engine.cpu_features import CpuFeatures, cpu_features
from engine.torch.codec import CodecDecoder
from engine.torch.model import Talker

PRECISIONS = ("fp32", "bf16", "int8", "auto")


class PrecisionError(BackendError, ValueError):
    """A precision this build or device cannot run."""


@dataclass(frozen=True)
class Plan:
    """What a precision means on one device: dtypes and the kernel for each phase."""

    precision: str  # resolved: "fp32" | "bf16" | "int8"
    dtype: torch.dtype  # the talker's activations and KV cache
    codec_dtype: torch.dtype
    quantized_engine: str | None = None  # int8 only: "fbgemm" | "qnnpack"
    reduce_range: bool = False  # int8 only: 7-bit activations (CPUs without VNNI)
    kernels: dict[str, str] = field(default_factory=dict)  # phase -> kernel, for describe()


@dataclass
class TorchModels:
    talker: Talker  # in inference form (fused linears; int8 ones in int8 mode)
    codec: CodecDecoder
    dtype: torch.dtype  # the talker's activations and KV cache
    codec_dtype: torch.dtype
    precision: str  # resolved: "fp32" | "bf16" | "int8"
    kernels: dict[str, str] = field(default_factory=dict)  # phase -> kernel (describe()-friendly)


def resolve_precision(requested: str, device: torch.device | str, features: CpuFeatures | None = None) -> str:
    """The mode `requested` runs as on `device` ("auto" resolved); PrecisionError if it cannot."""
    return plan_precision(requested, device, features).precision


def plan_precision(requested: str, device: torch.device | str, features: CpuFeatures | None = None) -> Plan:
    """Dtypes and kernels for `requested` on `device`; `features` defaults to this machine's."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"unknown precision {requested!r}; choose one of: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if device.type != "cpu":
        if requested == "int8":
            raise PrecisionError(
                f"int8 runs on CPUs only (its kernels are the CPU quantized engines), not {device}"
            )
        mode = "bf16" if requested == "auto" else requested
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        name = "bf16" if mode == "bf16" else "fp32"
        return Plan(
            mode,
            dtype,
            dtype,
            kernels={"talker": f"{name} ({device.type})", "codec": f"{name} ({device.type})"},
        )
    f = features or cpu_features()
    if requested == "auto":
        requested = auto_cpu_precision(f)
    # The codec is compute-bound convolutions: bf16 where the CPU does bf16 in hardware (oneDNN
    # on AMX / AVX512_BF16, ~2.3x fp32 at 8-frame chunks here), fp32 elsewhere.
    codec_dtype = torch.bfloat16 if f.native_bf16 else torch.float32
    codec_kernel = (
        "bf16 (oneDNN, AMX)" if f.amx and f.native_bf16 else "bf16 (oneDNN)" if f.native_bf16 else "fp32"
    )
    if requested == "fp32":
        return Plan("fp32", torch.float32, torch.float32, kernels={"talker": "fp32", "codec": "fp32"})
    if requested == "bf16":
        if not f.native_bf16:
            raise PrecisionError(
                "bf16 needs native bf16 on this CPU (AVX512_BF16 or AMX); without it bf16 is emulated and "
                "~100x slower than fp32: use int8 or fp32"
            )
        return Plan("bf16", torch.bfloat16, torch.bfloat16, kernels={"talker": "bf16", "codec": codec_kernel})
    engine = f.quantized_engine
    if engine is None:
        raise PrecisionError(
            f"int8 needs a quantized engine for this CPU (fbgemm needs AVX2; {f.machine or 'this CPU'} "
            f"has {f.torch_capability}): use fp32"
        )
    reduce_range = not f.vnni
    bits = "u8 7-bit" if reduce_range else "u8"
    return Plan(
        "int8", torch.float32, codec_dtype, quantized_engine=engine, reduce_range=reduce_range,
        kernels={"talker": f"int8 dynamic ({engine}, {bits} activations)", "codec": codec_kernel},
    )  # fmt: skip


# The order `auto` tries on a CPU, fastest first.
CPU_AUTO_ORDER: tuple[str, ...] = ("int8", "bf16", "fp32")
INTENDED_CPU_AUTO_ORDER = CPU_AUTO_ORDER  # the name the tests use


def auto_cpu_precision(f: CpuFeatures, order: tuple[str, ...] | None = None) -> str:
    """The first mode of `order` (default CPU_AUTO_ORDER) this CPU runs well: int8 needs a
    quantized engine, bf16 native bf16; fp32 always runs."""
    for mode in order or CPU_AUTO_ORDER:
        if (mode == "int8" and f.quantized_engine) or (mode == "bf16" and f.native_bf16) or mode == "fp32":
            return mode
    return "fp32"


def load_models(
    checkpoint: Checkpoint, device: torch.device, precision: str, features: CpuFeatures | None = None
) -> TorchModels:
    from engine.torch.weights import load_codec_decoder, load_talker

    plan = plan_precision(precision, device, features)
    talker = load_talker(checkpoint, device, plan.dtype)
    talker = to_precision(talker, plan, device)
    codec = load_codec_decoder(checkpoint, device, plan.codec_dtype)
    return TorchModels(
        talker=talker, codec=codec, dtype=plan.dtype, codec_dtype=plan.codec_dtype,
        precision=plan.precision, kernels=dict(plan.kernels),
    )  # fmt: skip


def to_precision(talker: Talker, plan: Plan, device: torch.device | str) -> Talker:
    """A freshly loaded talker (checkpoint layout, in `plan.dtype`) -> its inference form for `plan`."""
    from engine.torch.quant import quantize_linears

    device = torch.device(device)
    if plan.precision == "int8":
        assert plan.quantized_engine is not None
        talker.to_inference(groups=1)
        quantize_linears(talker, plan.quantized_engine, plan.reduce_range)
        return talker
    # Grouped column blocks make small-batch GEMMs use every CPU thread (see FusedLinear).
    return talker.to_inference(groups=1 if device.type == "cuda" else 32)
