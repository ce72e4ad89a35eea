"""The engine's request errors (a transport maps each to its own wire error)."""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base class of the engine's request errors."""


class VoiceError(EngineError, ValueError):
    """Unknown voice, or a voice this model cannot use."""


class OverloadedError(EngineError):
    """Too many open streams: the admission queue is full."""
