"""Engine counters and histograms, for /metrics and the benchmarks (no metrics library)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


class Buckets:
    """A cumulative histogram (Prometheus-style buckets), kept without any metrics library."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        i = 0
        while i < len(self.bounds) and value > self.bounds[i]:
            i += 1
        self.counts[i] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, acc = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            acc += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
        return out


@dataclass
class EngineStats:
    """Counters for /metrics and benchmarks (updated by the worker)."""

    opened: int = 0
    admitted: int = 0
    closed: int = 0
    completed: int = 0
    failed: int = 0
    refused: int = 0
    truncated: int = 0  # utterances ended by the engine (text budget / frame cap), not by EOS
    prefills: int = 0
    prefill_ms: float = 0.0
    cp_batches: int = 0
    cp_rows: int = 0
    talker_batches: int = 0
    talker_rows: int = 0
    talker_span: int = 0
    step_ms: float = 0.0
    phase_ms: dict[str, float] = field(default_factory=dict)  # wall time per phase (_prefill, ...)
    batch_size: Buckets = field(default_factory=lambda: Buckets((1, 2, 4, 8, 16, 32, 64)))
    step_seconds: Buckets = field(
        default_factory=lambda: Buckets((0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56))
    )
    first_audio_seconds: Buckets = field(
        default_factory=lambda: Buckets((0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30))
    )
