"""The torch backend: the engine's model phases on torch tensors (see `engine.backend`)."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engine.backend import PrefillRow, ResolvedVoice, StepRow
from engine.checkpoint import Checkpoint
from engine.sampling import SamplingParams
from engine.torch.codec import CodecStreams
from engine.torch.model import PrefillStore, TalkerCache
from engine.torch.precision import load_models
from engine.torch.sampler import RowSampler, make_generator, suppress_mask, talker_processors


@dataclass
class RowState:
    """One stream's tensors between phases (only the worker thread touches them)."""

    sampling: SamplingParams
    generator: torch.Generator
    seen: Tensor | None = None  # bool [V]: codebook-0 ids generated in the utterance
    hidden: Tensor | None = None  # [H] talker hidden that produced the pending codebook-0
    frame_embed: Tensor | None = None  # [H] the last frame's embedding: next talker input


class TorchBackend:
    """Talker, code predictor and streaming codec on one torch device, batched over rows."""

    name = "torch"

    def __init__(
        self,
        checkpoint: Checkpoint,
        *,
        max_streams: int,
        kv_capacity: int,
        device: str | torch.device | None = None,
        precision: str | None = None,
        dtype: torch.dtype | None = None,
    ):
        # None: as Engine, the TTS_PRECISION environment variable (the test suite pins fp32), else auto.
        precision = precision or os.environ.get("TTS_PRECISION") or "auto"
        self.checkpoint = checkpoint
        self.cfg = checkpoint.config
        self.torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is not None:  # the older spelling of a precision
            precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, precision)
        models = load_models(checkpoint, self.torch_device, precision)
        self.talker, self.codec = models.talker, models.codec
        self.dtype, self.precision = models.dtype, models.precision
        self.kernels = dict(models.kernels)  # phase -> kernel chosen for this CPU/GPU (describe())
        self.device = str(self.torch_device)
        tcfg = self.cfg.talker
        self.cache = TalkerCache(tcfg.transformer, max_streams, kv_capacity, self.torch_device, self.dtype)
        self.codec_streams = CodecStreams(
            self.codec, max_streams, device=self.torch_device, dtype=models.codec_dtype
        )
        self._suppress = suppress_mask(tcfg.vocab_size, tcfg.codec_eos_id, self.torch_device)
        self._eos = tcfg.codec_eos_id
        self._clone_lock = threading.Lock()
        self._clone_models: tuple[Any, Any] | None = None

    @property
    def kv_capacity(self) -> int:
        return self.cache.capacity

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "device": self.device,
            "precision": self.precision,
            "kernels": self.kernels,
        }

    # ---- per-stream state ---------------------------------------------------------------------

    def new_row_state(self, sampling: SamplingParams) -> RowState:
        return RowState(sampling=sampling, generator=make_generator(sampling, self.torch_device))

    def rng_states(self, states: Sequence[RowState]) -> list[Any]:
        return [s.generator.get_state() for s in states]

    def restore_rng(self, states: Sequence[RowState], snapshots: Sequence[Any]) -> None:
        for s, snap in zip(states, snapshots, strict=True):
            s.generator.set_state(snap)

    # ---- phases -------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, items: Sequence[PrefillRow]) -> list[int]:
        dev = self.torch_device
        embeds = [self._embed_prompt(it) for it in items]  # [P_i, H]
        lengths = [e.shape[0] for e in embeds]
        x = torch.zeros(len(items), max(lengths), embeds[0].shape[-1], device=dev, dtype=self.dtype)
        for i, e in enumerate(embeds):  # right-padded: pad positions write KV past the prompt,
            x[i, : e.shape[0]] = e  # where the stream's own decode steps overwrite them
        positions = torch.arange(x.shape[1], device=dev).expand(len(items), -1)
        rows = torch.tensor([it.row for it in items], device=dev)
        h = self.talker.forward_hidden(x, positions, PrefillStore(self.cache, rows))
        last = h[torch.arange(len(items), device=dev), torch.tensor(lengths, device=dev) - 1]
        for it in items:
            self.codec_streams.reset(it.codec_row)
            if it.voice.ref_codes is not None:
                # ICL: the codec hears the reference first, as the official decode of ref+generated does.
                ref = torch.from_numpy(it.voice.ref_codes.astype(np.int64)).T.to(dev)
                self.codec_streams.prime(it.codec_row, ref)
        states = [it.state for it in items]
        seen = [torch.zeros(self.cfg.talker.vocab_size, dtype=torch.bool, device=dev) for _ in items]
        c0 = self._sample_talker(states, last, seen, [True] * len(items))
        for i, s in enumerate(states):
            s.seen, s.hidden, s.frame_embed = seen[i], last[i], None
            self._remember(s, c0[i])
        return c0

    def _embed_prompt(self, item: PrefillRow) -> Tensor:
        voice: ResolvedVoice = item.voice
        xvec = torch.from_numpy(voice.xvector) if voice.xvector is not None else None
        ref = torch.from_numpy(voice.ref_codes.astype(np.int64)) if voice.ref_codes is not None else None
        return self.talker.embed_slots(item.slots, xvec, ref)[0]

    @torch.no_grad()
    def predict_codes(self, states: Sequence[RowState], c0: Sequence[int]) -> np.ndarray:
        hidden = torch.stack([s.hidden for s in states])  # type: ignore[misc]
        c0_t = torch.tensor(list(c0), device=self.torch_device)
        e0 = self.talker.embed_codec(c0_t)  # [B, H]
        params = [_sub_params(s.sampling) for s in states]
        sampler = RowSampler(params, [s.generator for s in states], self.torch_device)
        codes, embs = self.talker.code_predictor.predict(hidden, e0, lambda g, logits: sampler(logits))
        frame_embed = torch.cat((e0[:, None], embs), dim=1).sum(1)  # [B, H]: as the official sums
        frames = torch.cat((c0_t[:, None], codes), dim=1).cpu().numpy()  # [B, 16]
        for i, s in enumerate(states):
            s.frame_embed, s.hidden = frame_embed[i], None
        return frames

    @torch.no_grad()
    def talker_step(
        self, span: tuple[int, int], lengths: Sequence[int], items: Sequence[StepRow]
    ) -> list[int]:
        dev = self.torch_device
        r0, r1 = span
        states = [it.state for it in items]
        addend = self.talker.embed_text(torch.tensor([it.text_id for it in items], device=dev)[:, None])[:, 0]
        x = torch.zeros(r1 - r0, 1, addend.shape[-1], device=dev, dtype=self.dtype)
        sel = torch.tensor([it.row - r0 for it in items], device=dev)
        x[sel, 0] = torch.stack([s.frame_embed for s in states]) + addend  # type: ignore[misc]
        positions = torch.tensor([[n] for n in lengths], device=dev)
        h = self.talker.forward_hidden(x, positions, self.cache.bind(slice(r0, r1), positions))
        h_rows = h[sel, 0]  # [B, H]
        seen = [s.seen for s in states]
        c0 = self._sample_talker(states, h_rows, seen, [it.block_eos for it in items])  # type: ignore[arg-type]
        for i, s in enumerate(states):
            s.hidden, s.frame_embed = h_rows[i], None
            self._remember(s, c0[i])
        return c0

    def _sample_talker(
        self, states: Sequence[RowState], hidden: Tensor, seen: list[Tensor], block: list[bool]
    ) -> list[int]:
        dev = self.torch_device
        logits = self.talker.codec_head(hidden)  # [B, V]
        penalty = torch.tensor([s.sampling.repetition_penalty for s in states], device=dev)
        block_t = torch.tensor(block, device=dev)
        scores = talker_processors(logits, torch.stack(seen), penalty, block_t, self._suppress, self._eos)
        params = [(p.temperature, p.top_k, p.top_p) for p in (s.sampling for s in states)]
        sampler = RowSampler(params, [s.generator for s in states], dev)
        return sampler(scores).tolist()

    def _remember(self, state: RowState, c0: int) -> None:
        """A codebook-0 token other than EOS joins the utterance's repetition set."""
        if c0 != self._eos:
            assert state.seen is not None
            state.seen[c0] = True

    @torch.no_grad()
    def decode(self, codec_rows: Sequence[int], codes: np.ndarray) -> np.ndarray:
        codes_t = torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int64)).to(self.torch_device)
        return self.codec_streams.decode(list(codec_rows), codes_t).float().cpu().numpy()

    def reset_codec_row(self, row: int) -> None:
        self.codec_streams.reset(row)

    def move_kv_row(self, src: int, dst: int, length: int) -> None:
        self.cache.move_row(src, dst, length)

    def grow_kv(self, capacity: int) -> None:
        self.cache.grow(capacity)

    # ---- voice cloning ------------------------------------------------------------------------

    @torch.no_grad()
    def clone_encode(self, wav_24k: np.ndarray, with_codes: bool) -> tuple[np.ndarray, np.ndarray | None]:
        from engine.torch.speaker import extract_xvector

        speaker_encoder, codec_encoder = self._load_clone_models()
        xvector = extract_xvector(speaker_encoder, wav_24k).float().cpu().numpy()
        codes = None
        if with_codes:
            wav = torch.from_numpy(wav_24k)[None].to(self.torch_device)
            codes = codec_encoder.encode(wav)[0].cpu().numpy().astype(np.int64)
        return xvector, codes

    def _load_clone_models(self) -> tuple[Any, Any]:
        from engine.torch.weights import load_codec_encoder, load_speaker_encoder

        with self._clone_lock:
            if self._clone_models is None:
                self._clone_models = (
                    load_speaker_encoder(self.checkpoint, self.torch_device),
                    load_codec_encoder(self.checkpoint, self.torch_device),
                )
            return self._clone_models


def _sub_params(p: SamplingParams) -> tuple[float, int, float]:
    return (p.subtalker_temperature, p.subtalker_top_k, p.subtalker_top_p)
