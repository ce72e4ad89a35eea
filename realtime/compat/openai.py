"""OpenAI-compatible `POST /v1/audio/speech` and `GET /v1/audio/voices`.

The official `openai` client works against it with `base_url`: audio is streamed as it is
generated (raw 24 kHz s16le for `pcm`, a WAV with an open-ended header for `wav`, mp3/opus/flac
through libsndfile), or as server-sent events with `stream_format: "sse"`. OpenAI voice names
are aliases of the model's preset voices.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.prompt import PromptError
from engine.scheduler import Engine, EngineError, OverloadedError, VoiceError
from engine.stream import AudioChunk
from realtime.audio import ContainerEncoder, encode_pcm, wav_header

# OpenAI's voices, each mapped to the nearest preset speaker of Qwen3-TTS CustomVoice.
OPENAI_VOICES: dict[str, str] = {
    "alloy": "serena", "ash": "ryan", "ballad": "uncle_fu", "coral": "vivian", "echo": "aiden",
    "fable": "ryan", "onyx": "uncle_fu", "nova": "serena", "sage": "vivian", "shimmer": "serena",
    "verse": "aiden", "marin": "serena", "cedar": "ryan",
}  # fmt: skip
FORMATS = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "flac": "audio/flac",
}
MAX_INPUT_CHARS = 16384


def error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def alias_resolver(engine: Engine) -> Callable[[str], str]:
    """Map an OpenAI voice name to a preset voice when the model has that preset."""

    def resolve(name: str) -> str:
        key = name.strip().lower()
        if key in engine.cfg.talker.spk_id:
            return name
        target = OPENAI_VOICES.get(key)
        return target if target is not None and target in engine.cfg.talker.spk_id else name

    return resolve


async def speech(request: Request, engine: Engine, model_name: str) -> Response:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error(400, "the request body must be JSON")
    if not isinstance(body, dict):
        return error(400, "the request body must be a JSON object")
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        return error(400, "'input' must be a non-empty string", param="input")
    if len(text) > MAX_INPUT_CHARS:
        return error(400, f"'input' is longer than {MAX_INPUT_CHARS} characters", param="input")
    fmt = body.get("response_format", "mp3")
    if fmt not in FORMATS:
        return error(
            400,
            f"response_format {fmt!r} is not supported; use one of {', '.join(FORMATS)}",
            param="response_format",
        )
    stream_format = body.get("stream_format", "audio")
    if stream_format not in ("audio", "sse"):
        return error(400, "stream_format must be 'audio' or 'sse'", param="stream_format")
    if stream_format == "sse" and fmt not in ("pcm", "wav"):
        fmt = "pcm"  # SSE deltas carry raw PCM
    speed = body.get("speed", 1.0)
    if not isinstance(speed, (int, float)) or isinstance(speed, bool) or not 0.25 <= speed <= 4.0:
        return error(400, "speed must be a number between 0.25 and 4.0", param="speed")
    if abs(float(speed) - 1.0) > 1e-6:
        return error(400, "speed other than 1.0 is not supported by this model", param="speed")
    voice = body.get("voice")
    if voice is not None and not isinstance(voice, str):
        return error(400, "'voice' must be a string", param="voice")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        return error(400, "'instructions' must be a string", param="instructions")
    language = body.get("language", "auto")
    if not isinstance(language, str):
        return error(400, "'language' must be a string", param="language")
    try:
        stream = engine.open_stream(
            voice=alias_resolver(engine)(voice) if voice else None,
            language=language,
            instructions=instructions,
        )
    except VoiceError as e:
        return error(400, str(e), param="voice", code="invalid_voice")
    except PromptError as e:
        return error(400, str(e), param="language", code="invalid_language")
    except OverloadedError as e:
        return error(429, str(e), code="overloaded")
    except EngineError as e:
        return error(400, str(e))
    stream.push_text(text)
    stream.end()
    rate = engine.sample_rate

    async def chunks() -> AsyncIterator[AudioChunk]:
        try:
            async for item in stream:
                if isinstance(item, AudioChunk):
                    yield item
        finally:
            stream.cancel()  # the client went away (or we finished: then this is a no-op)

    async def audio_body() -> AsyncIterator[bytes]:
        if fmt == "pcm":
            async for c in chunks():
                if c.frames:
                    yield encode_pcm(c.samples, "pcm_s16le")
        elif fmt == "wav":
            yield wav_header(rate, "pcm_s16le")
            async for c in chunks():
                if c.frames:
                    yield encode_pcm(c.samples, "pcm_s16le")
        else:
            enc = ContainerEncoder(fmt, rate)
            async for c in chunks():
                data = enc.encode(c.samples)
                if data:
                    yield data
            yield enc.close()

    async def sse_body() -> AsyncIterator[bytes]:
        samples = 0
        async for c in chunks():
            if c.frames:
                samples += len(c.samples)
                delta = base64.b64encode(encode_pcm(c.samples, "pcm_s16le")).decode()
                yield _sse({"type": "speech.audio.delta", "audio": delta})
        tokens = len(engine.tokenizer.encode(text))
        frames = samples // engine.samples_per_frame
        yield _sse(
            {
                "type": "speech.audio.done",
                "usage": {"input_tokens": tokens, "output_tokens": frames, "total_tokens": tokens + frames},
            }
        )

    headers = {"X-Sample-Rate": str(rate)}
    if stream_format == "sse":
        return StreamingResponse(sse_body(), media_type="text/event-stream", headers=headers)
    return StreamingResponse(audio_body(), media_type=FORMATS[fmt], headers=headers)


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()
