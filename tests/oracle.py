"""Import the official `qwen-tts==0.1.1` package as a test oracle on a CPU-only torch.

`import qwen_tts` eagerly imports torchaudio (only used by the 25 Hz tokenizer); PyPI's
torchaudio is a CUDA build that fails to load next to a CPU torch, so a stub module stands in
(MODEL.md §8). Tests that need the oracle call `qwen_tts()` and are skipped when the package
is absent.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import types
import warnings
from types import ModuleType

import pytest


def _stub(name: str) -> ModuleType:
    mod = types.ModuleType(name)
    # transformers probes packages with importlib.util.find_spec, which needs a spec.
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__version__ = "0.0.0"  # type: ignore[attr-defined]
    sys.modules[name] = mod
    return mod


def _install_torchaudio_stub() -> None:
    if "torchaudio" in sys.modules:
        return
    ta, comp, kaldi = (
        _stub("torchaudio"),
        _stub("torchaudio.compliance"),
        _stub("torchaudio.compliance.kaldi"),
    )
    ta.compliance = comp  # type: ignore[attr-defined]
    comp.kaldi = kaldi  # type: ignore[attr-defined]


def qwen_tts() -> ModuleType:
    """The official package, or a pytest skip when it is not installed."""
    if importlib.util.find_spec("qwen_tts") is None:
        pytest.skip("the official qwen-tts package is not installed (make setup installs it)")
    _install_torchaudio_stub()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("qwen_tts")
