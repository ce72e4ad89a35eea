"""Weights for the MLX backend: the talker from the official safetensors, read by `mx.load`.

Real checkpoints need no torch: `mx.load` reads `model.safetensors` directly (no conversion
step). Random specs (`random:tiny`, ...) have no files; their weights are drawn by the torch
backend's `load_talker` (the same seeded values, and the EOS-after-text shaping of
`end_after_text_`, that the torch backend runs with), written once to a temporary safetensors
file and read back through the same `mx.load` path. Torch is therefore imported only for
random specs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import mlx.core as mx

from engine.checkpoint import Checkpoint, CheckpointError, check_tensor_shapes
from engine.config import TalkerConfig, TransformerConfig
from engine.mlx.model import Talker

DTYPES = {"fp32": mx.float32, "bf16": mx.bfloat16}


def _stack_shapes(cfg: TransformerConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    out: dict[str, tuple[int, ...]] = {f"{prefix}norm.weight": (h,)}
    for n in range(cfg.num_layers):
        p = f"{prefix}layers.{n}."
        out |= {
            p + "self_attn.q_proj.weight": (cfg.num_heads * d, h),
            p + "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_heads * d),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return out


def talker_shapes(cfg: TalkerConfig) -> dict[str, tuple[int, ...]]:
    """Every `talker.*` tensor of the official checkpoint (prefix stripped) and its shape."""
    h, th = cfg.transformer.hidden_size, cfg.text_hidden_size
    cp = cfg.code_predictor
    c = cp.transformer.hidden_size
    out = _stack_shapes(cfg.transformer, "model.") | _stack_shapes(cp.transformer, "code_predictor.model.")
    out |= {
        "model.codec_embedding.weight": (cfg.vocab_size, h),
        "model.text_embedding.weight": (cfg.text_vocab_size, th),
        "text_projection.linear_fc1.weight": (th, th),
        "text_projection.linear_fc1.bias": (th,),
        "text_projection.linear_fc2.weight": (h, th),
        "text_projection.linear_fc2.bias": (h,),
        "codec_head.weight": (cfg.vocab_size, h),
    }
    for g in range(cp.num_code_groups - 1):
        out[f"code_predictor.model.codec_embedding.{g}.weight"] = (cp.vocab_size, h)
        out[f"code_predictor.lm_head.{g}.weight"] = (cp.vocab_size, c)
    if c != h:
        out["code_predictor.small_to_mtp_projection.weight"] = (c, h)
        out["code_predictor.small_to_mtp_projection.bias"] = (c,)
    return out


def read_prefixed(path: Path, prefix: str) -> dict[str, mx.array]:
    """The tensors of a safetensors file under `prefix` (stripped)."""
    try:
        tensors = mx.load(str(path), format="safetensors")
    except (RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file (corrupt or truncated?): {e}") from None
    assert isinstance(tensors, dict)
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_tensors(state: dict[str, mx.array], expected: dict[str, tuple[int, ...]], where: str) -> None:
    check_tensor_shapes({k: tuple(t.shape) for k, t in state.items()}, expected, where)


def _random_talker_tensors(ckpt: Checkpoint) -> dict[str, mx.array]:
    """A random spec's talker, drawn by the torch backend (see module doc), via a temporary file."""
    import torch
    from safetensors.torch import save_file

    from engine.torch.weights import load_talker as load_torch_talker

    talker = load_torch_talker(ckpt, torch.device("cpu"), torch.float32)
    tensors = {f"talker.{k}": v.contiguous() for k, v in talker.state_dict().items()}
    del talker
    with tempfile.TemporaryDirectory(prefix="mlx-random-") as d:
        path = Path(d) / "model.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        del tensors
        state = read_prefixed(path, "talker.")
        mx.eval(state)  # materialize before the file goes away
    return state


def load_talker(ckpt: Checkpoint, dtype: mx.Dtype = mx.float32, *, contiguous: bool = True) -> Talker:
    """The talker (with its code predictor) of `ckpt`, floating tensors cast to `dtype`;
    `contiguous`: linear weights copied to [in, out] (the CPU layout, see engine.mlx.model)."""
    cfg = ckpt.config.talker
    if ckpt.is_random:
        state, where = _random_talker_tensors(ckpt), ckpt.name
    else:
        state, where = read_prefixed(ckpt.weights_file, "talker."), str(ckpt.weights_file)
    check_tensors(state, talker_shapes(cfg), where)
    state = {k: v.astype(dtype) for k, v in state.items()}
    talker = Talker(cfg, state, contiguous=contiguous)
    # Materialize now (concatenated q/k/v and gate/up, RoPE tables): loading errors surface here,
    # the per-key source arrays are released, and no lazy array made in this thread is left for
    # another to evaluate (MLX evaluates a graph on the stream of the thread that built it).
    mx.eval(arrays_of(talker))
    return talker


def arrays_of(obj: object) -> list[mx.array]:
    """Every mx.array held by `obj`, its attributes, lists and tuples, recursively."""
    if isinstance(obj, mx.array):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [a for item in obj for a in arrays_of(item)]
    if hasattr(obj, "__dict__"):
        return [a for value in vars(obj).values() for a in arrays_of(value)]
    return []
