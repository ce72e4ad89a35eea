"""`/v1/audio/voices`: list presets and cloned voices, register a clone, delete one.

Registration takes reference audio (any format libsndfile reads, at 8-384 kHz) plus, for ICL
cloning, its transcript; as multipart form data (`name`, `audio` file, `ref_text`,
`x_vector_only`) or JSON (`name`, `audio_base64`, `ref_text`, `x_vector_only`). The audio work
runs in a thread so the event loop keeps serving sessions.

Limits: the audio at most `MAX_UPLOAD_BYTES` encoded (and 60 s decoded, checked from the
file's header before decoding); `ref_text` at most `MAX_REF_TEXT_BYTES` UTF-8 bytes, which
covers a transcript of the longest accepted reference (60 s of fast speech in any script)
and stays well under the text a WebSocket context may send; `name` at most the protocol's
`max_name_chars`. The transcript is stored exactly as sent (a trailing newline is part of
the official model's prompt too); one that is empty or only whitespace counts as absent.
Errors never echo exception text or object reprs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from engine import AudioError, Engine, VoiceError, VoiceStoreError
from realtime.compat.openai import (
    OPENAI_VOICES,
    HTTPError,
    error,
    limit_body,
    media_type,
    parse_json_object,
    text_field,
)
from realtime.protocol import DEFAULT_LIMITS

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 32 * 1024 * 1024
MAX_REF_TEXT_BYTES = 4 * 1024
MAX_NAME_CHARS = DEFAULT_LIMITS.max_name_chars
# The body around the audio: form fields, multipart boundaries, JSON keys.
_ENVELOPE_BYTES = 64 * 1024
MAX_FORM_BODY_BYTES = MAX_UPLOAD_BYTES + _ENVELOPE_BYTES
MAX_JSON_BODY_BYTES = (MAX_UPLOAD_BYTES + 2) // 3 * 4 + _ENVELOPE_BYTES  # base64 of the audio
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def list_voices(engine: Engine) -> dict[str, Any]:
    voices = engine.describe_voices()
    for v in voices:
        if v["type"] == "preset":
            v["aliases"] = sorted(a for a, target in OPENAI_VOICES.items() if target == v["id"])
    return {
        "object": "list",
        "data": voices,
        "model_type": engine.model_type,
        "cloning": engine.model_type == "base" and engine.voice_store is not None,
    }


async def create_voice(request: Request, engine: Engine) -> Response:
    try:
        fields, audio = await _read_registration(request)
        name, ref_text, x_vector_only = _check_fields(fields)
    except HTTPError as e:
        return e.response()
    if not audio:
        return error(
            400,
            "reference audio is required (an 'audio' file or 'audio_base64')",
            param="audio",
            code="invalid_audio",
        )
    if len(audio) > MAX_UPLOAD_BYTES:
        return error(413, f"audio is larger than {MAX_UPLOAD_BYTES} bytes", code="too_large")
    try:
        voice = await asyncio.to_thread(
            engine.create_voice, name, audio, ref_text=ref_text, x_vector_only=x_vector_only
        )
    except AudioError as e:  # messages describe the caller's audio only (see AudioError)
        return error(400, str(e), param="audio", code=f"audio_{e.code}")
    except VoiceStoreError as e:
        status = 409 if "already exists" in str(e) else 400
        return error(status, str(e), param="name", code="voice_exists" if status == 409 else "invalid_name")
    except VoiceError as e:
        if "Base model" in str(e):  # the engine's text names the checkpoint's path on this host
            return error(
                400,
                f"voice cloning needs a Base model (Qwen3-TTS-12Hz-*-Base); this is a {engine.model_type} model",
                code="voice_clone_unavailable",
            )
        return error(400, str(e), code="invalid_voice")
    except Exception:
        log.exception("voice registration failed")
        return error(500, "internal error while registering the voice", code="internal")
    return JSONResponse(voice.describe(), status_code=201)


async def _read_registration(request: Request) -> tuple[dict[str, Any], bytes | None]:
    """The form or JSON fields and the encoded audio, each body bounded by its limit."""
    ctype = media_type(request)
    try:
        if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return await _read_form(limit_body(request, MAX_FORM_BODY_BYTES))
        if ctype == "application/json":
            return _read_json(await limit_body(request, MAX_JSON_BODY_BYTES).body())
    except ClientDisconnect:
        raise HTTPError(400, "the client disconnected while sending the body") from None
    raise HTTPError(
        415,
        "send multipart/form-data (an 'audio' file) or JSON (audio_base64)",
        code="unsupported_media_type",
    )


async def _read_form(request: Request) -> tuple[dict[str, Any], bytes | None]:
    try:
        form: FormData = await request.form(max_files=1, max_fields=16)
    except (HTTPException, MultiPartException):  # Starlette's message names the form's flaw
        raise HTTPError(
            400, "malformed form data (at most one file and 16 fields)", code="invalid_form"
        ) from None
    try:
        fields = {k: v for k, v in form.items() if not isinstance(v, UploadFile)}
        upload = form.get("audio")
        if upload is not None and not isinstance(upload, UploadFile):
            raise HTTPError(400, "'audio' must be a file part", param="audio", code="invalid_audio")
        audio = await upload.read(MAX_UPLOAD_BYTES + 1) if upload is not None else None
    finally:
        await form.close()
    return fields, audio


def _read_json(raw: bytes) -> tuple[dict[str, Any], bytes | None]:
    fields = parse_json_object(raw)
    b64 = fields.get("audio_base64")
    if b64 is None:
        return fields, None
    if not isinstance(b64, str):
        raise HTTPError(400, "'audio_base64' must be a string", param="audio_base64", code="invalid_audio")
    try:  # a data URL ("data:audio/wav;base64,...") or bare base64
        return fields, base64.b64decode(b64.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(
            400, "'audio_base64' is not valid base64", param="audio_base64", code="invalid_audio"
        ) from None


def _check_fields(fields: dict[str, Any]) -> tuple[str, str | None, bool]:
    """name, ref_text (verbatim; None when absent or blank), x_vector_only."""
    name = text_field(fields, "name", max_chars=MAX_NAME_CHARS)
    if name is None or not name.strip():
        raise HTTPError(400, "'name' is required", param="name", code="missing_required_parameter")
    key = "ref_text" if fields.get("ref_text") not in (None, "") else "transcript"
    ref_text = text_field(fields, key, max_bytes=MAX_REF_TEXT_BYTES)
    if ref_text is not None and not ref_text.strip():
        ref_text = None  # blank: no transcript (an x-vector voice, or the "needs ref_text" error)
    return name.strip(), ref_text, _flag(fields.get("x_vector_only"))


def _flag(value: Any) -> bool:
    """A JSON boolean, or a form field's "true"/"false" (and 1/0, yes/no, on/off)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise HTTPError(400, "'x_vector_only' must be true or false", param="x_vector_only")


async def delete_voice(request: Request, engine: Engine) -> Response:
    key = request.path_params["voice_id"]
    if key in engine.cfg.talker.spk_id:
        return error(400, f"'{key}' is a preset voice of the model; only cloned voices can be deleted")
    if not engine.delete_voice(key):
        return error(404, f"no cloned voice '{key}'", code="voice_not_found")
    return JSONResponse({"id": key, "deleted": True})
