"""The official `qwen-tts==0.1.1` package as a test oracle (skipped when it is not installed,
except in CI: with CI=true a missing oracle fails the run instead of silently skipping ~75
parity tests)."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from engine.official import OfficialUnavailable, import_official


def qwen_tts() -> ModuleType:
    """The official package, or a pytest skip when it is not installed."""
    try:
        return import_official()
    except OfficialUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the official package is required in CI (CI=true): {e}")
        pytest.skip(str(e))
