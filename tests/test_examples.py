"""The examples run end to end against a server on 127.0.0.1 (tiny random model)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf
import uvicorn

from engine.scheduler import Engine
from realtime.app import ServerSettings, create_app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from engine.torch.weights import write_random_checkpoint

    ckpt = write_random_checkpoint(tmp_path_factory.mktemp("ex"), "tiny", "custom_voice", max_new_tokens=41)
    engine = Engine(str(ckpt), device="cpu")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(ServerSettings(), engine=engine),
            host="127.0.0.1",
            port=0,
            ws="websockets-sansio",
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()


def run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_llm_to_speech_and_barge_in(url: str, tmp_path: Path) -> None:
    full = tmp_path / "full.wav"
    out = run(
        "examples/llm_to_speech/run.py",
        "--url",
        f"ws://{url}/v1/tts/stream",
        "--out",
        str(full),
        "--tokens-per-second",
        "200",
    )
    assert "DoneEvent" in out and "first audio" in out
    assert sf.info(full).frames == 40 * 1920
    cut = tmp_path / "cut.wav"
    out = run(
        "examples/llm_to_speech/run.py",
        "--url",
        f"ws://{url}/v1/tts/stream",
        "--out",
        str(cut),
        "--barge-in-after",
        "0.5",
    )
    assert "CancelledEvent" in out
    assert 0 < sf.info(cut).frames < 40 * 1920


def test_openai_client_example(url: str, tmp_path: Path) -> None:
    out_file = tmp_path / "speech.wav"
    run("examples/openai_client/run.py", "--base-url", f"http://{url}/v1", "--out", str(out_file))
    assert sf.info(out_file).frames == 40 * 1920
