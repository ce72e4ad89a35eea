"""Our codec decoder (engine/torch/codec.py) against the official 12 Hz speech-tokenizer decoder.

The official decoder gets random weights that make every part matter (see `randomize_`); ours
loads its state dict with strict=True. Compared: checkpoint keys and shapes (tiny and released),
one full pass against `decoder(codes)`, streaming in any chunking against the official
`Qwen3TTSTokenizerV2Model.decode` (one pass for <= 300 frames), batched interleaved streams
against each stream alone, slot reuse, priming, every compute path (GEMM / conv, tiled / not)
and input validation.

The one-pass, streaming, batching, reset and priming tests run once per backend (`backend`:
the torch decoder, and the MLX one of engine/mlx/codec.py loaded from the same official state
dict, seen through torch tensors); the compute-path, bf16 and key-layout tests are torch's own.

Tolerance: fp32, absolute, on a waveform of std ~0.2 in [-1, 1]. Our products and the official
ones sum in different orders (im2col GEMMs, another attention kernel, an fp64 RoPE angle), and
streaming splits every layer's work differently again; measured max |diff| is ~6e-6 (torch and
MLX alike).
"""

from __future__ import annotations

import importlib.util
import math
import random
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from oracle import qwen_tts

import engine.torch.codec as codec
import engine.torch.codec_layers as codec_layers
from engine.checkpoint import codec_config_dict
from engine.config import CodecDecoderConfig
from engine.torch.codec import CodecDecoder, CodecStreams

ATOL = 5e-5
FRAME = 1920
Q = 16
# Tiny widths, released rates (1920 samples per frame) and window (72); GQA (4 query heads on
# 2 KV heads) so the head grouping is tested too.
TINY = codec_config_dict(tiny=True)["decoder_config"] | dict(num_key_value_heads=2)
RELEASED = codec_config_dict(tiny=False)["decoder_config"]


needs_mlx = pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx is not installed")
BACKENDS = ["torch", pytest.param("mlx", marks=needs_mlx)]


def official_decoder_class() -> tuple[Any, Any]:
    qwen_tts()
    from qwen_tts.core.tokenizer_12hz.configuration_qwen3_tts_tokenizer_v2 import (
        Qwen3TTSTokenizerV2DecoderConfig,
    )
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Decoder

    return Qwen3TTSTokenizerV2Decoder, Qwen3TTSTokenizerV2DecoderConfig


def randomize_(decoder: torch.nn.Module, seed: int = 0) -> None:
    """Random weights under which every part of the decoder shows in the output (in place).

    The official init leaves every codebook at zero (all codes decode alike), SnakeBeta at
    α = β = 0, LayerScale at 0.01 and ConvNeXt γ at 1e-6 (the transformer and ConvNeXt blocks
    would be 1% and 1e-6 corrections that no tolerance can see). Here: convs and linears at unit
    gain (residual branches and the waveform head scaled down so that the signal neither grows
    through 12 residual units nor saturates the final clamp), random α, β, O(1) scales and γ,
    non-trivial norms, Gaussian codebooks with unequal cluster usage.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std + mean

    def rand(shape: torch.Size, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    with torch.no_grad():
        for name, m in decoder.named_modules():
            if isinstance(m, torch.nn.ConvTranspose1d):
                m.weight.copy_(randn(m.weight.shape, 1 / math.sqrt(2 * m.in_channels)))
                m.bias.copy_(randn(m.bias.shape, 0.1))
            elif isinstance(m, torch.nn.Conv1d | torch.nn.Linear):
                gain = 0.3 if name.endswith("conv2.conv") else 0.1 if name == "decoder.6.conv" else 1.0
                m.weight.copy_(randn(m.weight.shape, gain / math.sqrt(m.weight[0].numel())))
                if m.bias is not None:
                    m.bias.copy_(randn(m.bias.shape, 0.1))
            elif isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(randn(m.weight.shape, 0.1, 1.0))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(randn(m.bias.shape, 0.1))
        for name, p in decoder.named_parameters():
            if name.endswith("embedding_sum"):
                p.copy_(randn(p.shape, 0.3))
            elif name.endswith("cluster_usage"):
                p.copy_(rand(p.shape, 0.5, 1.5))
            elif name.endswith(("alpha", "beta")):
                p.copy_(randn(p.shape, 0.3))
            elif name.endswith(("scale", "gamma")):
                p.copy_(rand(p.shape, 0.25, 0.75))


def official_decode(decoder: Any, codes: torch.Tensor) -> torch.Tensor:
    """`Qwen3TTSTokenizerV2Model.decode` (codes [B, Q, T] -> [B, T·1920]) on `decoder`: the
    official method itself, bound to a stand-in that has only what it reads."""
    qwen_tts()
    from qwen_tts.core.tokenizer_12hz.modeling_qwen3_tts_tokenizer_v2 import Qwen3TTSTokenizerV2Model

    model = types.SimpleNamespace(
        decoder=decoder, decode_upsample_rate=FRAME, config=types.SimpleNamespace(return_dict=False)
    )
    with torch.no_grad():
        (wavs,) = Qwen3TTSTokenizerV2Model.decode(model, codes.transpose(1, 2))
    return torch.stack(wavs)


def stream(streams: CodecStreams, rows: list[int], codes: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Feed codes [B, Q, T] to `rows` in the given chunk sizes; the concatenated samples."""
    assert sum(chunks) == codes.shape[-1]
    out, t = [], 0
    for n in chunks:
        out.append(streams.decode(rows, codes[..., t : t + n]))
        t += n
    return torch.cat(out, -1)


def random_chunks(total: int, seed: int, most: int = 12) -> list[int]:
    rng = random.Random(seed)
    chunks: list[int] = []
    while sum(chunks) < total:
        chunks.append(min(rng.randint(1, most), total - sum(chunks)))
    return chunks


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"max |diff| {diff:.2e} > {ATOL:.0e}"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Small tensors: run this module on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def official() -> Any:
    cls, cfg_cls = official_decoder_class()
    torch.manual_seed(0)
    dec = cls(cfg_cls(**TINY)).eval()
    randomize_(dec)
    return dec


@pytest.fixture(scope="module")
def ours(official: Any) -> CodecDecoder:
    dec = CodecDecoder(CodecDecoderConfig.from_dict(TINY, "tiny decoder_config"))
    dec.load_state_dict(official.state_dict(), strict=True)  # runs prepare()
    return dec


class MlxStreamsView:
    """engine.mlx.codec.CodecStreams with torch codes in and torch samples out, so that the same
    tests drive both backends."""

    def __init__(self, streams: Any):
        self.streams = streams

    def decode(self, rows: Sequence[int], codes: torch.Tensor) -> torch.Tensor:
        import mlx.core as mx

        return torch.from_numpy(np.array(self.streams.decode(rows, mx.array(codes.numpy()))))

    def prime(self, row: int, codes: torch.Tensor) -> None:
        import mlx.core as mx

        self.streams.prime(row, mx.array(codes.numpy()))

    def reset(self, row: int) -> None:
        self.streams.reset(row)

    def frames(self, row: int) -> int:
        return int(self.streams.frames(row))


@dataclass
class Backend:
    """One backend's decoder on the official tiny weights: a one-pass decode and a streams factory."""

    name: str
    decode: Callable[[torch.Tensor], torch.Tensor]  # codes [B, Q, T] -> samples [B, T·1920]
    streams: Callable[[int], Any]  # max_streams -> CodecStreams (or its torch view)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, official: Any, ours: CodecDecoder) -> Backend:
    if request.param == "torch":
        return Backend("torch", ours, lambda n: CodecStreams(ours, max_streams=n))
    import mlx.core as mx

    from engine.mlx import codec as mlx_codec
    from engine.mlx.audio_weights import Weights, from_torch

    weights = Weights(from_torch(official.state_dict()), "official tiny decoder")
    dec = mlx_codec.CodecDecoder(CodecDecoderConfig.from_dict(TINY, "tiny decoder_config"), weights)
    return Backend(
        "mlx",
        lambda codes: torch.from_numpy(np.array(dec(mx.array(codes.numpy())))),
        lambda n: MlxStreamsView(mlx_codec.CodecStreams(dec, n)),
    )


def make_codes(batch: int, frames: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (batch, Q, frames), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def long_codes() -> torch.Tensor:
    return make_codes(1, 300, seed=1)


@pytest.fixture(scope="module")
def long_official(official: Any, long_codes: torch.Tensor) -> torch.Tensor:
    return official_decode(official, long_codes)


# --------------------------------------------------------------------------------------------
# Layout


@pytest.mark.oracle
@pytest.mark.parametrize("shape", ["tiny", "released"])
def test_state_dict_matches_official_keys(shape: str) -> None:
    cls, cfg_cls = official_decoder_class()
    d = TINY if shape == "tiny" else RELEASED
    with torch.device("meta"):
        official = cls(cfg_cls(**d))
        ours = CodecDecoder(CodecDecoderConfig.from_dict(d, shape))
    want = {k: (tuple(v.shape), v.dtype) for k, v in official.state_dict().items()}
    got = {k: (tuple(v.shape), v.dtype) for k, v in ours.state_dict().items()}
    assert sorted(got) == sorted(want)
    assert got == want
    if shape == "released":  # MODEL.md §1.5: 114.3 M parameters
        assert sum(math.prod(s) for s, _ in got.values()) == 114_323_137
        assert got["decoder.1.block.1.conv.weight"][0] == (1536, 768, 16)
        assert got["quantizer.rvq_rest.vq.layers.14._codebook.embedding_sum"][0] == (2048, 256)


def test_signal_is_not_degenerate(official: Any, long_official: torch.Tensor) -> None:
    """Guards the randomization: a silent or clipped output would hide any bug."""
    wav = long_official[0]
    assert 0.05 < wav.std().item() < 0.5
    assert (wav.abs() >= 1).float().mean().item() < 1e-3


# --------------------------------------------------------------------------------------------
# Full pass


@pytest.mark.oracle
@pytest.mark.parametrize(("batch", "frames"), [(1, 1), (2, 7), (1, 73), (2, 300)])
def test_forward_matches_official(official: Any, backend: Backend, batch: int, frames: int) -> None:
    codes = make_codes(batch, frames, seed=frames)
    with torch.no_grad():
        want = official(codes)[:, 0]
    got = backend.decode(codes)
    assert got.shape == (batch, frames * FRAME)
    assert_close(got, want)


# --------------------------------------------------------------------------------------------
# Streaming


CHUNKINGS = {
    "1": [1] * 300,
    "2": [2] * 150,
    "3": [3] * 100,
    "4": [4] * 75,
    "8": [8] * 37 + [4],
    "random": random_chunks(300, seed=0),
    "mixed": [1, 71, 1, 1, 2, 72, 5, 3, 144],  # around the 72-frame window edges
}


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(CHUNKINGS))
def test_streaming_matches_official_decode(
    backend: Backend, long_codes: torch.Tensor, long_official: torch.Tensor, name: str
) -> None:
    streams = backend.streams(2)
    got = stream(streams, [1], long_codes, CHUNKINGS[name])
    assert_close(got, long_official)
    assert streams.frames(1) == 300
    assert streams.frames(0) == 0


def test_interleaved_streams_equal_each_alone(backend: Backend) -> None:
    """3 streams, different codes, advanced in random subsets and chunk sizes, so rows at
    different positions (inside and past the 72-frame window) share one batched call."""
    lengths = [150, 97, 120]
    codes = [make_codes(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    streams = backend.streams(4)
    rows = [3, 0, 2]  # stream i lives on row rows[i]
    done = [0, 0, 0]
    out: list[list[torch.Tensor]] = [[], [], []]
    rng = random.Random(1)
    while any(d < n for d, n in zip(done, lengths, strict=True)):
        live = [i for i in range(3) if done[i] < lengths[i]]
        group = rng.sample(live, rng.randint(1, len(live)))
        n = min(rng.choice([1, 1, 2, 3, 5, 9, 16]), *(lengths[i] - done[i] for i in group))
        wav = streams.decode(
            [rows[i] for i in group], torch.stack([codes[i][:, done[i] : done[i] + n] for i in group])
        )
        for j, i in enumerate(group):
            out[i].append(wav[j])
            done[i] += n
    for i in range(3):
        assert_close(torch.cat(out[i]), backend.decode(codes[i][None])[0])


def test_reset_makes_a_row_new(backend: Backend) -> None:
    a, b, c = make_codes(1, 90, seed=20), make_codes(1, 30, seed=21), make_codes(1, 40, seed=22)
    streams = backend.streams(2)
    first = streams.decode([0, 1], torch.cat([a[..., :40], c]))  # row 1 runs alongside row 0
    streams.reset(0)
    assert streams.frames(0) == 0 and streams.frames(1) == 40
    assert_close(streams.decode([0], b), backend.decode(b))  # row 0: fresh
    rest = streams.decode([1], a[..., 40:])  # row 1: untouched by the reset
    want = backend.decode(torch.cat([c, a[..., 40:]], -1))
    assert_close(torch.cat([first[1:], rest], -1), want)


def test_prime_continues_the_reference(backend: Backend) -> None:
    ref, new = make_codes(1, 80, seed=30), make_codes(1, 25, seed=31)
    streams = backend.streams(3)
    streams.prime(2, ref[0])
    assert streams.frames(2) == 80
    got = stream(streams, [2], new, [1, 4, 20])
    assert_close(got, backend.decode(torch.cat([ref, new], -1))[:, 80 * FRAME :])


@pytest.fixture(params=["plain", "gemm", "tiled"])
def compute_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every kernel choice: oneDNN convs and plain linears only; GEMMs (grouped, im2col) for
    every conv and product; the last blocks cut into small time tiles."""
    if request.param == "plain":
        monkeypatch.setattr(codec_layers, "SKINNY_ROWS", 0)
    elif request.param == "gemm":
        monkeypatch.setattr(codec_layers, "SKINNY_ROWS", 1 << 30)
        monkeypatch.setattr(codec_layers, "CONV_GEMM_MIN_WEIGHT", 0)
    else:
        monkeypatch.setattr(codec, "TILE_ELEMENTS", 4000)
    return str(request.param)


@pytest.mark.oracle
def test_every_compute_path_matches_official(
    compute_path: str, ours: CodecDecoder, long_codes: torch.Tensor, long_official: torch.Tensor
) -> None:
    codes, want = long_codes[..., :150], long_official[:, : 150 * FRAME]
    assert_close(ours(codes), want)
    streams = CodecStreams(ours, max_streams=1)
    assert_close(stream(streams, [0], codes, [1, 2, 3, 70, 74]), want)


def test_bfloat16_runs_close_to_float32(official: Any) -> None:
    dec = CodecDecoder(CodecDecoderConfig.from_dict(TINY, "tiny")).to(torch.bfloat16)
    dec.load_state_dict(official.state_dict())
    codes = make_codes(1, 20, seed=40)
    want = CodecDecoder(CodecDecoderConfig.from_dict(TINY, "tiny"))
    want.load_state_dict(official.state_dict())
    got = stream(CodecStreams(dec, 1, dtype=torch.bfloat16), [0], codes, [3, 17])
    assert got.dtype == torch.bfloat16
    err = (got.float() - want(codes)).abs()
    assert err.mean().item() < 0.05 and err.max().item() < 0.5


# --------------------------------------------------------------------------------------------
# Validation


def test_bad_input_raises_value_error(backend: Backend) -> None:
    streams = backend.streams(2)
    ok = make_codes(1, 2, seed=50)
    with pytest.raises(ValueError, match="shape"):
        streams.decode([0], ok[:, :15])  # 15 codebooks
    with pytest.raises(ValueError, match="shape"):
        backend.decode(ok[0])  # no batch dimension
    with pytest.raises(ValueError, match=r"\[0, 2048\)"):
        streams.decode([0], ok.clone().fill_(2048))
    with pytest.raises(ValueError, match=r"\[0, 2048\)"):
        streams.decode([0], ok.clone().fill_(-1))  # the official decode's padding value
    with pytest.raises(ValueError, match="integer"):
        streams.decode([0], ok.float())
    with pytest.raises(ValueError, match="len"):
        streams.decode([0, 1], ok)  # 2 rows, 1 stream of codes
    with pytest.raises(ValueError, match="distinct"):
        streams.decode([1, 1], ok.repeat(2, 1, 1))
    with pytest.raises(ValueError, match="rows must lie"):
        streams.decode([2], ok)
    with pytest.raises(ValueError, match="rows must lie"):
        streams.reset(-1)
    with pytest.raises(ValueError, match="prime"):
        streams.prime(0, ok)  # [1, Q, n] instead of [Q, n]
    if backend.name == "torch":  # MLX streams take the decoder's dtype: nothing to mismatch
        with pytest.raises(ValueError, match="move it"):
            CodecStreams(backend.decode, 1, dtype=torch.bfloat16)  # type: ignore[arg-type]
    assert streams.frames(0) == 0 and streams.frames(1) == 0  # failed calls changed nothing
    assert streams.decode([0], ok[..., :0]).shape == (1, 0)
