"""The engine's public door: everything a transport (realtime/, clients/) uses comes from here.

    from engine import Engine
    with Engine("random:tiny") as eng, eng.open_stream(voice="ryan") as s:
        s.push_text("Hello"); s.end()
        audio = s.read_all()

Importing this package loads no tensor library; the backend (torch or mlx) is loaded by `Engine`.
"""

from engine.audio import AudioError
from engine.backend import BACKENDS, BackendError, ResolvedVoice, default_backend
from engine.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from engine.config import ConfigError
from engine.errors import EngineError, OverloadedError, VoiceError
from engine.prompt import PromptError
from engine.sampling import SamplingError, SamplingParams, check_sampling
from engine.scheduler import Engine
from engine.stream import (
    AudioChunk,
    InvalidTextError,
    Marker,
    State,
    Stream,
    StreamClosedError,
    StreamError,
    StreamMetrics,
    check_text,
)
from engine.voices import ClonedVoice, VoiceStoreError

__all__ = [
    "BACKENDS",
    "AudioChunk",
    "AudioError",
    "BackendError",
    "Checkpoint",
    "CheckpointError",
    "ClonedVoice",
    "ConfigError",
    "Engine",
    "EngineError",
    "InvalidTextError",
    "Marker",
    "OverloadedError",
    "PromptError",
    "ResolvedVoice",
    "SamplingError",
    "SamplingParams",
    "State",
    "Stream",
    "StreamClosedError",
    "StreamError",
    "StreamMetrics",
    "VoiceError",
    "VoiceStoreError",
    "check_sampling",
    "check_text",
    "default_backend",
    "load_checkpoint",
]
