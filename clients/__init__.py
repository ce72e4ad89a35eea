"""Clients of the streaming TTS server: an asyncio library, the ``say`` CLI and a load generator.

``clients.client`` speaks the native protocol (``tts.v1``); ``python -m clients say`` streams text
word by word like an LLM and writes a WAV; ``clients.load`` (``python -m realtime bench``) runs
many such sessions at once and reports latency percentiles.
"""

from clients.client import (
    AudioChunk,
    AuthenticationError,
    CancelledEvent,
    ClientError,
    ConnectError,
    ConnectionLost,
    ContextHandle,
    ContextItem,
    ContextResult,
    ContextStateError,
    DoneEvent,
    ErrorEvent,
    FlushedEvent,
    MarkEvent,
    Metrics,
    ProtocolViolation,
    ServerError,
    SessionInfo,
    TTSClient,
    config_message,
)

__all__ = [
    "AudioChunk",
    "AuthenticationError",
    "CancelledEvent",
    "ClientError",
    "ConnectError",
    "ConnectionLost",
    "ContextHandle",
    "ContextItem",
    "ContextResult",
    "ContextStateError",
    "DoneEvent",
    "ErrorEvent",
    "FlushedEvent",
    "MarkEvent",
    "Metrics",
    "ProtocolViolation",
    "ServerError",
    "SessionInfo",
    "TTSClient",
    "config_message",
]
