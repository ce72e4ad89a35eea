"""`python -m realtime serve | say | bench`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from realtime import protocol as P


def _serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m realtime serve", description="Run the streaming TTS server.")
    p.add_argument(
        "--model", default="Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice", help="directory, hub id or random:<shape>"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--backend", choices=["auto", "torch", "mlx"], default="auto",
        help="tensor library (default: mlx on Apple Silicon, torch elsewhere)",
    )  # fmt: skip
    p.add_argument(
        "--device", default=None, help="torch: cpu|cuda[:N] (default cuda when available); mlx: cpu|gpu"
    )
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16", "int8"], default=None,
        help="fp32 is exact against the official package; auto picks the fastest mode that passes its "
        "quality report on this device and CPU (default: $TTS_PRECISION, else auto)",
    )  # fmt: skip
    p.add_argument(
        "--api-key", default=os.environ.get("TTS_API_KEY"), help="require this bearer token (env TTS_API_KEY)"
    )
    p.add_argument("--max-sessions", type=int, default=64, help="concurrent WebSocket sessions")
    p.add_argument("--max-streams", type=int, default=8, help="streams generating at once (batch rows)")
    p.add_argument("--max-contexts", type=int, default=4, help="open contexts per session")
    p.add_argument(
        "--voices-db",
        default=os.environ.get("TTS_VOICES_DB", str(_data_dir() / "voices.sqlite")),
        help="SQLite store of cloned voices (Base models; env TTS_VOICES_DB)",
    )
    p.add_argument(
        "--write-timeout",
        type=_positive_float,
        default=P.DEFAULT_WRITE_TIMEOUT,
        help="seconds one send to a WebSocket client may take before its session is closed (4013) "
        f"and its streams cancelled (default {P.DEFAULT_WRITE_TIMEOUT:g})",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a browser origin (e.g. https://app.example.com) allowed to open WebSocket sessions, besides "
        "same-origin and localhost pages; repeatable; '*' allows any. Clients that send no Origin "
        "header (non-browser) are always allowed",
    )
    p.add_argument(
        "--socket-send-buffer",
        type=int,
        default=64 * 1024,
        metavar="BYTES",
        help="kernel send buffer per WebSocket connection (default 65536; 0: the OS default, which "
        "grows to MiBs and lets a client that stops reading make the engine generate minutes of audio)",
    )
    p.add_argument(
        "--frame-budget",
        type=float,
        nargs=2,
        default=(12.0, 50),
        metavar=("PER_TOKEN", "BASE"),
        help="runaway bound of one utterance in 80 ms codec frames: BASE + PER_TOKEN x its text tokens "
        "(default 12 50); a model that never emits end-of-audio is stopped there (truncated in "
        "context.done). PER_TOKEN 0 disables it",
    )
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    from realtime.app import ServerSettings, run

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = ServerSettings(
        model=args.model, device=args.device,
        backend=None if args.backend == "auto" else args.backend, precision=args.precision, api_key=args.api_key, max_sessions=args.max_sessions,
        max_streams=args.max_streams, limits=P.Limits(max_contexts=args.max_contexts), voices_db=args.voices_db,
        write_timeout=args.write_timeout, allowed_origins=tuple(args.allow_origin),
        socket_send_buffer=args.socket_send_buffer or None,
        budget_frames_per_token=args.frame_budget[0] or None, budget_base_frames=int(args.frame_budget[1]),
    )  # fmt: skip
    # Non-zero when the model could not be loaded: the error was logged in one line.
    return run(settings, host=args.host, port=args.port, log_level=args.log_level)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "qwen3-tts-realtime"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m realtime {serve,say,bench} ...", file=sys.stderr)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return _serve(rest)
    if cmd == "say":
        from clients.__main__ import main as clients_main

        return clients_main(["say", *rest])
    if cmd == "bench":
        from clients.load import main as load_main

        return load_main(rest)
    print(f"unknown command {cmd!r}; expected serve, say or bench", file=sys.stderr)
    return 2
