"""Drop-in modules: same constructor arguments and state_dict keys as torch.nn.

Both subclass their torch.nn counterpart, so checkpoints load unchanged and
``isinstance(m, torch.nn.LayerNorm)`` still holds; only ``forward`` differs: it runs fastgpt's
op and also accepts a ``residual`` for the fused pre-norm add.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .layernorm import NormOutput, layer_norm, rms_norm


def _flatten_last(t: torch.Tensor, k: int) -> torch.Tensor:
    """Merge the last k dims: normalising over k dims equals normalising over their product."""
    return t if k == 1 else t.reshape(*t.shape[: t.dim() - k], -1)


class _FusedNorm:
    """The forward shared by both modules (mixin; the torch.nn parent holds the state)."""

    backend: Optional[str] = None

    def _run(self, fn, x, residual, eps, **params) -> NormOutput:
        shape = tuple(self.normalized_shape)
        k = len(shape)
        if tuple(x.shape[x.dim() - k:]) != shape:
            raise ValueError(f"{type(self).__name__}: input's last dims {tuple(x.shape)} do not "
                             f"match normalized_shape {shape}")
        params = {name: (p.reshape(-1) if p is not None else None) for name, p in params.items()}
        out = fn(_flatten_last(x, k),
                 residual=_flatten_last(residual, k) if residual is not None else None,
                 eps=eps, backend=self.backend, **params)
        if residual is None:
            return out.view(x.shape)
        y, h = out
        return y.view(x.shape), h.view(x.shape)


class LayerNorm(_FusedNorm, torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` on fastgpt's fused kernel.

    ``forward(x, residual=None)``: x is ``(..., *normalized_shape)``. With a residual of x's
    shape it returns ``(norm(x + residual), x + residual)`` from one pass.
    ``backend`` (attribute, default None) pins a backend for this module.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> NormOutput:
        return self._run(layer_norm, x, residual, weight=self.weight, bias=self.bias,
                         eps=self.eps)


class RMSNorm(_FusedNorm, torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` on fastgpt's fused kernel.

    ``eps=None`` means ``torch.finfo(x.dtype).eps``, as in torch. ``forward(x, residual=None)``
    as for :class:`LayerNorm`.
    """

    def __init__(self, normalized_shape, eps: Optional[float] = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *,
                 backend: Optional[str] = None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> NormOutput:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return self._run(rms_norm, x, residual, weight=self.weight, eps=eps)


__all__ = ["LayerNorm", "RMSNorm"]
