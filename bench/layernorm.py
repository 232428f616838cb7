"""Benchmark cases `layernorm` and `rmsnorm`: one parametrised definition, two instances.

Variants: fwd (y = norm(x)), fwd+grad (the same forward on inputs that require grad: what a
training step's forward costs, autograd recording its graph included; only the forward is
timed), fwd+residual (h = x + r; (norm(h), h) in one pass), and the backward of each fused
forward (bwd, bwd+residual: only torch.autograd.grad is timed). Weights (and the LayerNorm
bias) have x's dtype, as in a model stored in that dtype. The ops are memory bound, so the
work is bytes only and the ceiling is the measured copy bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

import fastgpt

from .harness import Contender, Problem, Workload, check_shapes, standard_contenders

VARIANTS = ("fwd", "fwd+grad", "fwd+residual", "bwd", "bwd+residual")
BANDWIDTH_VARIANTS = ("fwd", "fwd+residual", "bwd", "bwd+residual")
CALL_VARIANTS = ("fwd", "fwd+grad")  # where a call's fixed cost is most of its time

# Default plan per device: rows of (dtype, (rows, hidden), variants). CPU: the foundation
# issue's bandwidth target, and the call-overhead target, a decode step (8 x 768 fp32): a
# fastgpt forward within 2x of eager's, with and without requires_grad. fwd+grad is left
# out of the large rows: there autograd's bookkeeping (microseconds) is lost in a kernel of
# tens of milliseconds, and each row costs the sweep a torch.compile and seconds of timing
# per contender. GPU: bf16 at hidden 4096 and 8192 with enough rows that each activation
# (128 MB) is over twice the L2 (H100 50 MB, H200 60 MB), plus fp32 at hidden 4096.
PLAN = {
    "cpu": [
        (torch.float32, (8192, 4096), BANDWIDTH_VARIANTS),
        (torch.bfloat16, (8192, 4096), BANDWIDTH_VARIANTS),
        (torch.float32, (8, 768), CALL_VARIANTS),
    ],
    "cuda": [
        (torch.bfloat16, (16384, 4096), BANDWIDTH_VARIANTS),
        (torch.bfloat16, (8192, 8192), BANDWIDTH_VARIANTS),
        (torch.float32, (16384, 4096), BANDWIDTH_VARIANTS),
    ],
}
QUICK_SHAPES = [(64, 256)]  # --quick: a smoke test of the whole path (every variant) in seconds


def _layer_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(h, h.shape[-1:], weight, bias, eps)


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, bias: None, eps: float) -> torch.Tensor:
    return F.rms_norm(h, h.shape[-1:], weight, eps)


@dataclass(frozen=True)
class NormCase:
    """A normalisation over the last dim, benchmarked against eager PyTorch.

    `centered` is LayerNorm (subtracts the mean, has a bias, saves mean and rstd for the
    backward); RMSNorm has none of these and saves rstd only.
    """

    name: str  # case name, as in `fastgpt bench <name>`
    op: str  # the fastgpt function: fastgpt.<op>
    eager_norm: Callable[..., torch.Tensor]  # (h, weight, bias, eps) -> y in eager PyTorch
    centered: bool
    eps: float  # the fastgpt op's default
    baselines: tuple[str, ...] = ("torch.eager", "torch.compile")

    def problems(
        self, device: str, dtypes: Sequence[torch.dtype] | None, quick: bool,
        shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> list[Problem]:
        check_shapes(self.name, shapes, (2,), "ROWSxHIDDEN with both >= 1")
        plan = PLAN[device]
        plan_dtypes = list(dict.fromkeys(d for d, _, _ in plan))
        if shapes or quick:  # the user's shapes, or the smoke test: every variant of each
            rows = [(d, shape, VARIANTS) for d in dtypes or plan_dtypes for shape in shapes or QUICK_SHAPES]
        else:  # a dtype outside the device's plan is run at the rows of the plan's first dtype
            rows = [(d, shape, variants)
                    for d in dtypes or plan_dtypes
                    for plan_dtype, shape, variants in plan
                    if plan_dtype == (d if d in plan_dtypes else plan_dtypes[0])]
        return [
            Problem(variant, shape, dtype, self.bytes(variant, *shape, dtype))
            for dtype, shape, variants in rows
            for variant in variants
        ]

    def bytes(self, variant: str, rows: int, hidden: int, dtype: torch.dtype) -> int:
        """Least traffic of `variant`: each input read once, each output written once."""
        act = rows * hidden * dtype.itemsize  # one activation-sized tensor
        vec = hidden * dtype.itemsize  # weight, bias and their gradients
        residual = variant.endswith("+residual")
        if variant.startswith("fwd"):
            # read x (and residual), weight (and bias); write y (and h)
            return act * (4 if residual else 2) + vec * (2 if self.centered else 1)
        # read dy, the normalised input (x, or h), weight and the per-row statistics (fp32,
        # fp64 for fp64 inputs), and dh with a residual; write dx, dweight (and dbias). dx
        # is also the residual's gradient: one tensor, counted once.
        stat = max(dtype.itemsize, torch.float32.itemsize)
        stats = rows * stat * (2 if self.centered else 1)
        return act * (4 if residual else 3) + vec * (3 if self.centered else 2) + stats

    def workload(self, problem: Problem, device: str) -> Workload:
        rows, hidden = problem.shape
        generator = torch.Generator(device=device).manual_seed(0)
        backward = problem.variant.startswith("bwd")
        requires_grad = backward or problem.variant == "fwd+grad"

        def randn(*shape: int, scale: float = 1.0, shift: float = 0.0, leaf: bool = True) -> torch.Tensor:
            t = torch.randn(shape, generator=generator, device=device, dtype=problem.dtype)
            return (t * scale + shift).requires_grad_(requires_grad and leaf)

        x = randn(rows, hidden)
        residual = randn(rows, hidden) if problem.variant.endswith("+residual") else None
        # Random affine parameters near a trained model's, never ones and zeros, which can
        # hide a parameter that is read wrongly (or not at all).
        weight = randn(hidden, scale=0.1, shift=1.0)
        bias = randn(hidden, scale=0.1) if self.centered else None
        grad_outputs = None
        if backward:
            n_outputs = 1 if residual is None else 2  # y, and h with a residual
            grad_outputs = tuple(randn(rows, hidden, leaf=False) for _ in range(n_outputs))
        return Workload((x, weight, bias, residual), grad_outputs)

    def contenders(self, problem: Problem, device: str, compile: bool) -> list[Contender]:
        return standard_contenders(self._eager(), self._fastgpt, device, compile)

    def _eager(self) -> Callable[..., Any]:
        """The eager PyTorch function users would write: reference, baseline and the input
        of torch.compile."""
        norm, eps = self.eager_norm, self.eps

        def eager(x, weight, bias, residual):
            h = x if residual is None else x + residual
            y = norm(h, weight, bias, eps)
            return y if residual is None else (y, h)

        return eager

    def _fastgpt(self, backend: str) -> Callable[..., Any]:
        op, eps, centered = getattr(fastgpt, self.op), self.eps, self.centered

        def call(x, weight, bias, residual):
            params = (weight, bias) if centered else (weight,)
            return op(x, *params, eps=eps, residual=residual, backend=backend)

        return call


CASES = (
    NormCase("layernorm", "layer_norm", _layer_norm, centered=True, eps=1e-5),
    NormCase("rmsnorm", "rms_norm", _rms_norm, centered=False, eps=1e-6),
)
