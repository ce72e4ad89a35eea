"""Layers shared by the talker, the code predictor and the codec decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the compute dtype, then scaled, as the official
    models do (one fused kernel instead of pow/mean/rsqrt/mul)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        h = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        return self.weight * h.to(x.dtype)
