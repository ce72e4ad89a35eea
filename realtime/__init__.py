"""The asyncio server: native protocol, audio encoding, sessions and HTTP routes."""
