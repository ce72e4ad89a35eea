"""Tests that need a CUDA device or real weights in the local Hugging Face cache.

They skip cleanly here (no GPU, no hub access). On a GPU machine: `pytest -m gpu`; with real
weights cached (`huggingface-cli download Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice`):
`pytest -m real_weights`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.sampling import SamplingParams
from engine.scheduler import Engine

GREEDY = SamplingParams(temperature=0.0, subtalker_temperature=0.0)
TEXT = "Streaming speech on a graphics card, one token at a time."
REAL_MODEL = os.environ.get("TTS_REAL_MODEL", "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _speak(engine: Engine, deltas: list[str], **kw: object) -> tuple[np.ndarray, np.ndarray]:
    s = engine.open_stream(**kw)  # type: ignore[arg-type]
    for d in deltas:
        s.push_text(d)
    s.end()
    chunks = list(s.chunks(timeout=600))
    codes = np.concatenate([c.codes for c in chunks if c.frames])
    return codes, np.concatenate([c.samples for c in chunks])


@pytest.mark.gpu
@cuda
def test_cuda_streaming_equals_whole_text_and_batch(tiny_ckpt: Path) -> None:
    """On the GPU (bf16): streamed deltas equal the whole text, and a batch equals each alone."""
    engine = Engine(str(tiny_ckpt), device="cuda", max_streams=4)
    try:
        whole, _ = _speak(engine, [TEXT], voice="ryan", sampling=GREEDY, max_frames=40)
        words = TEXT.split(" ")
        streamed, _ = _speak(
            engine,
            [w if i == 0 else " " + w for i, w in enumerate(words)],
            voice="ryan",
            sampling=GREEDY,
            max_frames=40,
        )
        np.testing.assert_array_equal(streamed, whole)
        streams = [
            engine.open_stream(voice=v, sampling=GREEDY, max_frames=20) for v in ("ryan", "serena", "aiden")
        ]
        for s in streams:
            s.push_text(TEXT)
            s.end()
        for s, v in zip(streams, ("ryan", "serena", "aiden"), strict=True):
            got = np.concatenate([c.codes for c in s.chunks(timeout=600) if c.frames])
            alone, _ = _speak(engine, [TEXT], voice=v, sampling=GREEDY, max_frames=20)
            np.testing.assert_array_equal(got, alone)
    finally:
        engine.close()


@pytest.mark.gpu
@cuda
def test_cuda_codec_matches_cpu(tiny_ckpt: Path) -> None:
    from engine.checkpoint import load_checkpoint
    from engine.torch.codec import CodecStreams
    from engine.torch.weights import load_codec_decoder

    ckpt = load_checkpoint(str(tiny_ckpt))
    cpu = load_codec_decoder(ckpt, torch.device("cpu"), torch.float32)
    gpu = load_codec_decoder(ckpt, torch.device("cuda"), torch.float32)
    codes = torch.randint(0, 2048, (2, 16, 40))
    ref = cpu(codes)
    pool = CodecStreams(gpu, 2, device="cuda", dtype=torch.float32)
    got = torch.cat(
        [pool.decode([0, 1], codes[:, :, i : i + 8].cuda()) for i in range(0, 40, 8)], dim=1
    ).cpu()
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


def _cached_real_model() -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(REAL_MODEL, local_files_only=True)
    except Exception:
        pytest.skip(f"{REAL_MODEL} is not in the local Hugging Face cache")


@pytest.mark.real_weights
def test_real_weights_match_official() -> None:
    """Real 0.6B weights, CPU fp32: greedy codes identical to the official package for 60 frames,
    and the utterance ends by itself (trained weights emit EOS)."""
    path = _cached_real_model()
    from oracle import qwen_tts

    qwen_tts()
    from qwen_tts import Qwen3TTSModel

    engine = Engine(path, device="cpu", start=True)
    try:
        ids = engine.tokenizer.encode(TEXT)
        official = Qwen3TTSModel.from_pretrained(path, device_map="cpu", dtype=torch.float32)
        template = torch.tensor([[151644, 77091, 198, *ids, 151645, 198, 151644, 77091, 198]])
        with torch.no_grad():
            ref = official.model.generate(
                input_ids=[template], languages=["english"], speakers=["ryan"], non_streaming_mode=False,
                do_sample=False, subtalker_dosample=False, max_new_tokens=61,
            )[0][0]  # fmt: skip
        codes, audio = _speak(
            engine, [TEXT], voice="ryan", language="english", sampling=GREEDY, max_frames=60
        )
        np.testing.assert_array_equal(codes, ref.numpy())
        assert np.abs(audio).max() > 0.01
    finally:
        engine.close()
