"""`python -m engine` on each backend gives the official package's audio; the MLX path runs
without torch on a checkpoint directory (cloning included)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello there. This sentence is streamed word by word."


@pytest.mark.parametrize("stream_text", [False, True], ids=["whole", "streamed"])
def test_cli_greedy_gives_official_audio(
    tiny_ckpt: Path, official_tiny: Any, backend: str, stream_text: bool, tmp_path: Path
) -> None:
    out = tmp_path / "out.wav"
    cmd = [
        sys.executable, "-m", "engine", "--backend", backend, "--precision", "fp32", "--model", str(tiny_ckpt),
        "--voice", "ryan", "--language", "english", "--text", TEXT, "--temperature", "0", "--max-frames", "40",
        "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    if stream_text:
        cmd += ["--stream-text", "--word-delay-ms", "5"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"engine: {backend} on cpu, precision fp32" in run.stderr
    audio, rate = sf.read(out, dtype="float32")
    from engine.text import TextTokenizer

    tok = TextTokenizer.from_dir(tiny_ckpt)
    template = torch.tensor([[151644, 77091, 198, *tok.encode(TEXT), 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        codes = official_tiny.model.generate(
            input_ids=[template], languages=["english"], speakers=["ryan"], non_streaming_mode=False,
            do_sample=False, subtalker_dosample=False, max_new_tokens=41,
        )[0][0]  # fmt: skip
        ref = official_tiny.model.speech_tokenizer.decode([{"audio_codes": codes}])[0][0]
    assert rate == 24000 and audio.shape == ref.shape
    np.testing.assert_allclose(audio, ref, atol=2e-4, rtol=0)


def test_mlx_path_runs_without_torch(tmp_path: Path) -> None:
    """Load a checkpoint directory, speak, clone a voice and speak with it on MLX: torch is
    never imported (the checkpoint is written by the torch tooling in a separate process)."""
    pytest.importorskip("mlx.core")
    ckpt = tmp_path / "ckpt"
    subprocess.run(
        [sys.executable, "-c", "import sys; from engine.torch.weights import write_random_checkpoint as w; "
         "w(sys.argv[1], 'tiny', 'base', seed=0, max_new_tokens=41)", str(ckpt)],
        cwd=ROOT, check=True, timeout=300,
    )  # fmt: skip
    code = f"""
import sys
import numpy as np
from engine import Engine
e = Engine({str(ckpt)!r}, backend="mlx", max_streams=2, voices_db={str(tmp_path / "v.sqlite")!r})
a = e.synthesize("Hello there.", max_frames=6, seed=1)
wav = (np.random.default_rng(0).standard_normal(48000) * 0.1).astype(np.float32)
v = e.create_voice("x", wav, sample_rate=24000, ref_text="hello world")
s = e.open_stream(voice=v.id, max_frames=6, seed=1)
s.push_text("Hi there.")
s.end()
b = s.read_all()
e.close()
assert len(a) == len(b) == 6 * 1920, (len(a), len(b))
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout
