"""The tensor half of the engine: what a backend (torch, mlx) does for the scheduler.

The scheduler (`engine.scheduler`) decides *which* streams run and *when*; a backend owns the
weights, the talker's KV-cache rows, the codec's streaming rows and each stream's sampling state,
and runs the four phases on the rows it is given. Everything that crosses this line is plain
Python or numpy, so the scheduler imports no tensor library and one scheduler drives both.

Rows: the scheduler hands out KV rows `0..n-1` (kept compact: `move_kv_row` fills a hole) and
codec rows `0..max_streams-1`. A stream's `RowState` (created by `new_row_state`, opaque to the
scheduler) holds its random generator, the codebook-0 ids it has generated in the current
utterance (repetition penalty), the talker hidden that produced its pending codebook-0 and the
next talker input. A phase writes a row's state only after its last tensor operation, so a
phase that raises leaves nothing behind and the scheduler can retry it row by row after
rewinding the generators (`rng_states` / `restore_rng`).

Threads: `new_row_state` runs in the thread that opens the stream, the phases in the engine's
worker thread, `clone_encode` in its caller's thread. A row state must therefore be usable from
any thread (MLX ties a not-yet-evaluated array to the thread that built it: evaluate first).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from engine.prompt import Slot, VoiceSpec
from engine.sampling import SamplingParams

if TYPE_CHECKING:
    from engine.checkpoint import Checkpoint

BACKENDS = ("torch", "mlx")


@dataclass(frozen=True)
class ResolvedVoice:
    """A voice as the prompt and the backend need it (host arrays, any backend)."""

    spec: VoiceSpec | None
    xvector: np.ndarray | None = None  # float32 [H] for Base clones
    ref_codes: np.ndarray | None = None  # int64 [n_ref, 16] for ICL clones


@dataclass(frozen=True)
class PrefillRow:
    """One new utterance to prefill into KV row `row` (positions 0..len(slots)-1)."""

    state: Any  # the stream's RowState
    row: int
    codec_row: int  # reset, then primed with `voice.ref_codes` (ICL) before the first frame
    slots: list[Slot]
    voice: ResolvedVoice


@dataclass(frozen=True)
class StepRow:
    """One talker step of the stream in KV row `row`: its last frame's embedding plus `text_id`."""

    state: Any
    row: int
    text_id: int  # the text-track input: a text token, tts_eos or tts_pad
    block_eos: bool  # fewer than MIN_NEW_TOKENS codebook-0 tokens so far in the utterance


class Backend(Protocol):
    """A tensor library's implementation of the engine's model phases (see module doc)."""

    name: str  # "torch" | "mlx"
    device: str  # e.g. "cpu", "cuda:0", "gpu"
    precision: str  # resolved precision actually running: "fp32" | "bf16" | "int8"
    kv_capacity: int  # positions per KV row now (grown on demand with `grow_kv`)

    def new_row_state(self, sampling: SamplingParams) -> Any:
        """A stream's sampling state: its parameters, and a generator seeded from
        `sampling.seed` (random when None)."""

    def rng_states(self, states: Sequence[Any]) -> list[Any]:
        """Snapshots of the streams' random generators."""

    def restore_rng(self, states: Sequence[Any], snapshots: Sequence[Any]) -> None:
        """Rewind generators to `rng_states` snapshots (a failed batch is retried row by row)."""

    def prefill(self, items: Sequence[PrefillRow]) -> list[int]:
        """Prefill every item's prompt into its KV row in one batched forward, reset and prime
        its codec row, start a new utterance in its state (nothing generated yet) and sample
        its first codebook-0 token (EOS blocked). Returns the tokens."""

    def predict_codes(self, states: Sequence[Any], c0: Sequence[int]) -> np.ndarray:
        """Codebooks 1..15 of each stream's current frame (codebook 0 given), batched: int64
        [B, 16] frames. Keeps each frame's embedding as the stream's next talker input."""

    def talker_step(
        self, span: tuple[int, int], lengths: Sequence[int], items: Sequence[StepRow]
    ) -> list[int]:
        """One talker step over KV rows [r0, r1) (`lengths[i]`: cached positions of row r0+i;
        rows of the span not in `items` are computed and discarded). Appends each item's input
        at its row's next position and samples its next codebook-0 token; a token other than
        EOS joins the stream's repetition set. Returns the tokens, in `items` order."""

    def decode(self, codec_rows: Sequence[int], codes: np.ndarray) -> np.ndarray:
        """Advance codec rows by n frames: codes int64 [B, 16, n] -> float32 samples [B, n·spf]."""

    def reset_codec_row(self, row: int) -> None:
        """Forget a codec row's history: its next frame decodes as the first of a new stream."""

    def move_kv_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of KV row `src` to row `dst`."""

    def grow_kv(self, capacity: int) -> None:
        """Reallocate every KV row with `capacity` positions, keeping the contents."""

    def clone_encode(self, wav_24k: np.ndarray, with_codes: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Reference audio (float32 mono at the codec's rate) -> (x-vector float32 [H], codec
        codes int64 [n, 16] or None). Thread-safe; runs in the caller's thread."""

    def describe(self) -> dict[str, Any]:
        """What runs: backend, device, precision and kernel choices (for /health and the CLI)."""


def default_backend() -> str:
    """MLX on Apple Silicon (its unified-memory GPU), torch everywhere else."""
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        try:
            import mlx.core  # noqa: F401
        except ImportError:
            return "torch"
        return "mlx"
    return "torch"


def load_backend(
    name: str | None,
    checkpoint: Checkpoint,
    *,
    max_streams: int,
    kv_capacity: int,
    device: str | None = None,
    precision: str = "auto",
    dtype: Any = None,
) -> Backend:
    """Build backend `name` ("torch", "mlx", or None/"auto" for `default_backend()`)."""
    name = default_backend() if name in (None, "auto") else name
    if name == "torch":
        from engine.torch.runner import TorchBackend

        return TorchBackend(
            checkpoint, max_streams=max_streams, kv_capacity=kv_capacity, device=device,
            precision=precision, dtype=dtype,
        )  # fmt: skip
    if name == "mlx":
        try:
            from engine.mlx.runner import MlxBackend
        except ImportError as e:  # mlx itself missing, on this platform or in this install
            raise BackendError(f"the mlx backend needs the mlx package ({e})") from e
        return MlxBackend(
            checkpoint, max_streams=max_streams, kv_capacity=kv_capacity, device=device, precision=precision
        )
    raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")


class BackendError(RuntimeError):
    """The requested backend, device or precision cannot run here."""
