"""Precision modes: kernel selection from CPU features, int8 linears, and each mode's quality
report against fp32 within the thresholds `auto` relies on (tiny random checkpoints)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint import load_checkpoint
from engine.cpu_features import CpuFeatures, cpu_features, parse_cpuinfo
from engine.torch.model import FusedLinear
from engine.torch.precision import (
    INTENDED_CPU_AUTO_ORDER,
    PrecisionError,
    auto_cpu_precision,
    load_models,
    plan_precision,
    resolve_precision,
    to_precision,
)
from engine.torch.quality import THRESHOLDS, codec_report, model_report, passes
from engine.torch.quant import Int8Linear, quantize_linears, quantize_weight
from engine.torch.weights import load_codec_decoder, load_talker

CPU = torch.device("cpu")
EPYC_AVX2 = CpuFeatures(
    "AMD EPYC 7B13", frozenset(["fpu", "sse2", "avx", "avx2", "fma", "f16c", "bmi2"]), "AVX2", "x86_64"
)  # fmt: skip
XEON_AMX = CpuFeatures(
    "Intel(R) Xeon(R) Processor",
    frozenset(
        [
            "avx2",
            "fma",
            "avx512f",
            "avx512bw",
            "avx512_vnni",
            "avx512_bf16",
            "amx_tile",
            "amx_int8",
            "amx_bf16",
        ]
    ),
    "AVX512",
    "x86_64",
)
OLD_X86 = CpuFeatures("Pentium", frozenset(["sse2", "sse4_2"]), "DEFAULT", "x86_64")
ALL_ORDERS = [INTENDED_CPU_AUTO_ORDER, ("bf16", "int8", "fp32"), ("bf16", "fp32"), ("fp32",)]
GREEDY_FORCED_STEPS = 50  # x 4 rows = 200 codebook-0 predictions


# ---- selection ----------------------------------------------------------------------------------


def test_parse_cpuinfo_reads_model_and_flags() -> None:
    text = (
        "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t: x\n"
    )
    model, flags = parse_cpuinfo(text)
    assert model == "AMD EPYC 7B13"
    assert flags == frozenset({"fpu", "avx2", "fma"})


@pytest.mark.parametrize("order", ALL_ORDERS)
def test_avx2_only_cpu_never_selects_bf16(order: tuple[str, ...]) -> None:
    """bf16 without native support is emulated (~100x slower): never chosen, never allowed."""
    assert not EPYC_AVX2.native_bf16
    assert auto_cpu_precision(EPYC_AVX2, order) != "bf16"
    plan = plan_precision("int8", CPU, EPYC_AVX2)
    assert plan.codec_dtype == torch.float32  # the codec stays fp32 too
    assert plan.reduce_range  # no VNNI: 7-bit activations keep fbgemm's 16-bit sums exact
    with pytest.raises(PrecisionError, match="native bf16"):
        plan_precision("bf16", CPU, EPYC_AVX2)


def test_auto_prefers_int8_then_native_bf16_then_fp32() -> None:
    order = INTENDED_CPU_AUTO_ORDER
    assert auto_cpu_precision(XEON_AMX, order) == "int8"
    assert auto_cpu_precision(EPYC_AVX2, order) == "int8"
    assert auto_cpu_precision(OLD_X86, order) == "fp32"  # no quantized engine, no bf16
    assert auto_cpu_precision(XEON_AMX, ("bf16", "fp32")) == "bf16"
    with pytest.raises(PrecisionError, match="int8 needs a quantized engine"):
        plan_precision("int8", CPU, OLD_X86)


def test_auto_on_a_cpu_resolves_by_features_with_the_default_order() -> None:
    assert resolve_precision("auto", CPU, XEON_AMX) == "int8"
    assert resolve_precision("auto", CPU, EPYC_AVX2) == "int8"
    assert resolve_precision("auto", CPU, OLD_X86) == "fp32"
    no_int8_but_bf16 = CpuFeatures("ARM", frozenset(["avx512_bf16"]), "DEFAULT", "riscv64")
    assert resolve_precision("auto", CPU, no_int8_but_bf16) == "bf16"


def test_native_bf16_cpu_runs_the_codec_in_bf16_and_the_int8_talker_in_fp32() -> None:
    plan = plan_precision("int8", CPU, XEON_AMX)
    assert (plan.dtype, plan.codec_dtype, plan.quantized_engine) == (torch.float32, torch.bfloat16, "fbgemm")
    assert not plan.reduce_range  # VNNI: full 8-bit activations
    assert "AMX" in plan.kernels["codec"] and "int8" in plan.kernels["talker"]


def test_cuda_auto_is_bf16_and_int8_is_cpu_only() -> None:
    assert resolve_precision("auto", "cuda", XEON_AMX) == "bf16"
    assert resolve_precision("fp32", "cuda", XEON_AMX) == "fp32"
    with pytest.raises(PrecisionError, match="CPUs only"):
        plan_precision("int8", "cuda", XEON_AMX)
    with pytest.raises(PrecisionError, match="unknown precision"):
        resolve_precision("fp16", CPU)


def test_this_machine_is_detected_once() -> None:
    f = cpu_features()
    assert f is cpu_features()
    assert f.torch_capability == torch.backends.cpu.get_cpu_capability()
    assert set(f.summary()) == {"model", "machine", "torch_capability", "flags"}


# ---- int8 linears -------------------------------------------------------------------------------


needs_int8 = pytest.mark.skipif(cpu_features().quantized_engine is None, reason="no quantized engine here")
needs_bf16 = pytest.mark.skipif(not cpu_features().native_bf16, reason="no native bf16 on this CPU")


def test_quantize_weight_is_per_output_channel() -> None:
    w = torch.randn(8, 16) * torch.logspace(-3, 1, 8)[:, None]  # rows six decades apart
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (8,)
    assert (q.abs().amax(dim=1) == 127).all()  # each row uses its full range
    rel = ((q.float() * scale[:, None] - w).abs().amax(dim=1) / w.abs().amax(dim=1)).max()
    assert rel <= 0.5 / 127 + 1e-6


@needs_int8
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_int8_linear_matches_fp32_linear(rows: int, reduce_range: bool) -> None:
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=g) / 16)
        lin.bias.copy_(torch.randn(96, generator=g))
    fused = FusedLinear([lin], groups=4)  # the grouped CPU layout is unpacked correctly
    q = Int8Linear(lin.weight, lin.bias, [32, 64], cpu_features().quantized_engine, reduce_range)  # type: ignore[arg-type]
    x = torch.randn(rows, 3, 256, generator=g)
    want = fused(x)
    got = q(x)
    assert got.shape == want.shape
    cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.999
    assert [t.shape[-1] for t in q.split(x)] == [32, 64]


@needs_int8
def test_int8_models_replace_every_talker_linear_and_say_so() -> None:
    ckpt = load_checkpoint("random:tiny")
    models = load_models(ckpt, CPU, "int8")
    assert models.precision == "int8" and models.dtype == torch.float32
    kinds = {type(m) for m in models.talker.modules()}
    assert Int8Linear in kinds and FusedLinear not in kinds and torch.nn.Linear not in kinds
    assert "int8" in models.kernels["talker"]
    fp32 = load_models(ckpt, CPU, "fp32")
    assert fp32.precision == "fp32" and Int8Linear not in {type(m) for m in fp32.talker.modules()}


# ---- quality against fp32 -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_talkers():
    ckpt = load_checkpoint("random:tiny")
    base = load_talker(ckpt, CPU, torch.float32)
    ref = copy.deepcopy(base).to_inference(groups=1)
    return ckpt, base, ref


def _report(tiny_talkers, mode: str):
    _, base, ref = tiny_talkers
    plan = plan_precision(mode, CPU)
    test = to_precision(copy.deepcopy(base).to(plan.dtype), plan, CPU)
    return model_report(ref, test, plan.dtype, rows=4, steps=GREEDY_FORCED_STEPS), test


@needs_int8
def test_int8_quality_report_passes_the_auto_thresholds(tiny_talkers) -> None:
    report, _ = _report(tiny_talkers, "int8")
    assert report["talker"]["count"] >= 200
    assert all(passes(report).values()), report


@needs_bf16
def test_bf16_quality_report_passes_the_auto_thresholds(tiny_talkers) -> None:
    report, _ = _report(tiny_talkers, "bf16")
    assert all(passes(report).values()), report


@needs_int8
def test_quality_report_catches_a_broken_int8_kernel(tiny_talkers) -> None:
    """A wrong per-channel scale in one layer (a layout or packing bug) fails the report."""
    _, base, ref = tiny_talkers
    plan = plan_precision("int8", CPU)
    test = copy.deepcopy(base).to_inference(groups=1)
    layer = test.model.layers[0].mlp
    with torch.no_grad():  # what a transposed scale vector would do
        layer.down_proj.weight.mul_(torch.linspace(0.0, 4.0, layer.down_proj.weight.shape[0])[:, None])
    quantize_linears(test, plan.quantized_engine, plan.reduce_range)  # type: ignore[arg-type]
    report = model_report(ref, test, torch.float32, rows=4, steps=GREEDY_FORCED_STEPS)
    assert not passes(report)["talker_cosine"], report


@needs_bf16
def test_bf16_codec_snr_passes_and_a_wrong_codec_fails() -> None:
    ckpt = load_checkpoint("random:tiny")
    ref = load_codec_decoder(ckpt, CPU, torch.float32)
    bf16 = load_codec_decoder(ckpt, CPU, torch.bfloat16)
    assert codec_report(ref, bf16)["snr_db"] >= THRESHOLDS["codec_snr_db_min"]
    other = load_codec_decoder(load_checkpoint("random:tiny", random_seed=5), CPU, torch.bfloat16)
    assert codec_report(ref, other)["snr_db"] < THRESHOLDS["codec_snr_db_min"]


@needs_int8
def test_backend_reports_its_precision_and_kernels() -> None:
    from engine.torch.runner import TorchBackend

    b = TorchBackend(
        load_checkpoint("random:tiny"), max_streams=1, kv_capacity=16, device="cpu", precision="int8"
    )
    d = b.describe()
    assert d["precision"] == "int8" and "int8" in d["kernels"]["talker"]
    # No precision given: TTS_PRECISION (fp32 in this suite, tests/conftest.py), as Engine does.
    plain = TorchBackend(load_checkpoint("random:tiny"), max_streams=1, kv_capacity=16, device="cpu")
    assert plain.precision == os.environ.get("TTS_PRECISION", resolve_precision("auto", CPU))
    assert b.codec_streams.state["frames"].shape == (1,)
    assert next(b.codec.parameters()).dtype == plan_precision("int8", CPU).codec_dtype


def _cached_real_model() -> str:
    import os

    from huggingface_hub import snapshot_download

    name = os.environ.get("TTS_REAL_MODEL", "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")
    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        pytest.skip(f"{name} is not in the local Hugging Face cache")


@pytest.mark.real_weights
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_real_weights_quality_report_passes(mode: str) -> None:
    """The same report on real weights: the better judge of what `auto` may pick."""
    path = _cached_real_model()
    try:
        plan = plan_precision(mode, CPU)
    except PrecisionError as e:
        pytest.skip(str(e))
    ckpt = load_checkpoint(path)
    base = load_talker(ckpt, CPU, torch.float32)
    ref = copy.deepcopy(base).to_inference(groups=1)
    test = to_precision(base.to(plan.dtype), plan, CPU)
    report = model_report(ref, test, plan.dtype, rows=4, steps=GREEDY_FORCED_STEPS)
    del ref, test
    codec_ref = load_codec_decoder(ckpt, CPU, torch.float32)
    report["codec"] = codec_report(codec_ref, load_codec_decoder(ckpt, CPU, plan.codec_dtype))  # type: ignore[assignment]
    assert all(passes(report).values()), report


@needs_int8
def test_int8_engine_streams_end_to_end() -> None:
    """The whole engine in int8 (scheduler, int8 talker, codec in the plan's dtype): audio out."""
    import numpy as np

    from engine import Engine

    with Engine("random:tiny", device="cpu", precision="int8", max_streams=2) as eng:
        assert eng.describe()["precision"] == "int8"
        streams = [eng.open_stream(seed=i, max_frames=6) for i in range(2)]
        for s in streams:
            s.push_text("Two streams at once, in int8.")
            s.end()
        audio = [s.read_all(timeout=300) for s in streams]
    for s, a in zip(streams, audio, strict=True):
        assert s.metrics.frames == 6
        assert a.shape == (6 * eng.samples_per_frame,) and np.isfinite(a).all() and np.abs(a).max() > 0
