"""The demo page (GET /) in headless Chromium against a server on 127.0.0.1 with a tiny model.

Chromium is driven through the Chrome DevTools Protocol on its own WebSocket (no npm packages):
``--remote-debugging-port=0`` makes it write the chosen port to ``DevToolsActivePort`` in the
profile directory; the test attaches to a new page target (flattened session) and uses
``Runtime.evaluate`` to type, click and read the ``window.ttsDemo`` counters the page keeps.
The server requires an API key, so a session only works if the page forwards ``?token=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from clients.load import serve_in_process
from engine.scheduler import Engine
from engine.torch.weights import write_random_checkpoint

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium")
API_KEY = "browser-key"
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required", "--remote-debugging-port=0",
)  # fmt: skip


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    ckpt = write_random_checkpoint(
        tmp_path_factory.mktemp("tiny31"), "tiny", "custom_voice", max_new_tokens=31
    )
    eng = Engine(str(ckpt), device="cpu", max_streams=2)
    yield eng
    eng.close()


class DevTools:
    """A minimal CDP client: one call at a time; events received meanwhile are kept."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        msg: dict[str, Any] = {"id": call_id, "method": method, "params": params}
        if self.session is not None:
            msg["sessionId"] = self.session
        await self.ws.send(json.dumps(msg))
        async with asyncio.timeout(30):
            while True:
                reply = json.loads(await self.ws.recv())
                if reply.get("id") == call_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    result: dict[str, Any] = reply.get("result", {})
                    return result
                self.events.append(reply)

    async def js(self, expression: str) -> Any:
        reply = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in reply:
            raise AssertionError(f"page exception: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Poll until the expression is truthy; its value is returned."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                state = await self.js("JSON.stringify(window.ttsDemo || null)")
                raise AssertionError(
                    f"timed out waiting for {expression!r}; ttsDemo={state}; {self.console()}"
                )
            await asyncio.sleep(0.1)

    def console(self) -> str:
        lines = [
            json.dumps(e["params"])[:300]
            for e in self.events
            if e.get("method") in ("Runtime.exceptionThrown", "Runtime.consoleAPICalled", "Log.entryAdded")
        ]
        return "console: " + (" | ".join(lines) if lines else "(empty)")


@contextlib.asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[DevTools]:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            assert proc.returncode is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        async with websockets.connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as ws:
            yield DevTools(ws)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def open_page(cdp: DevTools, url: str) -> None:
    target = await cdp.call("Target.createTarget", url="about:blank")
    attached = await cdp.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
    cdp.session = attached["sessionId"]
    await cdp.call("Runtime.enable")
    await cdp.call("Log.enable")
    await cdp.call("Page.enable")
    await cdp.call("Page.navigate", url=url)


async def test_demo_page_speaks_and_cancels(engine: Engine, tmp_path: Path) -> None:
    async with serve_in_process(engine, api_key=API_KEY) as ws_url, chromium(tmp_path / "profile") as cdp:
        page = ws_url.replace("ws://", "http://").replace("/v1/tts/stream", "/") + f"?token={API_KEY}"
        await open_page(cdp, page)
        await cdp.wait_for("window.ttsDemo && window.ttsDemo.state === 'ready'", timeout=30)
        voices = await cdp.js("[...document.querySelectorAll('#voice option')].map(o => o.value)")
        assert set(voices) == set(engine.voices)  # filled from session.created
        assert "english" in await cdp.js(
            "[...document.querySelectorAll('#language option')].map(o => o.value)"
        )

        # Speak: type, choose a voice, click; the page streams words and plays the audio.
        await cdp.js(
            "document.getElementById('text').value = 'Hello from the browser test. It streams word by word.';"
            "document.getElementById('rate').value = '25';"
            "document.getElementById('voice').value = 'serena';"
            "document.getElementById('encoding').value = 'pcm_s16le';"
            "document.getElementById('speak').click(); true"
        )
        await cdp.wait_for("['done', 'error', 'closed'].includes(window.ttsDemo.state)")
        demo = await cdp.js("window.ttsDemo")
        assert demo["state"] == "done", (demo, cdp.console())
        assert demo["chunks"] > 0 and demo["samples"] > 0
        assert demo["firstAudioMs"] is not None and demo["firstAudioMs"] > 0
        assert demo["errors"] == 0 and demo["gaps"] == 0 and demo["contexts"] == 1
        # every sample the server generated reached the page: frames * 1920 at 24 kHz
        assert demo["samples"] == demo["serverMetrics"]["frames"] * 1920
        assert demo["audioSeconds"] == pytest.approx(demo["serverMetrics"]["audio_ms"] / 1000, abs=1e-3)
        assert "context.done" in demo["events"]

        # Cancel in the middle of a slowly streamed turn: playback stops, no audio follows.
        await cdp.js(
            "document.getElementById('text').value = 'one two three four five six seven eight nine ten "
            "eleven twelve thirteen fourteen fifteen sixteen';"
            "document.getElementById('rate').value = '4';"
            "document.getElementById('encoding').value = 'pcm_f32le';"
            "document.getElementById('speak').click(); true"
        )
        await cdp.wait_for("window.ttsDemo.state === 'speaking' && window.ttsDemo.chunks > 0")
        await cdp.js("document.getElementById('cancel').click(); true")
        await cdp.wait_for("['cancelled', 'error', 'closed'].includes(window.ttsDemo.state)", timeout=30)
        await asyncio.sleep(0.3)  # time for any stray frame to show up
        demo = await cdp.js("window.ttsDemo")
        assert demo["state"] == "cancelled", (demo, cdp.console())
        assert demo["audioAfterCancelled"] == 0 and demo["playing"] is False
        assert demo["contexts"] == 2 and demo["errors"] == 0
        assert demo["events"][-1] == "context.cancelled"
