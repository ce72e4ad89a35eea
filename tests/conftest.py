"""Shared fixtures: the real Qwen2 BPE and tiny random checkpoints in the official layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.text import TextTokenizer, write_tokenizer_files


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> TextTokenizer:
    return TextTokenizer.from_dir(tokenizer_dir)
