"""Weights for the torch backend: load the official safetensors, or make random ones.

Loading builds modules on the meta device and assigns the checkpoint tensors (cast to the
engine's dtype), so a 1.7B model is never randomly initialized just to be overwritten.
Random weights are drawn with scales that keep every part of the network active (unit-scale
codec activations, peaked talker logits), so tests on them compare meaningful numbers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_tensor_shapes,
    random_config_dicts,
    write_config_files,
)
from engine.config import ModelConfig
from engine.torch.model import Talker

if TYPE_CHECKING:
    from engine.torch.codec import CodecDecoder


def _read_prefixed(path: Path, prefix: str) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file (corrupt or truncated?): {e}") from None


def _assign(
    module: nn.Module, state: dict[str, Tensor], where: str, dtype: torch.dtype, device: torch.device
) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    check_tensor_shapes({k: tuple(t.shape) for k, t in state.items()}, expected, where)
    # Floating tensors take the engine dtype; integer buffers (codebook flags) keep theirs.
    cast = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()
    }
    module.load_state_dict(cast, assign=True)


def _rebuild_buffers(module: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (RoPE tables...) are not in checkpoints: recompute them after a
    meta-device build."""
    for m in module.modules():
        rebuild = getattr(m, "rebuild_buffers", None)
        if m is not module and callable(rebuild):
            rebuild(device)


def load_talker(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> Talker:
    if ckpt.is_random:
        talker = Talker(ckpt.config.talker)
        init_random_(talker, seed=ckpt.random_seed or 0)
        end_after_text_(talker, ckpt.config)
        return talker.to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        talker = Talker(ckpt.config.talker)
    _assign(talker, _read_prefixed(ckpt.weights_file, "talker."), str(ckpt.weights_file), dtype, device)
    _rebuild_buffers(talker, device)
    return talker.eval()


def load_speaker_encoder(ckpt: Checkpoint, device: torch.device) -> nn.Module:
    """The x-vector extractor of a Base checkpoint (fp32: a small model, run once per voice)."""
    from engine.torch.speaker import SpeakerEncoder

    cfg = ckpt.config.speaker_encoder
    if cfg is None:
        raise CheckpointError(f"{ckpt.name} is a {ckpt.config.model_type} model: it has no speaker encoder")
    if ckpt.is_random:
        enc = SpeakerEncoder(cfg)
        init_random_(enc, seed=(ckpt.random_seed or 0) + 2)
        return enc.to(device).eval()
    with torch.device("meta"):
        enc = SpeakerEncoder(cfg)
    _assign(
        enc,
        _read_prefixed(ckpt.weights_file, "speaker_encoder."),
        str(ckpt.weights_file),
        torch.float32,
        device,
    )
    return enc.eval()


def load_codec_encoder(
    ckpt: Checkpoint, device: torch.device, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """The reference-audio encoder (voice cloning). fp32: code search is precision-sensitive."""
    from engine.torch.codec_encoder import CodecEncoder

    if ckpt.is_random:
        enc = CodecEncoder.from_config(ckpt.codec)
        init_random_(enc, seed=(ckpt.random_seed or 0) + 3)
        return enc.to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        enc = CodecEncoder.from_config(ckpt.codec)
    _assign(
        enc, _read_prefixed(ckpt.codec_weights_file, "encoder."), str(ckpt.codec_weights_file), dtype, device
    )
    return enc.eval()


def load_codec_decoder(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> CodecDecoder:
    from engine.torch.codec import CodecDecoder

    if ckpt.is_random:
        dec = CodecDecoder(ckpt.codec.decoder)
        init_random_(dec, seed=(ckpt.random_seed or 0) + 1)
        return dec.to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        dec = CodecDecoder(ckpt.codec.decoder)
    _assign(
        dec, _read_prefixed(ckpt.codec_weights_file, "decoder."), str(ckpt.codec_weights_file), dtype, device
    )
    _rebuild_buffers(dec, device)
    return dec.eval()


# ---- Random weights ---------------------------------------------------------------------------


@torch.no_grad()
def init_random_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights that keep every part of a network active.

    Linear/conv weights ~ N(0, 1/fan_in) keep activations at unit scale through deep stacks
    (fan-in of a transposed conv is in*k/stride); embeddings and codebooks ~ N(0, 1); norm gains
    ~ 1 + N(0, 0.1) so the norms matter in parity tests; codebook usage counts stay positive;
    every other parameter (biases, SnakeBeta log-scales, layer scales) gets N(0, 0.1) noise.
    Modules are visited in a fixed order, so a seed always gives the same model.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> Tensor:
        return torch.randn(shape, generator=g)

    for name, m in module.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if isinstance(m, nn.Embedding) or pname == "embedding_sum":
                val = randn(p.shape)
            elif pname == "cluster_usage":
                val = 1.0 + randn(p.shape).abs()
            elif pname == "weight" and isinstance(m, nn.Linear):
                val = randn(p.shape) / math.sqrt(m.in_features)
            elif pname == "weight" and isinstance(m, nn.ConvTranspose1d):
                val = randn(p.shape) / math.sqrt(m.in_channels * m.kernel_size[0] / m.stride[0])
            elif pname == "weight" and isinstance(m, nn.Conv1d):
                val = randn(p.shape) / math.sqrt(m.in_channels // m.groups * m.kernel_size[0])
                if name.endswith("conv2.conv"):
                    # The codec's residual units add their branch to the input three times per
                    # block: a small branch keeps activations (and the output) from blowing up.
                    val *= 0.2
                if m.out_channels == 1:  # the waveform head: keep most samples inside the final clamp
                    val *= 0.1
            elif pname == "weight" and p.dim() == 1:  # RMSNorm / LayerNorm gains
                val = 1.0 + 0.1 * randn(p.shape)
            else:
                val = 0.1 * randn(p.shape)
            p.copy_(val.to(p.dtype))
        # Mimi keeps its codebooks as buffers; all-zero codebooks would make every code 0.
        for bname, b in m.named_buffers(recurse=False):
            if bname == "embed_sum":
                b.copy_(randn(b.shape).to(b.dtype))
            elif bname == "cluster_usage":
                b.copy_((1.0 + randn(b.shape).abs()).to(b.dtype))
            elif bname == "initialized":
                b.fill_(1)
    prepare = getattr(module, "prepare", None)
    if callable(prepare):  # derived tables (codec) must follow the new weights
        prepare()
    return module


@torch.no_grad()
def end_after_text_(talker: Talker, cfg: ModelConfig, *, gain: float = 50.0, eos_logit: float = 12.0) -> None:
    """Make random weights end utterances like a trained model: EOS once the text is over.

    After the last text token the talker's input carries `tts_pad` at every step. Scaling the
    pad token's text embedding makes its projection dominate the residual stream there, and
    pointing the EOS row of the codec head along it makes EOS the likely next code; while text
    is still being read, EOS stays as unlikely as any other code. Random specs only, so the
    offline demo and load tests hear utterances of realistic length.
    """
    emb = talker.model.text_embedding.weight
    emb[cfg.tts_pad_id] *= gain
    direction = talker.embed_text(torch.tensor([cfg.tts_pad_id]))[0].float()
    direction = direction / direction.norm()
    hidden = direction.shape[0]
    head = talker.codec_head.weight
    # After the final RMSNorm the hidden state has norm ~sqrt(H) along `direction`.
    head[cfg.talker.codec_eos_id] = (direction * eos_logit / hidden**0.5).to(head.dtype)


def write_random_checkpoint(
    dest: str | Path,
    shape: str = "tiny",
    model_type: str = "custom_voice",
    *,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> Path:
    """Write a random-weight checkpoint in the official layout (loadable by qwen-tts too)."""
    from engine.config import SpeechTokenizerConfig
    from engine.text import write_tokenizer_files
    from engine.torch.codec import CodecDecoder
    from engine.torch.codec_encoder import CodecEncoder

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dicts = random_config_dicts(shape, model_type)
    if max_new_tokens is not None:
        dicts["generation_config.json"]["max_new_tokens"] = max_new_tokens
    write_config_files(dest, dicts)
    write_tokenizer_files(dest)
    cfg = ModelConfig.from_dict(dicts["config.json"])
    talker = init_random_(Talker(cfg.talker), seed)
    tensors = {f"talker.{k}": v.contiguous() for k, v in talker.state_dict().items()}
    if model_type == "base":
        from engine.torch.speaker import SpeakerEncoder

        assert cfg.speaker_encoder is not None
        spk = init_random_(SpeakerEncoder(cfg.speaker_encoder), seed + 2)
        tensors |= {f"speaker_encoder.{k}": v.contiguous() for k, v in spk.state_dict().items()}
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    codec_cfg = SpeechTokenizerConfig.from_dict(dicts["speech_tokenizer/config.json"])
    dec = init_random_(CodecDecoder(codec_cfg.decoder), seed + 1)
    enc = init_random_(CodecEncoder.from_config(codec_cfg), seed + 3)
    codec_tensors = {f"decoder.{k}": v.contiguous() for k, v in dec.state_dict().items()}
    codec_tensors |= {f"encoder.{k}": v.contiguous() for k, v in enc.state_dict().items()}
    save_file(codec_tensors, str(dest / "speech_tokenizer" / "model.safetensors"), metadata={"format": "pt"})
    return dest
