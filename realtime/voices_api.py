"""`/v1/audio/voices`: list presets and cloned voices, register a clone, delete one.

Registration takes reference audio (any format libsndfile reads, any rate) plus, for ICL
cloning, its transcript; as multipart form data (`name`, `audio` file, `ref_text`,
`x_vector_only`) or JSON (`name`, `audio_base64`, `ref_text`, `x_vector_only`). The audio work
runs in a thread so the event loop keeps serving sessions.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from engine.scheduler import Engine, VoiceError
from engine.torch.speaker import AudioError
from engine.voices import VoiceStoreError
from realtime.compat.openai import OPENAI_VOICES, error

MAX_UPLOAD_BYTES = 32 * 1024 * 1024


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


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("1", "true", "yes", "on")


async def create_voice(request: Request, engine: Engine) -> Response:
    size = int(request.headers.get("content-length") or 0)
    if size > MAX_UPLOAD_BYTES:
        return error(413, f"upload is {size} bytes; the limit is {MAX_UPLOAD_BYTES}", code="too_large")
    ctype = request.headers.get("content-type", "")
    fields: dict[str, Any]
    audio: bytes | None = None
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form(max_files=1, max_fields=16)
        fields = {k: v for k, v in form.items() if not isinstance(v, UploadFile)}
        upload = form.get("audio")
        if isinstance(upload, UploadFile):
            audio = await upload.read(MAX_UPLOAD_BYTES + 1)
    elif ctype.startswith("application/json"):
        try:
            fields = await request.json()
        except ValueError:
            return error(400, "the request body must be JSON")
        if not isinstance(fields, dict):
            return error(400, "the request body must be a JSON object")
        b64 = fields.get("audio_base64")
        if isinstance(b64, str):
            try:
                audio = base64.b64decode(b64.split(",", 1)[-1], validate=True)
            except (binascii.Error, ValueError):
                return error(
                    400, "audio_base64 is not valid base64", param="audio_base64", code="invalid_audio"
                )
    else:
        return error(415, "send multipart/form-data (audio file) or JSON (audio_base64)")
    name = fields.get("name")
    if not isinstance(name, str) or not name.strip():
        return error(400, "'name' is required", param="name")
    if not audio:
        return error(
            400,
            "reference audio is required (an 'audio' file or 'audio_base64')",
            param="audio",
            code="invalid_audio",
        )
    if len(audio) > MAX_UPLOAD_BYTES:
        return error(413, f"audio is larger than {MAX_UPLOAD_BYTES} bytes", code="too_large")
    ref_text = fields.get("ref_text") or fields.get("transcript")
    if ref_text is not None and not isinstance(ref_text, str):
        return error(400, "'ref_text' must be a string", param="ref_text")
    try:
        voice = await asyncio.to_thread(
            engine.create_voice,
            name.strip(),
            audio,
            ref_text=ref_text,
            x_vector_only=_flag(fields.get("x_vector_only", False)),
        )
    except AudioError as e:
        return error(400, str(e), param="audio", code=f"audio_{e.code}")
    except VoiceStoreError as e:
        status = 409 if "already exists" in str(e) else 400
        return error(status, str(e), param="name", code="voice_exists" if status == 409 else "invalid_name")
    except VoiceError as e:
        return error(
            400, str(e), code="voice_clone_unavailable" if "Base model" in str(e) else "invalid_voice"
        )
    return JSONResponse(voice.describe(), status_code=201)


async def delete_voice(request: Request, engine: Engine) -> Response:
    key = request.path_params["voice_id"]
    if key in engine.cfg.talker.spk_id:
        return error(400, f"{key!r} is a preset voice of the model; only cloned voices can be deleted")
    if not engine.delete_voice(key):
        return error(404, f"no cloned voice {key!r}", code="voice_not_found")
    return JSONResponse({"id": key, "deleted": True})
