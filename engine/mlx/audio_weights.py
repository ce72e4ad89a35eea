"""Weights of the MLX audio models (codec decoder, codec encoder, speaker encoder).

Real checkpoints are read with `mx.load` from the official safetensors: no torch, no conversion
step. Random specs (`random:<shape>`) have no files; their weights are drawn by the torch
backend's own random initialisation (`engine.torch.weights`), so that a random MLX model is the
*same* model as the random torch one and the two can be compared. That is the only place where
this backend imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import mlx.core as mx

from engine.checkpoint import Checkpoint, CheckpointError


class Weights:
    """The tensors of one model by checkpoint name, each to be taken exactly once.

    Floating tensors are cast to `dtype` as they are taken; a missing tensor, a wrong shape or a
    tensor nobody took is a `CheckpointError` naming `where`, as with torch's strict loading.
    """

    def __init__(self, tensors: Mapping[str, mx.array], where: str, dtype: mx.Dtype = mx.float32):
        self._tensors = dict(tensors)
        self._taken: set[str] = set()
        self.where = where
        self.dtype = dtype

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> mx.array:
        if name not in self._tensors:
            raise CheckpointError(f"{self.where}: tensor {name} is missing")
        t = self._tensors[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.where}: {name} has shape {tuple(t.shape)}, the config implies {shape}"
            )
        self._taken.add(name)
        return t.astype(self.dtype) if mx.issubdtype(t.dtype, mx.floating) else t

    def skip(self, prefix: str) -> None:
        """Mark tensors under `prefix` as known but unused (kept in the file for other models)."""
        self._taken |= {k for k in self._tensors if k.startswith(prefix)}

    def finish(self) -> None:
        left = sorted(set(self._tensors) - self._taken)
        if left:
            raise CheckpointError(f"{self.where}: {len(left)} unexpected tensors, e.g. {', '.join(left[:3])}")


def evaluate_arrays(model: object) -> None:
    """Evaluate every array a model object holds (attributes, lists, tuples, dicts, nested
    objects): the layouts derived at load time are computed once, here, in the loading thread,
    and the raw checkpoint arrays can be freed. (MLX evaluates a lazy array on the stream of the
    thread that built it, so nothing lazy may cross into the engine's worker thread.)"""
    arrays: list[mx.array] = []
    seen: set[int] = set()

    def walk(x: object) -> None:
        if id(x) in seen:
            return
        seen.add(id(x))
        if isinstance(x, mx.array):
            arrays.append(x)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif hasattr(x, "__dict__") and type(x).__module__.startswith("engine."):
            for v in vars(x).values():
                walk(v)

    walk(model)
    mx.eval(arrays)


def read_prefixed(path: Path, prefix: str) -> dict[str, mx.array]:
    """The tensors of a safetensors file under `prefix`, with the prefix removed."""
    try:
        tensors = mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file (corrupt or truncated?): {e}") from None
    assert isinstance(tensors, dict)
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def checkpoint_weights(ckpt: Checkpoint, part: str, dtype: mx.Dtype = mx.float32) -> Weights:
    """Weights of one part of a checkpoint: "decoder" or "encoder" (the speech tokenizer's) or
    "speaker_encoder" (the talker file's)."""
    if ckpt.is_random:
        return Weights(_random_tensors(ckpt, part), f"{ckpt.name} ({part}, random)", dtype)
    path = ckpt.weights_file if part == "speaker_encoder" else ckpt.codec_weights_file
    return Weights(read_prefixed(path, part + "."), str(path), dtype)


def _random_tensors(ckpt: Checkpoint, part: str) -> dict[str, mx.array]:
    # Torch only here, for random specs: the torch backend draws the weights, so both backends
    # hold the same random model (and the same as `write_random_checkpoint` writes).
    import torch

    from engine.torch import weights as torch_weights

    cpu = torch.device("cpu")
    if part == "decoder":
        module = torch_weights.load_codec_decoder(ckpt, cpu, torch.float32)
    elif part == "encoder":
        module = torch_weights.load_codec_encoder(ckpt, cpu)
    elif part == "speaker_encoder":
        module = torch_weights.load_speaker_encoder(ckpt, cpu)
    else:
        raise ValueError(f"unknown checkpoint part {part!r}")
    return from_torch(module.state_dict())


def from_torch(state: Mapping[str, object]) -> dict[str, mx.array]:
    """A torch state dict as MLX arrays (tests load official modules' weights this way)."""
    out = {}
    for k, t in state.items():
        t = t.detach().cpu()  # type: ignore[attr-defined]
        out[k] = mx.array(t.float().numpy() if t.is_floating_point() else t.numpy())
    return out
