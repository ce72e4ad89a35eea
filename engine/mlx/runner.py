"""The MLX backend: the engine's model phases on MLX arrays (see `engine.backend`).

Every phase builds its whole graph lazily (a code-predictor frame's 15 passes and draws
included) and evaluates it once, together with the KV cache and the drawing rows' keys, so no
graph outlives its phase. All work runs on the default stream of the chosen device in the
calling thread: the engine's worker thread runs the phases, cloning runs in its caller's thread,
and an MLX stream made in one thread cannot be used in another. For the same reason every array
that one thread makes and another uses (weights, masks, random keys, row state) is evaluated
before it crosses: a lazy array is evaluated on the stream of the thread that built it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from engine.backend import BackendError, PrefillRow, StepRow
from engine.checkpoint import Checkpoint
from engine.mlx.model import TalkerCache
from engine.mlx.sampler import RowRng, RowSampler, suppress_mask, talker_processors
from engine.mlx.weights import DTYPES, load_talker
from engine.sampling import SamplingParams

PRECISIONS = ("fp32", "bf16", "auto")


@dataclass
class RowState:
    """One stream's state between phases (only the worker thread touches it)."""

    sampling: SamplingParams
    rng: RowRng
    seen: np.ndarray | None = None  # bool [V]: codebook-0 ids generated in the utterance
    hidden: mx.array | None = None  # [H] talker hidden that produced the pending codebook-0
    frame_embed: mx.array | None = None  # [H] the last frame's embedding: next talker input


def resolve_device(device: str | None) -> str:
    if device is None:
        return "gpu" if mx.metal.is_available() else "cpu"
    if device not in ("cpu", "gpu"):
        raise BackendError(f"unknown mlx device {device!r}; choose cpu or gpu")
    if device == "gpu" and not mx.metal.is_available():
        raise BackendError("the mlx gpu device needs Metal (Apple Silicon); use device cpu here")
    return device


def resolve_precision(requested: str, device: str) -> str:
    if requested not in PRECISIONS:
        raise BackendError(f"unknown precision {requested!r} for mlx; choose one of: {', '.join(PRECISIONS)}")
    if requested == "auto":  # bf16 halves the memory traffic on the GPU; the CPU build is fp32-fast
        return "bf16" if device == "gpu" else "fp32"
    return requested


class MlxBackend:
    """Talker, code predictor and streaming codec on one MLX device, batched over rows."""

    name = "mlx"

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        max_streams: int,
        kv_capacity: int,
        device: str | None = None,
        precision: str = "auto",
    ):
        self.checkpoint = checkpoint
        self.cfg = checkpoint.config
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.mx_device = mx.Device(mx.gpu if self.device == "gpu" else mx.cpu)
        self.dtype = DTYPES[self.precision]
        self.max_streams = max_streams
        tcfg = self.cfg.talker
        with mx.stream(self.mx_device):
            self.talker = load_talker(checkpoint, self.dtype, contiguous=self.device == "cpu")
            self.cache = TalkerCache(tcfg.transformer, max_streams, kv_capacity, self.dtype)
            self._suppress = suppress_mask(tcfg.vocab_size, tcfg.codec_eos_id)
            mx.eval(self._suppress)  # built here, used in the worker thread: see the module doc
        self._eos = tcfg.codec_eos_id
        # Imported here: the audio models are their own modules (engine.mlx.codec, ...). Loaded
        # now so a bad codec file fails the start, not the first stream.
        from engine.mlx.codec import CodecStreams, load_codec_decoder

        with mx.stream(self.mx_device):
            # (CodecStreams evaluates the row states it makes: they are safe to use from the worker.)
            self.codec_streams = CodecStreams(load_codec_decoder(checkpoint, self.dtype), max_streams)
        self._clone_lock = threading.Lock()
        self._clone_models: tuple[Any, Any] | None = None

    @property
    def kv_capacity(self) -> int:
        return self.cache.capacity

    def describe(self) -> dict[str, Any]:
        # Every phase runs in the one resolved dtype (the codec decoder included), as MLX kernels.
        kernels = {"talker": self.precision, "codec": self.precision}
        return {"backend": self.name, "device": self.device, "precision": self.precision, "kernels": kernels}

    # ---- per-stream state ---------------------------------------------------------------------

    def new_row_state(self, sampling: SamplingParams) -> RowState:
        return RowState(sampling=sampling, rng=RowRng.from_params(sampling))

    def rng_states(self, states: Sequence[RowState]) -> list[Any]:
        return [s.rng.snapshot() for s in states]

    def restore_rng(self, states: Sequence[RowState], snapshots: Sequence[Any]) -> None:
        for s, snap in zip(states, snapshots, strict=True):
            s.rng.restore(snap)

    # ---- phases -------------------------------------------------------------------------------

    def prefill(self, items: Sequence[PrefillRow]) -> list[int]:
        with mx.stream(self.mx_device):
            embeds = [self._embed_prompt(it) for it in items]  # [P_i, H]
            lengths = [e.shape[0] for e in embeds]
            p_max, hidden = max(lengths), embeds[0].shape[-1]
            # Right-padded: pad positions write KV past the prompt, where the stream's own
            # decode steps overwrite them.
            x = mx.stack(
                [mx.concatenate((e, mx.zeros((p_max - e.shape[0], hidden), e.dtype))) for e in embeds]
            )
            positions = mx.broadcast_to(mx.arange(p_max)[None], (len(items), p_max))
            h = self.talker.forward_hidden(x, positions, self.cache.prefill([it.row for it in items]))
            last = h[mx.arange(len(items)), mx.array(lengths) - 1]  # [B, H]
            states = [it.state for it in items]
            seen = [np.zeros(self.cfg.talker.vocab_size, dtype=bool) for _ in items]
            c0 = self._sample_talker(states, last, seen, [True] * len(items))
            hidden = _rows(last)
        for it in items:
            self.codec_streams.reset(it.codec_row)
            if it.voice.ref_codes is not None:
                # ICL: the codec hears the reference first, as the official decode of ref+generated does.
                ref = mx.array(np.ascontiguousarray(it.voice.ref_codes.T, dtype=np.int32))  # [16, n_ref]
                self.codec_streams.prime(it.codec_row, ref)
        for i, s in enumerate(states):
            s.seen, s.hidden, s.frame_embed = seen[i], hidden[i], None
            self._remember(s, c0[i])
        return c0

    def _embed_prompt(self, item: PrefillRow) -> mx.array:
        voice = item.voice
        return self.talker.embed_slots(item.slots, voice.xvector, voice.ref_codes)

    def predict_codes(self, states: Sequence[RowState], c0: Sequence[int]) -> np.ndarray:
        with mx.stream(self.mx_device):
            hidden = mx.stack([s.hidden for s in states])  # type: ignore[misc]
            c0_a = mx.array(list(c0), dtype=mx.int32)
            e0 = self.talker.embed_codec(c0_a)  # [B, H]
            params = [_sub_params(s.sampling) for s in states]
            sampler = RowSampler(params, [s.rng for s in states])
            codes, embs = self.talker.code_predictor.predict(hidden, e0, lambda g, logits: sampler(logits))
            frame_embed = mx.concatenate((e0[:, None], embs), axis=1).sum(1)  # [B, H]: as the official sums
            frames = mx.concatenate((c0_a[:, None], codes.astype(mx.int32)), axis=1)  # [B, 16]
            mx.eval(frames, frame_embed, sampler.keys())
            embeds = _rows(frame_embed)
        for i, s in enumerate(states):
            s.frame_embed, s.hidden = embeds[i], None
        return np.array(frames).astype(np.int64)

    def talker_step(
        self, span: tuple[int, int], lengths: Sequence[int], items: Sequence[StepRow]
    ) -> list[int]:
        r0, r1 = span
        states = [it.state for it in items]
        with mx.stream(self.mx_device):
            addend = self.talker.embed_text(mx.array([it.text_id for it in items]))  # [B, H]
            x = mx.zeros((r1 - r0, 1, addend.shape[-1]), dtype=self.dtype)
            sel = mx.array([it.row - r0 for it in items])
            x[sel, 0] = mx.stack([s.frame_embed for s in states]) + addend  # type: ignore[misc]
            positions = np.array([[n] for n in lengths], dtype=np.int64)
            kv = self.cache.bind(r0, r1, positions)
            h = self.talker.forward_hidden(x, mx.array(positions), kv)
            h_rows = h[sel, 0]  # [B, H]
            seen = [s.seen for s in states]
            c0 = self._sample_talker(states, h_rows, seen, [it.block_eos for it in items])  # type: ignore[arg-type]
            hidden = _rows(h_rows)
        for i, s in enumerate(states):
            s.hidden, s.frame_embed = hidden[i], None
            self._remember(s, c0[i])
        return c0

    def _sample_talker(
        self, states: Sequence[RowState], hidden: mx.array, seen: list[np.ndarray], block: list[bool]
    ) -> list[int]:
        """Codebook-0 ids for B rows; evaluates the phase (hidden, KV cache, keys) at once."""
        logits = self.talker.codec_head(hidden)  # [B, V]
        penalty = mx.array([s.sampling.repetition_penalty for s in states], dtype=mx.float32)
        scores = talker_processors(
            logits, mx.array(np.stack(seen)), penalty, mx.array(block), self._suppress, self._eos
        )
        params = [(p.temperature, p.top_k, p.top_p) for p in (s.sampling for s in states)]
        sampler = RowSampler(params, [s.rng for s in states])
        c0 = sampler(scores)
        mx.eval(c0, hidden, self.cache.arrays(), sampler.keys())
        return [int(t) for t in np.array(c0)]

    def _remember(self, state: RowState, c0: int) -> None:
        """A codebook-0 token other than EOS joins the utterance's repetition set."""
        if c0 != self._eos:
            assert state.seen is not None
            state.seen[c0] = True

    # ---- codec ----------------------------------------------------------------------------------

    def decode(self, codec_rows: Sequence[int], codes: np.ndarray) -> np.ndarray:
        with mx.stream(self.mx_device):
            out = self.codec_streams.decode(
                list(codec_rows), mx.array(np.ascontiguousarray(codes, dtype=np.int32))
            )
            return np.array(out.astype(mx.float32))

    def reset_codec_row(self, row: int) -> None:
        with mx.stream(self.mx_device):
            self.codec_streams.reset(row)

    # ---- KV rows ------------------------------------------------------------------------------

    def move_kv_row(self, src: int, dst: int, length: int) -> None:
        with mx.stream(self.mx_device):
            self.cache.move_row(src, dst, length)

    def grow_kv(self, capacity: int) -> None:
        with mx.stream(self.mx_device):
            self.cache.grow(capacity)

    # ---- voice cloning ------------------------------------------------------------------------

    def clone_encode(self, wav_24k: np.ndarray, with_codes: bool) -> tuple[np.ndarray, np.ndarray | None]:
        speaker_encoder, codec_encoder = self._load_clone_models()
        from engine.mlx.speaker import extract_xvector

        with mx.stream(self.mx_device):
            xvector = np.asarray(extract_xvector(speaker_encoder, wav_24k), dtype=np.float32)
            codes = None
            if with_codes:
                codes = np.asarray(codec_encoder.encode(wav_24k)).astype(np.int64)
        return xvector, codes

    def _load_clone_models(self) -> tuple[Any, Any]:
        from engine.mlx.codec_encoder import load_codec_encoder
        from engine.mlx.speaker import load_speaker_encoder

        with self._clone_lock:
            if self._clone_models is None:
                with mx.stream(self.mx_device):
                    self._clone_models = (
                        load_speaker_encoder(self.checkpoint),
                        load_codec_encoder(self.checkpoint),
                    )
            return self._clone_models


def _rows(batch: mx.array) -> list[mx.array]:
    """The rows of an evaluated [B, ...] array, each evaluated: a row state outlives the phase
    and the thread (a lazy slice can only be evaluated in the thread that made it)."""
    rows = [batch[i] for i in range(batch.shape[0])]
    mx.eval(rows)
    return rows


def _sub_params(p: SamplingParams) -> tuple[float, int, float]:
    return (p.subtalker_temperature, p.subtalker_top_k, p.subtalker_top_p)
