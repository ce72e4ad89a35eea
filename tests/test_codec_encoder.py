"""Our Mimi encoder (engine/torch/codec_encoder.py) against the official 12 Hz speech tokenizer.

The official encoder gets random weights that make every part matter (see `randomize_`); ours
loads exactly its `encoder.*` tensors with strict=True. Compared: checkpoint keys and shapes
(tiny and released shapes), codes through the official wrapper `Qwen3TTSTokenizer.encode`
(EncodecFeatureExtractor, padding mask, trim), pre-quantization latents, the padded-batch path,
config variants (an ignored sliding window, GQA, a deeper SEANet, no VQ projection), the
released widths, the frame-count rule and input validation.

Codes, latents, config variants and the released widths are checked once per backend
(`backend`: torch, and the MLX encoder of engine/mlx/codec_encoder.py loaded from the same
state dict); the batch path and input validation are torch's own API.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
import torch
from oracle import qwen_tts

from engine.checkpoint import codec_config_dict
from engine.config import SpeechTokenizerConfig
from engine.torch.codec_encoder import CodecEncoder

SR = 24000
FRAME = 1920
NUM_CODEBOOKS = 16
# Latents agree bit for bit today (same kernels in the same order); the tolerance only leaves
# room for another BLAS. Codes must be identical regardless.
LATENT_RTOL = 1e-5
LATENT_ATOL = 1e-5
# MLX sums its convolutions and attention in other orders: fp32 rounding, relative to the
# latents' scale (max |latent| 4-20 on these signals; measured max |diff| <= 2e-5, about 1.3e-6
# of the scale).
MLX_LATENT_ATOL_PER_SCALE = 1e-5
needs_mlx = pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx is not installed")
BACKENDS = ["torch", pytest.param("mlx", marks=needs_mlx)]


def make_signal(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    if kind == "sweep":  # linear chirp 80 Hz -> 8 kHz over the clip
        f0, f1, dur = 80.0, 8000.0, max(n / SR, 1e-9)
        x = 0.6 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur)))
    elif kind == "bursts":  # 60 ms noise bursts separated by 60 ms of silence
        x = 0.4 * rng.standard_normal(n) * ((np.arange(n) // 1440) % 2 == 0)
    elif kind == "mix":  # harmonic "voice": moving pitch, amplitude envelope, a little noise
        phase = 2 * np.pi * np.cumsum(140 + 40 * np.sin(2 * np.pi * 1.5 * t)) / SR
        x = sum(np.sin(h * phase) / h for h in range(1, 6)) * (0.3 + 0.2 * np.sin(2 * np.pi * 3 * t))
        x = x + 0.02 * rng.standard_normal(n)
    else:
        raise AssertionError(kind)
    return np.clip(x, -1, 1).astype(np.float32)


def randomize_(encoder: torch.nn.Module, seed: int = 0) -> None:
    """Make every part of a random encoder matter, in place (official or ours: same names).

    Transformers' init (linear std 0.02, layer scale 0.01) leaves attention uniform and the
    transformer a 1% correction, so RoPE or masking bugs would hide under any tolerance; and it
    leaves every codebook zero, so every code would be 0. Here the transformer gets unit-gain
    weights with peaked attention, O(1) layer scales and non-trivial norms, and the codebooks
    Gaussian vectors at the scale of the projected latents (about 3 for these nets) with unequal
    cluster usage so that the embed_sum / cluster_usage division matters.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=g)

    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if not name.startswith("encoder_transformer."):
                continue
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(2.0 * randn(p.shape) / p.shape[1] ** 0.5)
            elif name.endswith(("v_proj.weight", "o_proj.weight", "fc1.weight", "fc2.weight")):
                p.copy_(randn(p.shape) / p.shape[1] ** 0.5)
            elif name.endswith("scale"):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            elif "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * randn(p.shape))
        buffers = dict(encoder.named_buffers())
        for name, buf in buffers.items():
            if name.endswith("embed_sum"):
                usage = buffers[name.replace("embed_sum", "cluster_usage")]
                usage.copy_(0.5 + 1.5 * torch.rand(usage.shape, generator=g))
                buf.copy_(3.0 * randn(buf.shape) * usage[:, None])


def official_encoder(enc_dict: dict[str, Any], seed: int = 0) -> Any:
    """The official `Qwen3TTSTokenizerV2Encoder` (MimiModel minus its decoder), randomized."""
    qwen_tts()
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Encoder
    from transformers import MimiConfig

    torch.manual_seed(seed)
    enc = Qwen3TTSTokenizerV2Encoder._from_config(MimiConfig(**enc_dict)).eval()
    randomize_(enc, seed)
    return enc


def official_codes(encoder: Any, x: torch.Tensor) -> torch.Tensor:
    """[1, N] -> [1, T, 16]: MimiModel.encode, first 16 codebooks (for B = 1 the official trim
    to ceil(N / 1920) frames is a no-op)."""
    with torch.no_grad():
        codes = encoder.encode(x[:, None], return_dict=True).audio_codes  # [1, 32, T]
    return codes[:, :NUM_CODEBOOKS].transpose(1, 2)


def encoder_state(official_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        k.removeprefix("encoder."): v
        for k, v in official_model.state_dict().items()
        if k.startswith("encoder.")
    }


class MlxEncoderView:
    """engine.mlx.codec_encoder.CodecEncoder through torch's batch-of-one interface."""

    def __init__(self, encoder: Any):
        self.encoder = encoder

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [1, N] -> [1, T, Q]
        return torch.from_numpy(self.encoder.encode(x[0].numpy()))[None]

    def latents(self, x: torch.Tensor) -> torch.Tensor:  # [1, N] -> [1, D, T]
        return torch.from_numpy(np.array(self.encoder.latents(x[0].numpy())).T)[None]


def make_encoder(backend: str, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> Any:
    """An encoder of `backend` with the config dict `config` loaded strictly from `state`."""
    if backend == "torch":
        enc = CodecEncoder(config).eval()
        enc.load_state_dict(state, strict=True)
        return enc
    from engine.mlx.audio_weights import Weights, from_torch
    from engine.mlx.codec_encoder import CodecEncoder as MlxCodecEncoder

    return MlxEncoderView(
        MlxCodecEncoder(config, NUM_CODEBOOKS, Weights(from_torch(state), "official encoder"))
    )


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Small tensors: run this module on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def official() -> Any:
    """The official wrapper around a tiny random Qwen3TTSTokenizerV2Model (MODEL.md §10.2)."""
    qt = qwen_tts()
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Config
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model
    from transformers import EncodecFeatureExtractor

    torch.manual_seed(0)
    model = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**codec_config_dict(tiny=True))).eval()
    randomize_(model.encoder)
    st = qt.Qwen3TTSTokenizer()
    st.model, st.config, st.device = model, model.config, torch.device("cpu")
    # what speech_tokenizer/preprocessor_config.json builds
    st.feature_extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=SR)
    return st


@pytest.fixture(scope="module")
def ours(official: Any) -> CodecEncoder:
    cfg = SpeechTokenizerConfig.from_dict(codec_config_dict(tiny=True))
    enc = CodecEncoder.from_config(cfg).eval()
    enc.load_state_dict(encoder_state(official.model), strict=True)
    return enc


@pytest.fixture(scope="module")
def untrained() -> CodecEncoder:
    """For tests that need no oracle: a default-initialized tiny encoder (all codes 0)."""
    torch.manual_seed(0)
    return CodecEncoder(codec_config_dict(tiny=True)["encoder_config"]).eval()


# --------------------------------------------------------------------------------------------
# Layout


@pytest.mark.oracle
@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "released"])
def test_state_dict_matches_official_encoder_keys(tiny: bool) -> None:
    qwen_tts()
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Config
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model

    d = codec_config_dict(tiny)
    with torch.device("meta"):
        official = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**d))
        ours = CodecEncoder.from_config(SpeechTokenizerConfig.from_dict(d))
    want = {k: (tuple(v.shape), v.dtype) for k, v in encoder_state(official).items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in ours.state_dict().items()}
    assert sorted(got) == sorted(want)
    assert got == want
    # the codebooks are buffers (EMA statistics), everything else parameters, as officially
    assert {n for n, _ in ours.named_buffers()} == {
        n for n, _ in official.encoder.named_buffers() if n in want
    }
    if not tiny:  # the released file holds 32 codebooks of 2048 x 256 on the encoder side
        assert sum(k.endswith("embed_sum") for k in got) == 32
        assert got["quantizer.acoustic_residual_vector_quantizer.layers.30.codebook.embed_sum"][0] == (
            2048,
            256,
        )


# --------------------------------------------------------------------------------------------
# Codes and latents


SIGNALS = [
    ("sweep", int(0.5 * SR)),  # 12000: 6.25 frames
    ("bursts", int(1.37 * SR)),  # 32880: 17.1 frames
    ("mix", 3 * SR),  # 72000: 37.5 frames
    ("mix", 20 * FRAME),  # 38400: exactly 20 frames
    ("sweep", FRAME),  # exactly one frame
    ("bursts", 100),  # a fraction of a frame
]


@pytest.mark.oracle
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kind", "n"), SIGNALS, ids=[f"{k}-{n}" for k, n in SIGNALS])
def test_codes_and_latents_match_official(
    official: Any, ours: CodecEncoder, backend: str, kind: str, n: int
) -> None:
    if backend != "torch":
        ours = make_encoder(
            backend, codec_config_dict(tiny=True)["encoder_config"], encoder_state(official.model)
        )
    wav = make_signal(kind, n)
    captured: dict[str, torch.Tensor] = {}
    hook = official.model.encoder.downsample.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("latents", out.detach().clone())
    )
    try:
        want = official.encode(wav, sr=SR).audio_codes[0]  # [T, 16] through the wrapper path
    finally:
        hook.remove()

    x = torch.from_numpy(wav)[None]
    got = ours.encode(x)
    assert got.dtype == torch.int64
    assert got.shape == (1, math.ceil(n / FRAME), NUM_CODEBOOKS) == (1, *want.shape)
    assert torch.equal(got[0], want)
    want_latents = captured["latents"]
    atol = LATENT_ATOL if backend == "torch" else MLX_LATENT_ATOL_PER_SCALE * want_latents.abs().max().item()
    torch.testing.assert_close(ours.latents(x), want_latents, rtol=LATENT_RTOL, atol=atol)

    if n >= SR:  # the comparison is meaningful: every codebook uses many different codes
        t = got.shape[1]
        distinct = [len(set(got[0, :, q].tolist())) for q in range(NUM_CODEBOOKS)]
        assert min(distinct) >= t // 3 and sum(distinct) >= NUM_CODEBOOKS * t // 2, distinct


@pytest.mark.oracle
def test_padded_batch_matches_official(official: Any, ours: CodecEncoder) -> None:
    clips = [
        make_signal("mix", 30000, seed=1),
        make_signal("bursts", 50000, seed=2),
        make_signal("sweep", 7000),
    ]
    want = official.encode(clips, sr=SR).audio_codes  # zero-padded batch + padding mask
    got = ours.encode_batch([torch.from_numpy(c) for c in clips])
    assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    # Causality: padding only ever touches the last frame of a shorter clip.
    alone = ours.encode(torch.from_numpy(clips[0])[None])[0]
    assert alone.shape == got[0].shape
    assert torch.equal(alone[:-1], got[0][:-1])


VARIANTS = {
    # transformers 4.57.3 never applies `sliding_window` in Mimi's eager/SDPA attention (the
    # official path): with a 4-frame window a 35-frame clip still encodes with full context.
    "window4": dict(sliding_window=4),
    "gqa": dict(num_key_value_heads=2),
    "deeper-seanet": dict(num_residual_layers=2, dilation_growth_rate=3),
    "no-vq-proj": dict(codebook_dim=32, vector_quantization_hidden_dimension=32),
}


@pytest.mark.oracle
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_match_official(variant: str, backend: str) -> None:
    enc_dict = dict(codec_config_dict(tiny=True)["encoder_config"], **VARIANTS[variant])
    official = official_encoder(enc_dict, seed=3)
    ours = make_encoder(backend, enc_dict, official.state_dict())

    x = torch.from_numpy(make_signal("mix", int(1.37 * SR)))[None]
    got = ours.encode(x)
    assert torch.equal(got, official_codes(official, x))
    assert len(set(got.flatten().tolist())) > 100


@pytest.mark.oracle
@pytest.mark.parametrize("backend", BACKENDS)
def test_released_shape_matches_official(backend: str) -> None:
    """Released widths (8 heads x 64, 64 filters, 256-dim codebooks) on a short clip."""
    enc_dict = codec_config_dict(tiny=False)["encoder_config"]
    official = official_encoder(enc_dict)
    ours = make_encoder(backend, enc_dict, official.state_dict())

    x = torch.from_numpy(make_signal("mix", 9000))[None]  # 4.7 frames
    got = ours.encode(x)
    assert got.shape == (1, 5, NUM_CODEBOOKS)
    assert torch.equal(got, official_codes(official, x))
    assert len(set(got.flatten().tolist())) > 40


# --------------------------------------------------------------------------------------------
# Frame count, batching, errors (no oracle needed)


@pytest.mark.parametrize("n", [1, 1919, 1920, 1921, 3840, 5761])
def test_frame_count_is_ceil_samples_over_1920(untrained: CodecEncoder, n: int) -> None:
    codes = untrained.encode(torch.randn(2, n) * 0.1)
    assert codes.shape == (2, math.ceil(n / FRAME), NUM_CODEBOOKS)
    assert untrained.num_frames(n) == math.ceil(n / FRAME)
    assert untrained.latents(torch.randn(1, n)).shape == (1, 32, math.ceil(n / FRAME))


def test_batch_rows_are_independent() -> None:
    torch.manual_seed(1)
    enc = CodecEncoder(codec_config_dict(tiny=True)["encoder_config"]).eval()
    with torch.no_grad():  # torch's default conv init is too timid to move latents between frames
        for m in enc.modules():
            if isinstance(m, torch.nn.Conv1d):
                torch.nn.init.kaiming_normal_(m.weight)
    randomize_(enc)
    x = torch.randn(3, 5000) * 0.3
    together = enc.encode(x)
    assert len(set(together.flatten().tolist())) > 20
    for i in range(3):
        assert torch.equal(together[i], enc.encode(x[i : i + 1])[0])


@pytest.mark.parametrize(
    ("wav", "match"),
    [
        (torch.zeros(1, 0), "empty audio"),
        (torch.zeros(0, 1920), "empty audio"),
        (torch.zeros(1920), r"shape \[batch, samples\]"),
        (torch.zeros(1, 1, 1920), r"shape \[batch, samples\]"),
        (torch.zeros(1, 1920, dtype=torch.int16), "float samples"),
        (torch.full((1, 1920), float("nan")), "NaN"),
        (np.zeros((1, 1920), dtype=np.float32), "torch.Tensor"),
    ],
    ids=["no-samples", "no-rows", "1d", "3d", "int16", "nan", "numpy"],
)
def test_bad_input_raises_value_error(untrained: CodecEncoder, wav: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        untrained.encode(wav)


def test_bad_batch_raises_value_error(untrained: CodecEncoder) -> None:
    with pytest.raises(ValueError, match="at least one clip"):
        untrained.encode_batch([])
    with pytest.raises(ValueError, match="clip 0: expected a 1-D"):
        untrained.encode_batch([torch.zeros(1, 100)])
    with pytest.raises(ValueError, match="clip 1: empty audio"):
        untrained.encode_batch([torch.zeros(100), torch.zeros(0)])


def test_unsupported_config_raises_value_error() -> None:
    base = codec_config_dict(tiny=True)["encoder_config"]
    with pytest.raises(ValueError, match="use_causal_conv"):
        CodecEncoder(dict(base, use_causal_conv=False))
    with pytest.raises(ValueError, match="codebook_dim"):
        CodecEncoder(dict(base, codebook_dim=8))
    with pytest.raises(ValueError, match="num_codebooks"):
        CodecEncoder(base, num_codebooks=33)
