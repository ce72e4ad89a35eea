"""OpenAI-compatible `POST /v1/audio/speech` and `GET /v1/audio/voices`.

The official `openai` client works against it with `base_url`: audio is streamed as it is
generated (raw 24 kHz s16le for `pcm`, a WAV with an open-ended header for `wav`, mp3/opus/flac
through libsndfile), or as server-sent events with `stream_format: "sse"`. OpenAI voice names
are aliases of the model's preset voices.

Bad input is a 4xx with an OpenAI-style error body naming the field (`param`), never a 500:
the body must be `Content-Type: application/json` (415 otherwise), at most
`Limits.max_message_bytes` (413), valid UTF-8 JSON without NaN/Infinity and not absurdly deep
(400). Strings share the WebSocket's limits (`realtime.protocol.Limits`): `input` at most
`max_text_bytes_per_context` UTF-8 bytes, `instructions` `max_instructions_bytes`, names
(`voice`, `language`, `model`) `max_name_chars`; text that is not valid Unicode (a lone
surrogate from a `\\ud800` escape) is refused before any engine work.

The engine stream a request opens is owned by `SpeechResponse`: it is opened when the response
is sent and released by one `with stream:` on every way out (done, error, client gone, body
never iterated), so a failing request cannot leak an engine row.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from engine import (
    AudioChunk,
    Engine,
    EngineError,
    InvalidTextError,
    OverloadedError,
    PromptError,
    Stream,
    VoiceError,
    check_text,
)
from realtime.audio import ContainerEncoder, encode_pcm, wav_header
from realtime.protocol import DEFAULT_LIMITS, Limits

log = logging.getLogger(__name__)

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
SPEED_MIN, SPEED_MAX = 0.25, 4.0


def error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


class HTTPError(Exception):
    """A client error: raised while reading a request, answered with `error(...)` by the handler.
    The message is written for the client (never the text of an internal exception)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        return error(self.status, self.message, param=self.param, code=self.code)


# ---- request bodies (shared with voices_api) ---------------------------------------------------


def require_json(request: Request) -> None:
    """JSON routes take `application/json` only. A browser can POST `text/plain` to any origin
    without a CORS preflight, so parsing such a body as JSON would let any web page drive us."""
    if media_type(request) != "application/json":
        raise HTTPError(
            415,
            "send the request body as JSON with 'Content-Type: application/json'",
            code="unsupported_media_type",
        )


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def limit_body(request: Request, limit: int) -> Request:
    """The same request, whose body fails with 413 past `limit` bytes: a declared
    Content-Length is checked up front, a chunked body as it arrives (nothing is buffered
    beyond the limit)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise HTTPError(400, "invalid Content-Length header")
        if int(declared) > limit:
            _too_large(limit)
    seen = 0

    async def receive() -> Message:
        nonlocal seen
        message = await request.receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                _too_large(limit)
        return message

    return Request(request.scope, receive)


def _too_large(limit: int) -> NoReturn:
    raise HTTPError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


async def read_json_object(request: Request, limit: int) -> dict[str, Any]:
    """Content-Type checked, size bounded, parsed: the body as a dict, or an HTTPError."""
    require_json(request)
    try:
        raw = await limit_body(request, limit).body()
    except ClientDisconnect:
        raise HTTPError(400, "the client disconnected while sending the body") from None
    return parse_json_object(raw)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError covers syntax errors, NaN/Infinity and over-long integer literals;
        # RecursionError a body nested deeper than the parser's stack (e.g. 100k '[').
        raise HTTPError(
            400, "the request body must be valid JSON (UTF-8, no NaN or Infinity)", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def text_field(
    body: dict[str, Any],
    key: str,
    *,
    max_bytes: int | None = None,
    max_chars: int | None = None,
    required: bool = False,
    value: Any = None,
) -> str | None:
    """`body[key]` (or `value` when given) as valid Unicode of at most `max_bytes` UTF-8 bytes
    or `max_chars` characters; None when absent or null. Every failure is a 400 naming the field."""
    if value is None:
        value = body.get(key)
    if value is None:
        if required:
            raise HTTPError(400, f"'{key}' is required", param=key, code="missing_required_parameter")
        return None
    if not isinstance(value, str):
        raise HTTPError(400, f"'{key}' must be a string", param=key, code="invalid_type")
    try:
        check_text(value)
    except InvalidTextError:
        raise HTTPError(
            400,
            f"'{key}' is not valid Unicode (it contains an unpaired surrogate)",
            param=key,
            code="invalid_text",
        ) from None
    if max_chars is not None and len(value) > max_chars:
        _too_long(key, f"{len(value)} characters long; at most {max_chars} are accepted")
    if max_bytes is not None and (size := len(value.encode("utf-8"))) > max_bytes:
        _too_long(key, f"{size} bytes of UTF-8; at most {max_bytes} are accepted")
    return value


def _too_long(key: str, what: str) -> NoReturn:
    raise HTTPError(400, f"'{key}' is {what}", param=key, code="string_above_max_length")


# ---- POST /v1/audio/speech ---------------------------------------------------------------------


@dataclass(frozen=True)
class SpeechRequest:
    text: str
    voice: str | None
    language: str
    instructions: str | None
    fmt: str  # a key of FORMATS
    sse: bool


def parse_speech(body: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> SpeechRequest:
    """Validate every field the route reads; wrong types and values are 400s naming the field."""
    names = limits.max_name_chars
    text_field(body, "model", max_chars=names)  # any model name is served by this model
    text = text_field(body, "input", max_bytes=limits.max_text_bytes_per_context, required=True)
    if not text or not text.strip():
        raise HTTPError(400, "'input' must be a non-empty string", param="input")
    voice = body.get("voice")
    if isinstance(voice, dict):  # the API's custom voice object: {"id": "voice_1234"}
        voice = voice.get("id")
        if not isinstance(voice, str):
            raise HTTPError(400, "'voice' must be a string, or an object with a string 'id'", param="voice")
    voice = text_field(body, "voice", max_chars=names, value=voice)
    instructions = text_field(body, "instructions", max_bytes=limits.max_instructions_bytes)
    language = text_field(body, "language", max_chars=names) or "auto"
    fmt = body.get("response_format", "mp3")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise HTTPError(
            400, f"'response_format' must be one of {', '.join(FORMATS)}", param="response_format"
        )
    stream_format = body.get("stream_format", "audio")
    if not isinstance(stream_format, str) or stream_format not in ("audio", "sse"):
        raise HTTPError(400, "'stream_format' must be 'audio' or 'sse'", param="stream_format")
    sse = stream_format == "sse"
    if sse and fmt not in ("pcm", "wav"):
        fmt = "pcm"  # SSE deltas carry raw PCM
    speed = body.get("speed", 1.0)
    if not isinstance(speed, int | float) or isinstance(speed, bool) or not SPEED_MIN <= speed <= SPEED_MAX:
        raise HTTPError(400, f"'speed' must be a number between {SPEED_MIN} and {SPEED_MAX}", param="speed")
    if abs(float(speed) - 1.0) > 1e-6:
        raise HTTPError(400, "'speed' other than 1.0 is not supported by this model", param="speed")
    return SpeechRequest(text, voice or None, language, instructions, fmt, sse)


def alias_resolver(engine: Engine) -> Callable[[str], str]:
    """Map an OpenAI voice name to a preset voice when the model has that preset."""

    def resolve(name: str) -> str:
        key = name.strip().lower()
        if key in engine.cfg.talker.spk_id:
            return name
        target = OPENAI_VOICES.get(key)
        return target if target is not None and target in engine.cfg.talker.spk_id else name

    return resolve


async def speech(
    request: Request, engine: Engine, model_name: str, limits: Limits = DEFAULT_LIMITS
) -> Response:
    try:
        req = parse_speech(await read_json_object(request, limits.max_message_bytes), limits)
    except HTTPError as e:
        return e.response()
    return SpeechResponse(engine, req)


def open_speech_stream(engine: Engine, req: SpeechRequest) -> Stream:
    """Open the engine stream; the engine's refusals become client errors."""
    try:
        return engine.open_stream(
            voice=alias_resolver(engine)(req.voice) if req.voice else None,
            language=req.language,
            instructions=req.instructions,
        )
    except VoiceError as e:
        raise HTTPError(400, str(e), param="voice", code="invalid_voice") from None
    except PromptError as e:
        raise HTTPError(400, str(e), param="language", code="invalid_language") from None
    except OverloadedError as e:
        raise HTTPError(429, str(e), code="overloaded") from None
    except EngineError as e:
        raise HTTPError(400, str(e)) from None


class SpeechResponse(Response):
    """Owns the request's engine stream for its whole life.

    The stream is opened only when the response is sent and `with stream:` around everything
    after releases it on every way out: audio done, an exception before or while streaming, the
    client disconnecting (Starlette cancels the body on `http.disconnect`), or the body never
    being iterated. The handler only returns this object, so no engine work happens before
    the server is ready to send (a failed validation never opens a stream).
    """

    def __init__(self, engine: Engine, req: SpeechRequest):
        super().__init__(media_type=FORMATS[req.fmt] if not req.sse else "text/event-stream")
        self.engine = engine
        self.req = req

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            stream = open_speech_stream(self.engine, self.req)
        except HTTPError as e:
            await e.response()(scope, receive, send)
            return
        sent = _StartTracker(send)
        with stream:  # the one place that releases the engine stream
            try:
                await self._stream(stream, scope, receive, sent)
            except ClientDisconnect:
                return  # the client is gone: nothing to answer, the stream is released
            except Exception:
                if sent.started:
                    raise  # mid-body: the server cuts the connection, the client sees it truncated
                log.exception("speech request failed before its response started")
                await error(500, "internal error while generating speech", code="internal")(
                    scope, receive, send
                )

    async def _stream(self, stream: Stream, scope: Scope, receive: Receive, send: Send) -> None:
        stream.push_text(self.req.text)
        stream.end()
        body = self._sse_body(stream) if self.req.sse else self._audio_body(stream)
        headers = {"X-Sample-Rate": str(self.engine.sample_rate)}
        try:
            await StreamingResponse(body, media_type=self.media_type, headers=headers)(scope, receive, send)
        finally:
            await body.aclose()  # a generator cancelled at a `yield` is not closed by the cancel

    async def _audio_body(self, stream: Stream) -> AsyncGenerator[bytes, None]:
        fmt, rate = self.req.fmt, self.engine.sample_rate
        if fmt in ("pcm", "wav"):
            if fmt == "wav":
                yield wav_header(rate, "pcm_s16le")
            async for c in _audio(stream):
                if c.frames:
                    yield encode_pcm(c.samples, "pcm_s16le")
            return
        enc = ContainerEncoder(fmt, rate)
        async for c in _audio(stream):
            data = enc.encode(c.samples)
            if data:
                yield data
        yield enc.close()

    async def _sse_body(self, stream: Stream) -> AsyncGenerator[bytes, None]:
        samples = 0
        async for c in _audio(stream):
            if c.frames:
                samples += len(c.samples)
                delta = base64.b64encode(encode_pcm(c.samples, "pcm_s16le")).decode()
                yield _sse({"type": "speech.audio.delta", "audio": delta})
        tokens = len(self.engine.tokenizer.encode(self.req.text))
        frames = samples // self.engine.samples_per_frame
        usage = {"input_tokens": tokens, "output_tokens": frames, "total_tokens": tokens + frames}
        yield _sse({"type": "speech.audio.done", "usage": usage})


async def _audio(stream: Stream) -> AsyncIterator[AudioChunk]:
    async for item in stream:
        if isinstance(item, AudioChunk):
            yield item


class _StartTracker:
    """An ASGI `send` that remembers whether the response has started (after that, an error
    can only cut the connection; before it, the client still gets a JSON error)."""

    def __init__(self, send: Send):
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def _sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()
