"""Voice management over HTTP and its use from the native protocol (tiny random Base model)."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import uvicorn
import websockets
from test_voices import REF_TEXT, reference_audio

from engine.scheduler import Engine
from realtime.app import ServerSettings, create_app


def wav_bytes(x: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def base_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    from engine.torch.weights import write_random_checkpoint

    ckpt = write_random_checkpoint(
        tmp_path_factory.mktemp("base-http"), "tiny", "base", seed=2, max_new_tokens=21
    )
    db = tmp_path_factory.mktemp("db") / "voices.sqlite"
    engine = Engine(str(ckpt), device="cpu", voices_db=db)
    app = create_app(ServerSettings(model="tiny-base"), engine=engine)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, ws="websockets-sansio", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"127.0.0.1:{port}", db
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()


def test_register_list_use_delete(base_server: tuple[str, Path]) -> None:
    host, _ = base_server
    with httpx.Client(base_url=f"http://{host}", timeout=120) as http:
        # 44.1 kHz FLAC upload: decoded and resampled on the server
        audio = wav_bytes(
            np.interp(np.arange(88200) / 44100 * 24000, np.arange(48000), reference_audio()), 44100, "FLAC"
        )
        r = http.post(
            "/v1/audio/voices",
            data={"name": "Brand Voice", "ref_text": REF_TEXT},
            files={"audio": ("ref.flac", audio)},
        )
        assert r.status_code == 201, r.text
        voice = r.json()
        assert (
            voice["mode"] == "icl"
            and voice["id"].startswith("v_")
            and voice["ref_seconds"] == pytest.approx(2.0, abs=0.01)
        )
        r = http.post(
            "/v1/audio/voices",
            json={
                "name": "xv",
                "x_vector_only": True,
                "audio_base64": base64.b64encode(wav_bytes(reference_audio(), 24000)).decode(),
            },
        )
        assert r.status_code == 201 and r.json()["mode"] == "xvector"
        listed = http.get("/v1/audio/voices").json()
        assert listed["cloning"] is True and {voice["id"], r.json()["id"]} <= {
            v["id"] for v in listed["data"]
        }
        # OpenAI endpoint with the clone's name
        r = http.post(
            "/v1/audio/speech",
            json={"input": "Brand new voice.", "voice": "Brand Voice", "response_format": "pcm"},
        )
        assert r.status_code == 200 and len(r.content) == 20 * 1920 * 2
        assert http.delete(f"/v1/audio/voices/{voice['id']}").json()["deleted"] is True
        assert http.delete(f"/v1/audio/voices/{voice['id']}").status_code == 404


async def test_native_protocol_uses_registered_voice(base_server: tuple[str, Path]) -> None:
    host, _ = base_server
    async with httpx.AsyncClient(base_url=f"http://{host}", timeout=120) as http:
        r = await http.post(
            "/v1/audio/voices",
            data={"name": "ws-voice", "ref_text": REF_TEXT},
            files={"audio": ("a.wav", wav_bytes(reference_audio(seed=4), 24000))},
        )
        vid = r.json()["id"]
    async with websockets.connect(f"ws://{host}/v1/tts/stream") as ws:
        created = json.loads(await ws.recv())
        assert vid in created["voices"]
        await ws.send(json.dumps({"type": "context.create", "context_id": "c", "voice": vid}))
        await ws.send(
            json.dumps(
                {"type": "text.append", "context_id": "c", "text": "Speaking with a cloned voice now."}
            )
        )
        await ws.send(json.dumps({"type": "text.end", "context_id": "c"}))
        samples = 0
        while True:
            m = await ws.recv()
            if isinstance(m, bytes):
                samples += (len(m) - 16) // 2
                continue
            ev = json.loads(m)
            assert ev["type"] != "error", ev
            if ev["type"] == "context.done":
                break
        assert samples == 20 * 1920
        await ws.send(json.dumps({"type": "context.create", "context_id": "d", "voice": "v_unknown"}))
        err = json.loads(await ws.recv())
        assert err["type"] == "error" and err["code"] == "invalid_voice"


def test_bad_registrations(base_server: tuple[str, Path]) -> None:
    host, _ = base_server
    with httpx.Client(base_url=f"http://{host}", timeout=120) as http:
        before = len(http.get("/v1/audio/voices").json()["data"])
        cases = [
            (
                dict(data={"name": "a", "ref_text": "x"}, files={"audio": ("a.wav", b"RIFF....garbage")}),
                400,
                "audio_unreadable",
            ),
            (
                dict(
                    data={"name": "b", "ref_text": "x"},
                    files={"audio": ("b.wav", wav_bytes(np.zeros(0, np.float32), 24000))},
                ),
                400,
                None,
            ),
            (
                dict(data={"name": "c"}, files={"audio": ("c.wav", wav_bytes(reference_audio(), 24000))}),
                400,
                "invalid_voice",
            ),
            (dict(data={"name": "d", "ref_text": "x"}), 400, "invalid_audio"),
            (dict(json={"name": "e", "audio_base64": "!!notbase64!!"}), 400, "invalid_audio"),
            (dict(content=b"raw", headers={"content-type": "audio/wav"}), 415, None),
        ]
        for kw, status, code in cases:
            r = http.post("/v1/audio/voices", **kw)
            assert r.status_code == status, (kw, r.text)
            if code:
                assert r.json()["error"]["code"] == code, r.text
        r = http.post(
            "/v1/audio/voices",
            data={"name": "dup", "ref_text": "x"},
            files={"audio": ("d.wav", wav_bytes(reference_audio(), 24000))},
        )
        assert r.status_code == 201
        r = http.post(
            "/v1/audio/voices",
            data={"name": "DUP", "ref_text": "x"},
            files={"audio": ("d.wav", wav_bytes(reference_audio(), 24000))},
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "voice_exists"
        assert len(http.get("/v1/audio/voices").json()["data"]) == before + 1


def test_clone_refused_on_custom_voice_model(tiny_ckpt: Path, tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    engine = Engine(str(tiny_ckpt), device="cpu", start=False, voices_db=tmp_path / "v.sqlite")
    with TestClient(create_app(ServerSettings(model="tiny-cv"), engine=engine)) as client:
        r = client.post(
            "/v1/audio/voices",
            data={"name": "x", "ref_text": "x"},
            files={"audio": ("a.wav", wav_bytes(reference_audio(), 24000))},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "voice_clone_unavailable"
        assert "Base model" in r.json()["error"]["message"]
        assert str(tiny_ckpt) not in r.json()["error"]["message"]  # no server paths in client errors
        assert client.get("/v1/audio/voices").json()["cloning"] is False
    engine.close()


# ---- issue 13: hardening of the registration route -------------------------------------------


def _stored_ref_text(db: Path, voice_id: str) -> str | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT ref_text FROM voices WHERE id = ?", (voice_id,)).fetchone()
    return row[0]


def test_ref_text_is_stored_verbatim(base_server: tuple[str, Path]) -> None:
    """Issue 13 item 9: the transcript is part of the official prompt as given; a trailing
    newline (a transcript read from a file) must survive, not be stripped on the way."""
    host, db = base_server
    audio = wav_bytes(reference_audio(seed=5), 24000)
    with httpx.Client(base_url=f"http://{host}", timeout=120) as http:
        r = http.post(
            "/v1/audio/voices",
            data={"name": "verbatim-form", "ref_text": REF_TEXT + "\n"},
            files={"audio": ("a.wav", audio)},
        )
        assert r.status_code == 201, r.text
        assert _stored_ref_text(db, r.json()["id"]) == REF_TEXT + "\n"
        text = "  " + REF_TEXT + " \r\n"
        r = http.post(
            "/v1/audio/voices",
            json={
                "name": "verbatim-json",
                "ref_text": text,
                "audio_base64": base64.b64encode(audio).decode(),
            },
        )
        assert r.status_code == 201, r.text
        assert _stored_ref_text(db, r.json()["id"]) == text
        # blank counts as absent: an ICL voice needs a transcript, an x-vector voice has none
        r = http.post(
            "/v1/audio/voices", data={"name": "blank", "ref_text": " \n"}, files={"audio": ("a.wav", audio)}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_voice", r.text
        r = http.post(
            "/v1/audio/voices",
            data={"name": "blank-xv", "ref_text": " \n", "x_vector_only": "true"},
            files={"audio": ("a.wav", audio)},
        )
        assert r.status_code == 201 and r.json()["mode"] == "xvector"
        assert _stored_ref_text(db, r.json()["id"]) is None


def _json_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, object]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert param is None or err["param"] == param, err
    message = str(err["message"])
    assert " at 0x" not in message and "<_io" not in message and "Error" not in message, message
    return err


def test_audio_errors_are_clear_sentences(base_server: tuple[str, Path]) -> None:
    """Issue 13 item 8: a bad upload answered "cannot decode audio: Error opening
    <_io.BytesIO object at 0x...>: Format not recognised."; and a 1 Hz WAV was accepted."""
    host, _ = base_server
    cases = [
        (b"definitely not audio" * 20, "audio_unreadable", "could not decode the audio"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "audio_unreadable", "could not decode the audio"),
        (wav_bytes(np.zeros(16), 1), "audio_bad_sample_rate", "8000-384000 Hz"),
        (wav_bytes(np.zeros((24000, 9), np.float32), 24000), "audio_bad_format", "9 channels"),
        (wav_bytes(np.zeros(61 * 8000, np.float32), 8000), "audio_too_long", "at most 60 s"),
    ]
    with httpx.Client(base_url=f"http://{host}", timeout=120) as http:
        for audio, code, message in cases:
            r = http.post(
                "/v1/audio/voices", data={"name": "bad", "ref_text": "x"}, files={"audio": ("a.wav", audio)}
            )
            err = _json_error(r, 400, "audio")
            assert err["code"] == code and message in str(err["message"]), err


def test_registration_fields_are_checked(base_server: tuple[str, Path]) -> None:
    host, _ = base_server
    b64 = base64.b64encode(wav_bytes(reference_audio(), 24000)).decode()
    ok = {"name": "checked", "audio_base64": b64, "x_vector_only": True}
    json_cases: list[tuple[dict[str, object], int, str | None]] = [
        ({**ok, "name": 5}, 400, "name"),
        ({**ok, "name": ["a"]}, 400, "name"),
        ({**ok, "name": "n" * 257}, 400, "name"),
        ({**ok, "ref_text": []}, 400, "ref_text"),
        ({**ok, "ref_text": "x" * (4 * 1024 + 1)}, 400, "ref_text"),
        ({**ok, "x_vector_only": "maybe"}, 400, "x_vector_only"),
        ({**ok, "x_vector_only": {}}, 400, "x_vector_only"),
        ({**ok, "audio_base64": 5}, 400, "audio_base64"),
        ({**ok, "audio_base64": "!!"}, 400, "audio_base64"),
    ]
    with httpx.Client(base_url=f"http://{host}", timeout=120) as http:
        before = len(http.get("/v1/audio/voices").json()["data"])
        for body, status, param in json_cases:
            _json_error(http.post("/v1/audio/voices", json=body), status, param)
        for field in ("name", "ref_text"):  # lone surrogates (a JSON "\udc00" escape)
            raw = json.dumps({**ok, field: "ab"}).replace('"ab"', '"a\\udc00"').encode()
            r = http.post("/v1/audio/voices", content=raw, headers={"content-type": "application/json"})
            assert _json_error(r, 400, field)["code"] == "invalid_text"
        # JSON sent as text/plain is not parsed (a cross-origin form could send it)
        r = http.post("/v1/audio/voices", content=json.dumps(ok), headers={"content-type": "text/plain"})
        _json_error(r, 415)
        # multipart: a form with two files, a text 'audio' field, a broken body
        audio = wav_bytes(reference_audio(), 24000)
        two = {"audio": ("a.wav", audio), "other": ("b.wav", audio)}
        _json_error(http.post("/v1/audio/voices", data={"name": "m", "x_vector_only": "1"}, files=two), 400)
        r = http.post("/v1/audio/voices", data={"name": "m", "audio": "not a file", "x_vector_only": "1"})
        _json_error(r, 400, "audio")
        r = http.post(
            "/v1/audio/voices",
            content=b"--xx\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n--xx--\r\n",
            headers={"content-type": "multipart/form-data; boundary=xx"},
        )
        _json_error(r, 400)
        r = http.post(
            "/v1/audio/voices", content=b"--xx\r\n", headers={"content-type": "multipart/form-data"}
        )
        _json_error(r, 400)
        assert len(http.get("/v1/audio/voices").json()["data"]) == before
        r = http.post("/v1/audio/voices", json=ok)
        assert r.status_code == 201, r.text


def test_upload_over_the_limit_is_413_without_content_length(base_server: tuple[str, Path]) -> None:
    from realtime.voices_api import MAX_FORM_BODY_BYTES

    host, _ = base_server

    def chunked() -> Iterator[bytes]:  # no Content-Length: the body is counted as it arrives
        yield b'--xx\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'
        block = b"\x00" * (1 << 20)
        for _ in range(MAX_FORM_BODY_BYTES // len(block) + 2):
            yield block
        yield b"\r\n--xx--\r\n"

    with httpx.Client(base_url=f"http://{host}", timeout=120) as http:
        r = http.post(
            "/v1/audio/voices",
            content=chunked(),
            headers={"content-type": "multipart/form-data; boundary=xx"},
        )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
