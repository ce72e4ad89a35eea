"""What this CPU can do natively, detected once: the facts the precision and kernel choices rest on.

Sources: the kernel's flags in /proc/cpuinfo (Linux x86) and torch's own dispatch level
(`torch.backends.cpu.get_cpu_capability()`: "AVX512", "AVX2", "DEFAULT", ...). The two can
disagree (torch caps its level with ATEN_CPU_CAPABILITY); each decision uses the one that
governs it: bf16 matmul speed depends on the hardware (oneDNN dispatches on the flags), the
vectorized elementwise kernels on torch's level.

Why it matters: bf16 without native support (no AVX512_BF16 / AMX_BF16) is emulated and ran
~100x slower than fp32 on an AVX2-only EPYC, so `auto` must never pick it there.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CpuFeatures:
    model: str  # "Intel(R) Xeon(R) Processor", ...
    flags: frozenset[str] = field(default_factory=frozenset)  # /proc/cpuinfo flags
    torch_capability: str = "DEFAULT"  # torch.backends.cpu.get_cpu_capability()
    machine: str = ""  # platform.machine(): x86_64, aarch64, ...

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags and "avx512bw" in self.flags

    @property
    def vnni(self) -> bool:
        """int8 dot products (u8 x s8 -> s32) without 16-bit saturation."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX-512 BF16 or AMX): bf16 is fast, not emulated."""
        return bool({"avx512_bf16", "amx_bf16"} & self.flags)

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.flags

    @property
    def quantized_engine(self) -> str | None:
        """The quantized engine for int8 linears, or None when this CPU has no fast one.

        fbgemm needs AVX2 (x86); qnnpack serves ARM. Measured on the dev Xeon at one activation
        row: fbgemm 0.39 ms per 0.6B layer, x86 0.42, onednn 0.71 (see engine.torch.quant)."""
        engines = torch.backends.quantized.supported_engines
        if self.avx2 and "fbgemm" in engines:
            return "fbgemm"
        if self.machine in ("aarch64", "arm64") and "qnnpack" in engines:
            return "qnnpack"
        return None

    def summary(self) -> dict[str, object]:
        """What the bench and the logs print: model, torch level and the flags that matter here."""
        wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                  "amx_tile", "amx_int8", "amx_bf16", "avx512_fp16", "neon", "asimd")  # fmt: skip
        return {
            "model": self.model,
            "machine": self.machine,
            "torch_capability": self.torch_capability,
            "flags": [f for f in wanted if f in self.flags],
        }


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo text (x86 "flags", ARM "Features")."""
    model, flags = "", frozenset[str]()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model, flags


@functools.cache
def cpu_features() -> CpuFeatures:
    """This machine's features (read once per process)."""
    try:
        with open("/proc/cpuinfo") as f:
            model, flags = parse_cpuinfo(f.read())
    except OSError:  # not Linux: torch's dispatch level is all we know
        model, flags = platform.processor(), frozenset()
    capability = torch.backends.cpu.get_cpu_capability()
    if not flags:  # infer the minimum the dispatch level implies
        flags = frozenset(
            {"AVX2": {"avx2"}, "AVX512": {"avx2", "avx512f", "avx512bw"}}.get(capability, set())
        )
    return CpuFeatures(model=model or platform.processor(), flags=flags, torch_capability=capability,
                       machine=platform.machine())  # fmt: skip
