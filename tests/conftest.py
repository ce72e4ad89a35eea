"""Shared fixtures: the real Qwen2 BPE and tiny random checkpoints in the official layout."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.text import TextTokenizer, write_tokenizer_files

# Exactness tests compare with the official package in fp32: every engine a test builds (and
# every server or CLI it starts in a subprocess) runs fp32 unless it asks for a precision.
os.environ.setdefault("TTS_PRECISION", "fp32")

# Tests that hold for every backend take the `backend` fixture and run once per backend. In CI
# (CI=true) a missing mlx fails those runs instead of skipping them: it is a dependency there.
_MLX = importlib.util.find_spec("mlx") is not None or os.environ.get("CI") == "true"
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("mlx", id="mlx", marks=pytest.mark.skipif(not _MLX, reason="mlx is not installed")),
]


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CustomVoice checkpoint in the official layout (frame cap 200)."""
    from engine.torch.weights import write_random_checkpoint

    return write_random_checkpoint(
        tmp_path_factory.mktemp("tiny-cv"), "tiny", "custom_voice", seed=0, max_new_tokens=201
    )


@pytest.fixture(scope="session")
def official_tiny(tiny_ckpt: Path):
    """The official qwen-tts wrapper loaded from the same directory (the oracle)."""
    import torch
    from oracle import qwen_tts

    qwen_tts()
    from qwen_tts import Qwen3TTSModel

    return Qwen3TTSModel.from_pretrained(str(tiny_ckpt), device_map="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's tests on one torch thread. Their tensors are small: with two OpenMP
    threads on two cores that other jobs share, the threads mostly wait for each other
    (measured up to 100x slower than one thread here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
