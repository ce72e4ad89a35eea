"""The MLX audio models (engine/mlx/codec.py, codec_encoder.py, speaker.py) against torch and the
official package, through their loaders.

tests/test_codec.py and tests/test_codec_encoder.py already run their oracle tests once per
backend. Here: the x-vector and log-mel front end against the official `extract_speaker_embedding`
(the helpers and oracle fixture of tests/test_speaker.py), and every loader on a checkpoint
directory in the official layout (read with `mx.load`, without importing torch) and on a random
spec (the torch backend's random weights), compared with the torch backend on the same weights.

Tolerances: fp32 everywhere. Waveforms: ATOL of tests/test_codec.py (measured max |diff| ~4e-6).
x-vectors: the relative scale of tests/test_speaker.py (measured <= 2e-6 of the vector's scale).
Codes: identical.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_codec import ATOL, FRAME, Q
from test_codec_encoder import make_signal
from test_speaker import (
    MEL_TOL,
    RELEASED_0B6,
    TINY,
    assert_xvector_close,
    official,  # noqa: F401  (the oracle fixture)
    official_xvector,
    signal,
    twin,
)

from engine.audio import AudioError
from engine.checkpoint import CheckpointError, load_checkpoint
from engine.config import SpeakerEncoderConfig

mx = pytest.importorskip("mlx.core")

from engine.mlx import codec as mlx_codec  # noqa: E402
from engine.mlx import codec_encoder as mlx_codec_encoder  # noqa: E402
from engine.mlx import speaker as mlx_speaker  # noqa: E402
from engine.mlx.audio_weights import Weights, from_torch  # noqa: E402
from engine.torch import speaker as torch_speaker  # noqa: E402
from engine.torch import weights as torch_weights  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread: None) -> None:
    """Small tensors: run this module on one torch thread (see conftest.one_thread)."""


def mlx_xvector(theirs: torch.nn.Module, cfg: SpeakerEncoderConfig, wav: np.ndarray) -> torch.Tensor:
    """The MLX x-vector of `wav` with the weights of the official encoder `theirs`."""
    enc = mlx_speaker.SpeakerEncoder(cfg, Weights(from_torch(theirs.state_dict()), "official"))
    return torch.from_numpy(mlx_speaker.extract_xvector(enc, wav))


# --------------------------------------------------------------------------------------------
# Speaker encoder against the official package


@pytest.mark.oracle
@pytest.mark.parametrize("n", [24000, 33333, 7777, 385])
def test_mlx_mel_matches_official(official: SimpleNamespace, n: int) -> None:  # noqa: F811
    wav = 0.3 * signal(n, 4)
    ref = official.M.mel_spectrogram(
        torch.from_numpy(wav)[None],
        n_fft=1024,
        num_mels=128,
        sampling_rate=24000,
        hop_size=256,
        win_size=1024,
        fmin=0,
        fmax=12000,
    ).transpose(1, 2)[0]
    got = torch.from_numpy(mlx_speaker.mel_spectrogram(wav))
    assert got.shape == ref.shape == (n // 256, 128) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, **MEL_TOL)


@pytest.mark.oracle
@pytest.mark.parametrize(("n", "seed"), [(24000, 0), (31337, 1), (1280, 2), (72000, 3)])
def test_mlx_xvector_matches_official_tiny(official: SimpleNamespace, n: int, seed: int) -> None:  # noqa: F811
    theirs, ours = twin(official, TINY, seed)
    wav = signal(n, seed)
    ref = official_xvector(official, theirs, wav)
    got = mlx_xvector(theirs, TINY, wav)
    assert got.shape == (TINY.enc_dim,) and got.dtype == torch.float32
    assert ref.abs().max() > 0.1  # random weights must give a non-degenerate vector
    assert_xvector_close(got, ref)
    assert_xvector_close(got, torch_speaker.extract_xvector(ours, wav))


@pytest.mark.oracle
def test_mlx_xvector_matches_official_released_shape(official: SimpleNamespace) -> None:  # noqa: F811
    theirs, _ = twin(official, RELEASED_0B6, 7)
    wav = signal(36000, 7)
    got = mlx_xvector(theirs, RELEASED_0B6, wav)
    assert got.shape == (1024,)
    assert_xvector_close(got, official_xvector(official, theirs, wav))


def test_mlx_xvector_inputs_and_minimum_length() -> None:
    torch.manual_seed(0)
    theirs = torch_speaker.SpeakerEncoder(RELEASED_0B6).eval()
    enc = mlx_speaker.SpeakerEncoder(RELEASED_0B6, Weights(from_torch(theirs.state_dict()), "default init"))
    assert enc.min_frames == 5 and mlx_speaker.min_samples(enc) == 1280
    wav = signal(1280, 0)
    one = mlx_speaker.extract_xvector(enc, wav)
    assert one.dtype == np.float32 and one.shape == (1024,)
    np.testing.assert_array_equal(mlx_speaker.extract_xvector(enc, wav[None]), one)
    np.testing.assert_allclose(
        mlx_speaker.extract_xvector(enc, wav.astype(np.float64)), one, rtol=1e-6, atol=1e-6
    )
    with pytest.raises(AudioError, match="at least 1280") as e:
        mlx_speaker.extract_xvector(enc, signal(1279, 0))
    assert e.value.code == "too_short"
    with pytest.raises(AudioError, match="mono"):
        mlx_speaker.extract_xvector(enc, np.zeros((2, 5000), np.float32))


# --------------------------------------------------------------------------------------------
# Loaders: a checkpoint directory (mx.load) and a random spec, against the torch backend


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Base checkpoint (speaker encoder included) in the official layout."""
    return torch_weights.write_random_checkpoint(tmp_path_factory.mktemp("tiny-base"), "tiny", "base", seed=5)


@pytest.fixture(scope="module", params=["dir", "random"])
def ckpt(request: pytest.FixtureRequest, base_dir: Path) -> object:
    return load_checkpoint(str(base_dir)) if request.param == "dir" else load_checkpoint("random:tiny:base")


def test_mlx_decoder_streams_equal_torch_decode(ckpt: object) -> None:
    """Three rows at different positions, chunks of 1, 2, 4 and 8 frames, a reset and a prime:
    every row's samples equal the torch one-pass decode of that row's codes."""
    theirs = torch_weights.load_codec_decoder(ckpt, CPU, torch.float32)  # type: ignore[arg-type]
    streams = mlx_codec.CodecStreams(mlx_codec.load_codec_decoder(ckpt), max_streams=4)  # type: ignore[arg-type]
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2048, (3, Q, 120))
    ref = rng.integers(0, 2048, (Q, 30))

    streams.decode([3], mx.array(codes[2:, :, :50]))  # row 3 starts 50 frames ahead...
    streams.reset(3)  # ...and is made new again
    streams.prime(1, mx.array(ref))  # row 1 continues a 30-frame reference
    done, out = 0, []
    for n in (1, 2, 4, 8, 8, 4, 2, 1, 90):
        out.append(np.array(streams.decode([0, 1, 3], mx.array(codes[:, :, done : done + n]))))
        done += n
    assert [streams.frames(r) for r in (0, 1, 2, 3)] == [120, 150, 0, 120]
    got = torch.from_numpy(np.concatenate(out, axis=-1))
    with torch.no_grad():
        want = theirs(torch.from_numpy(codes))
        want[1] = theirs(torch.from_numpy(np.concatenate([ref, codes[1]], -1))[None])[0, 30 * FRAME :]
    assert got.shape == want.shape == (3, 120 * FRAME)
    assert 0.05 < want.std().item() < 0.9  # an audible signal, not silence or a clipped square
    assert (got - want).abs().max().item() <= ATOL


def test_mlx_codec_encoder_codes_equal_torch(ckpt: object) -> None:
    theirs = torch_weights.load_codec_encoder(ckpt, CPU)  # type: ignore[arg-type]
    ours = mlx_codec_encoder.load_codec_encoder(ckpt)  # type: ignore[arg-type]
    for kind, n in (("mix", 3 * 24000), ("bursts", 33000), ("sweep", 100)):
        wav = make_signal(kind, n)
        got = ours.encode(wav)
        assert got.dtype == np.int64 and got.shape == (ours.num_frames(n), 16)
        np.testing.assert_array_equal(got, theirs.encode(torch.from_numpy(wav)[None])[0].numpy())


def test_mlx_xvector_equals_torch(ckpt: object) -> None:
    theirs = torch_weights.load_speaker_encoder(ckpt, CPU)  # type: ignore[arg-type]
    ours = mlx_speaker.load_speaker_encoder(ckpt)  # type: ignore[arg-type]
    wav = signal(30000, 9)
    want = torch_speaker.extract_xvector(theirs, wav)
    assert want.abs().max() > 0.1
    assert_xvector_close(torch.from_numpy(mlx_speaker.extract_xvector(ours, wav)), want)


def test_mlx_loaders_do_not_import_torch(base_dir: Path) -> None:
    """A real checkpoint loads with mx.load alone: torch is never imported on that path."""
    code = f"""
import sys
import numpy as np
import mlx.core as mx
from engine.checkpoint import load_checkpoint
from engine.mlx.codec import CodecStreams, load_codec_decoder
from engine.mlx.codec_encoder import load_codec_encoder
from engine.mlx.speaker import extract_xvector, load_speaker_encoder
ckpt = load_checkpoint({str(base_dir)!r})
wav = np.sin(np.arange(24000, dtype=np.float32) / 10)
codes = load_codec_encoder(ckpt).encode(wav)
CodecStreams(load_codec_decoder(ckpt), 1).decode([0], mx.array(codes.T[None]))
extract_xvector(load_speaker_encoder(ckpt), wav)
assert "torch" not in sys.modules, "torch was imported"
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_mlx_loader_refuses_mismatched_weights(base_dir: Path) -> None:
    ckpt = load_checkpoint(str(base_dir))
    cfg = ckpt.codec.decoder
    tensors = dict(mx.load(str(ckpt.codec_weights_file)))
    decoder = {k.removeprefix("decoder."): v for k, v in tensors.items() if k.startswith("decoder.")}
    with pytest.raises(CheckpointError, match=r"pre_conv\.conv\.bias is missing"):
        mlx_codec.CodecDecoder(
            cfg, Weights({k: v for k, v in decoder.items() if k != "pre_conv.conv.bias"}, "x")
        )
    with pytest.raises(CheckpointError, match=r"1 unexpected tensors, e\.g\. extra"):
        mlx_codec.CodecDecoder(cfg, Weights(decoder | {"extra": mx.zeros(1)}, "x"))
    with pytest.raises(CheckpointError, match=r"pre_conv.conv.weight has shape \(1, 2, 3\)"):
        mlx_codec.CodecDecoder(cfg, Weights(decoder | {"pre_conv.conv.weight": mx.zeros((1, 2, 3))}, "x"))
    with pytest.raises(CheckpointError, match="no speaker encoder"):
        mlx_speaker.load_speaker_encoder(load_checkpoint("random:tiny"))


def test_mlx_bfloat16_runs_close_to_float32() -> None:
    """The decoder in bf16 (weights, activations and state): audio close to fp32, as torch's."""
    ckpt = load_checkpoint("random:tiny")
    fp32, bf16 = mlx_codec.load_codec_decoder(ckpt), mlx_codec.load_codec_decoder(ckpt, mx.bfloat16)
    codes = mx.array(np.random.default_rng(1).integers(0, 2048, (1, Q, 20)))
    streams = mlx_codec.CodecStreams(bf16, 1)
    parts = [streams.decode([0], codes[..., :3]), streams.decode([0], codes[..., 3:])]
    assert parts[0].dtype == mx.bfloat16
    err = np.abs(np.array(mx.concatenate(parts, -1).astype(mx.float32)) - np.array(fp32(codes)))
    assert err.mean() < 0.05 and err.max() < 0.5


def test_mlx_models_loaded_in_one_thread_run_in_another(base_dir: Path) -> None:
    """The engine loads models in one thread and runs them in its worker thread: nothing lazy
    may be left in a loaded model (MLX evaluates a lazy array on its builder thread's stream)."""
    ckpt = load_checkpoint(str(base_dir))
    decoder = mlx_codec.load_codec_decoder(ckpt)
    encoder = mlx_codec_encoder.load_codec_encoder(ckpt)
    speaker = mlx_speaker.load_speaker_encoder(ckpt)
    wav = make_signal("mix", 24000)
    out: dict[str, object] = {}

    def work() -> None:
        try:
            codes = encoder.encode(wav)
            out["xvector"] = mlx_speaker.extract_xvector(speaker, wav)
            out["wav"] = np.array(mlx_codec.CodecStreams(decoder, 2).decode([1], mx.array(codes.T[None])))
        except Exception as e:  # reported below, with the thread's own message
            out["error"] = repr(e)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert "error" not in out, out["error"]
    assert out["wav"].shape == (1, 13 * FRAME)  # type: ignore[union-attr]
