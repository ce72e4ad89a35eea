"""Import the official `qwen-tts==0.1.1` package (a dev-time oracle) on a CPU-only torch.

Used by the parity tests and by `python -m engine bench` to measure the official code on the
same weights. `import qwen_tts` eagerly imports torchaudio, which it only needs for the 25 Hz
tokenizer; PyPI's torchaudio is a CUDA build that fails next to a CPU torch, so a stub module
stands in for it (MODEL.md §8). The product itself never imports qwen_tts or transformers.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from types import ModuleType


class OfficialUnavailable(ImportError):
    pass


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
    try:
        import torchaudio  # noqa: F401  # a working torchaudio needs no stub

        return
    except Exception:
        sys.modules.pop("torchaudio", None)
    ta, comp, kaldi = (
        _stub("torchaudio"),
        _stub("torchaudio.compliance"),
        _stub("torchaudio.compliance.kaldi"),
    )
    ta.compliance = comp  # type: ignore[attr-defined]
    comp.kaldi = kaldi  # type: ignore[attr-defined]


def import_official() -> ModuleType:
    """The official package, or OfficialUnavailable with the install hint."""
    if importlib.util.find_spec("qwen_tts") is None:
        raise OfficialUnavailable(
            "the official qwen-tts package is not installed: `make setup` installs it "
            "(pip install --no-deps qwen-tts==0.1.1 plus transformers==4.57.3 ...)"
        )
    _install_torchaudio_stub()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("qwen_tts")
