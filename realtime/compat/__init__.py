"""Compatibility dialects of other TTS APIs, mapped onto the engine's stream API."""
