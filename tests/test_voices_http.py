"""Voice management over HTTP and its use from the native protocol (tiny random Base model)."""

from __future__ import annotations

import io
import json
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
                "audio_base64": __import__("base64").b64encode(wav_bytes(reference_audio(), 24000)).decode(),
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
        assert client.get("/v1/audio/voices").json()["cloning"] is False
    engine.close()
