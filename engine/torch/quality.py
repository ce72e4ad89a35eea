"""Quality report of a non-fp32 mode against fp32, on the same weights (random ones of the real
shapes in the bench and tests; real ones when cached).

- talker: teacher-forced decode. Both models run the same inputs (the fp32 model's embeddings of
  a fixed random code/text sequence) step by step, B rows per step as the engine batches them,
  and their codebook-0 logits are compared: max abs error, cosine, top-1 agreement over the ids
  the talker may emit. Rows share a step on purpose: int8 quantizes a step's activations with one
  scale for all rows, so this measures what the engine does at batch B.
- code predictor: teacher-forced too: the fp32 predictor picks each codebook greedily and the
  other model is fed the same codes (`CodePredictor.predict`'s `choose` hook), so its logits for
  codebooks 1-15 are compared position by position.
- codec: SNR (dB) of the waveform of the same random codes, decoded by both codecs.

THRESHOLDS are what `auto` requires of a mode (tests/test_precision.py runs the report; the
bench prints it on the real shapes). Calibrated on random weights of the 0.6B shape (4 rows x 50
steps, 2026-12-01, this repo's bench): bf16, the precision the official package runs on GPUs,
agrees with fp32 on 97 % of codebook-0 greedy picks and 98.8 % of the predictor's (sampled
agreement 99.4 / 99.5 %, cosine 0.99987 / 0.99992); int8 on 94 % / 93.7 % (sampled 98.9 / 98.5 %,
cosine 0.99956 / 0.99921). Random weights have flat logits, so near-ties (and greedy flips) are
commoner than with trained weights; the real-weights test runs the same report when a checkpoint
is cached.
- sampled agreement (1 - total variation between the softmax distributions: the chance that one
  shared random draw picks the same id from both) >= 0.97. The engine samples by default, so this
  is the direct measure: at most 3 frames in 100 (80 ms each, i.e. one every ~2.7 s of audio)
  would take a different, near-equally likely codebook-0 token than fp32 given the same seed.
- greedy top-1 agreement >= 0.90: at most 2-3x bf16's flip rate; a flip happens only where fp32
  itself had near-tied candidates. A kernel bug (wrong scales, wrong layout) gives ~0.
- logits cosine >= 0.998 (talker and predictor): int8 per-channel weights sit at 0.9992-0.9996,
  bf16 above 0.9998; a mis-scaled channel or a broken kernel drops it far below.
- codec SNR >= 20 dB: the error is then 10x below the signal in amplitude (bf16 reaches ~31 dB);
  a wrong dtype path or wrong weights give < 0 dB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.torch.codec import CodecDecoder
from engine.torch.model import Talker, TalkerCache

THRESHOLDS = {
    "top1_min": 0.90,
    "sample_agreement_min": 0.97,
    "talker_cosine_min": 0.998,
    "predictor_cosine_min": 0.998,
    "codec_snr_db_min": 20.0,
}


@dataclass
class Agreement:
    max_abs_error: float = 0.0
    dot: float = 0.0
    ref_sq: float = 0.0
    test_sq: float = 0.0
    cosine_min: float = 1.0  # worst single logit vector
    same_top1: int = 0
    tv_sum: float = 0.0  # total variation between the softmax distributions, summed over vectors
    count: int = 0

    def add(self, ref: Tensor, test: Tensor, allowed: Tensor | None = None) -> None:
        """ref/test logits [N, V] (float), allowed bool [V]: ids that can be chosen."""
        ref, test = ref.float(), test.float()
        self.max_abs_error = max(self.max_abs_error, float((ref - test).abs().max()))
        self.dot += float((ref * test).sum())
        self.ref_sq += float((ref * ref).sum())
        self.test_sq += float((test * test).sum())
        self.cosine_min = min(self.cosine_min, float(F.cosine_similarity(ref, test, dim=-1).min()))
        if allowed is not None:
            ref, test = ref.masked_fill(~allowed, -torch.inf), test.masked_fill(~allowed, -torch.inf)
        # 1 - TV is the chance that one shared random draw samples the same id from both.
        self.tv_sum += float(0.5 * (ref.softmax(-1) - test.softmax(-1)).abs().sum(-1).sum())
        self.same_top1 += int((ref.argmax(-1) == test.argmax(-1)).sum())
        self.count += ref.shape[0]

    def summary(self) -> dict[str, float | int]:
        cos = self.dot / max(1e-30, (self.ref_sq * self.test_sq) ** 0.5)
        return {
            "max_abs_error": round(self.max_abs_error, 5),
            "cosine": round(cos, 6),
            "cosine_min": round(self.cosine_min, 6),
            "top1_agreement": round(self.same_top1 / max(1, self.count), 4),
            "sample_agreement": round(1.0 - self.tv_sum / max(1, self.count), 4),
            "count": self.count,
        }


@torch.no_grad()
def model_report(
    ref: Talker, test: Talker, test_dtype: torch.dtype, *, rows: int = 4, steps: int = 50,
    predictor_every: int = 5, seed: int = 0,
) -> dict[str, dict[str, float | int]]:  # fmt: skip
    """Teacher-forced talker (rows x steps codebook-0 predictions) and code predictor (every
    `predictor_every`-th step, 15 codebooks per row) of `test` against `ref` (fp32)."""
    cfg = ref.cfg
    g = torch.Generator().manual_seed(seed)
    n_codes = cfg.vocab_size - 1024  # codebook-0 ids; the rest are control tokens
    codes = torch.randint(
        0, min(n_codes, cfg.code_predictor.vocab_size), (rows, steps, cfg.num_code_groups), generator=g
    )
    text = torch.randint(0, cfg.text_vocab_size, (rows, steps), generator=g)
    inputs = ref.embed_frames(codes) + ref.embed_text(text)  # [B, S, H]: the same for both models
    allowed = torch.ones(cfg.vocab_size, dtype=torch.bool)
    allowed[n_codes:] = False
    allowed[cfg.codec_eos_id] = True
    caches = [
        TalkerCache(cfg.transformer, rows, steps, torch.device("cpu"), dt)
        for dt in (torch.float32, test_dtype)
    ]
    talker, predictor = Agreement(), Agreement()
    for t in range(steps):
        pos = torch.full((rows, 1), t)
        x = inputs[:, t : t + 1]
        h_ref = ref.forward_hidden(x, pos, caches[0].bind(slice(0, rows), pos))[:, 0]
        h_test = test.forward_hidden(x.to(test_dtype), pos, caches[1].bind(slice(0, rows), pos))[:, 0]
        lr, lt = ref.codec_head(h_ref), test.codec_head(h_test)
        talker.add(lr, lt, allowed)
        if t % predictor_every:
            continue
        c0 = lr.masked_fill(~allowed, -torch.inf).argmax(-1).clamp(max=n_codes - 1)
        ref_logits: list[Tensor] = []
        test_logits: list[Tensor] = []

        def pick(_g: int, logits: Tensor, out: list[Tensor] = ref_logits) -> Tensor:
            out.append(logits)
            return logits.argmax(-1)

        forced, _ = ref.code_predictor.predict(h_ref, ref.embed_codec(c0), pick)

        def follow(k: int, logits: Tensor, out: list[Tensor] = test_logits, codes: Tensor = forced) -> Tensor:
            out.append(logits)
            return codes[:, k]

        # The test model gets the fp32 model's hidden state: the predictor is judged on its own.
        test.code_predictor.predict(h_ref.to(test_dtype), test.embed_codec(c0).to(test_dtype), follow)
        for a, b in zip(ref_logits, test_logits, strict=True):
            predictor.add(a, b)
    return {"talker": talker.summary(), "predictor": predictor.summary()}


@torch.no_grad()
def codec_report(
    ref: CodecDecoder, test: CodecDecoder, *, frames: int = 8, seed: int = 0
) -> dict[str, float]:
    """SNR (dB) of `test`'s waveform against `ref`'s (fp32) for the same random codes."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, ref.cfg.codebook_size, (1, ref.cfg.num_quantizers, frames), generator=g)
    a = ref(codes).double()
    b = test(codes).double()
    noise = float(((a - b) ** 2).sum())
    signal = float((a**2).sum())
    snr = 10.0 * torch.log10(torch.tensor(signal / max(noise, 1e-30))).item()
    return {"snr_db": round(snr, 2), "max_abs_error": round(float((a - b).abs().max()), 5), "frames": frames}


def passes(
    report: dict[str, dict[str, float | int]], thresholds: dict[str, float] | None = None
) -> dict[str, bool]:
    """Which checks of THRESHOLDS a report (model_report's, plus "codec" from codec_report) passes."""
    th = thresholds or THRESHOLDS
    out = {
        "talker_top1": report["talker"]["top1_agreement"] >= th["top1_min"],
        "talker_cosine": report["talker"]["cosine"] >= th["talker_cosine_min"],
        "predictor_cosine": report["predictor"]["cosine"] >= th["predictor_cosine_min"],
        "talker_sampled": report["talker"]["sample_agreement"] >= th["sample_agreement_min"],
        "predictor_sampled": report["predictor"]["sample_agreement"] >= th["sample_agreement_min"],
    }
    if "codec" in report:
        out["codec_snr"] = report["codec"]["snr_db"] >= th["codec_snr_db_min"]
    return out
