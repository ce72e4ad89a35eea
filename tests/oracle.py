"""The official `qwen-tts==0.1.1` package as a test oracle (skipped when it is not installed)."""

from __future__ import annotations

from types import ModuleType

import pytest

from engine.official import OfficialUnavailable, import_official


def qwen_tts() -> ModuleType:
    """The official package, or a pytest skip when it is not installed."""
    try:
        return import_official()
    except OfficialUnavailable as e:
        pytest.skip(str(e))
