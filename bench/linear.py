"""Benchmark cases `linear` and `matmul`: fastgpt.linear (the GEMM with its epilogue fused)
against eager PyTorch (F.linear, then the activation, then the add) and torch.compile of that
eager code; fastgpt.matmul against torch.matmul (cuBLAS on CUDA).

Variants of `linear`, shape M x N x K (x (M, K), weight (N, K); gated: (2N, K)):
  * gelu_tanh:  y = gelu_tanh(x W^T + b)         GPT-2's c_fc
  * residual:   y = x W^T + b + r                 GPT-2's c_proj with the block's residual add
  * swiglu:     y = silu(x Wg^T) * (x Wu^T)       a Llama MLP's gate and up projections
  * plain:      y = x W^T                         the GEMM alone (how close to cuBLAS it is)
  * mlp-fwd+bwd: GPT-2's MLP, forward and backward: y = c_proj(gelu_tanh(c_fc(x))) + x
    (shape M x C: c_fc C -> 4C, c_proj 4C -> C).
Work is 2*M*N*K FLOPs per GEMM (2N columns when gated; an MLP's backward 2x its forward); %
gemm is that rate over the device's torch.matmul rate at the dtype. Bytes: inputs read and
outputs written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.linear import _eager_linear

from .harness import Contender, Problem, Workload, check_shapes, standard_contenders

LINEAR_VARIANTS = ("gelu_tanh", "residual", "swiglu", "plain")
_ACTIVATION = {"gelu_tanh": "gelu_tanh", "residual": None, "swiglu": "swiglu", "plain": None}

# Default plans, rows of (dtype, variant, shape). CPU: GPT-2 124M's MLP at B x T = 4 x 1024
# (the CPU target: the epilogue is a visible share of the time at K = 768), fp32.
# GPU, bf16: GPT-2 124M at 8 x 1024 and GPT-2 XL's c_fc (1600 -> 6400), a Llama 7B MLP's
# SwiGLU (4096 -> 2 x 11008) at 4096 tokens, the plain GEMM at 4096^3 / 8192^3, and the GPT-2
# MLP forward + backward.
LINEAR_PLAN = {
    "cpu": [
        (torch.float32, "gelu_tanh", (4096, 3072, 768)),
        (torch.float32, "residual", (4096, 768, 3072)),
        (torch.float32, "mlp-fwd+bwd", (4096, 768)),
    ],
    "cuda": [
        (torch.bfloat16, "gelu_tanh", (8192, 3072, 768)),
        (torch.bfloat16, "residual", (8192, 768, 3072)),
        (torch.bfloat16, "gelu_tanh", (8192, 6400, 1600)),
        (torch.bfloat16, "swiglu", (4096, 11008, 4096)),
        (torch.bfloat16, "plain", (4096, 4096, 4096)),
        (torch.bfloat16, "plain", (8192, 8192, 8192)),
        (torch.bfloat16, "mlp-fwd+bwd", (8192, 768)),
    ],
}
LINEAR_QUICK = [("gelu_tanh", (64, 96, 32)), ("swiglu", (64, 96, 32)), ("mlp-fwd+bwd", (64, 32))]

MATMUL_PLAN = {
    "cpu": [(torch.float32, (2048, 2048, 2048))],
    "cuda": [(torch.bfloat16, (4096, 4096, 4096)), (torch.bfloat16, (8192, 8192, 8192)),
             (torch.bfloat16, (8192, 768, 3072))],
}
MATMUL_QUICK = [(64, 96, 32)]


def _plan_rows(plan, dtypes, custom_rows):
    """(dtype, *row) to run: `custom_rows` (--shape / --quick) in each requested dtype (default:
    the plan's first), else the plan's rows of the requested dtypes (a dtype the plan does not
    have runs every row of the plan in it)."""
    if custom_rows is not None:
        return [(d, *row) for d in dtypes or [plan[0][0]] for row in custom_rows]
    if not dtypes:
        return list(plan)
    return [row for row in plan if row[0] in dtypes] + [
        (d, *row[1:]) for d in dtypes if all(r[0] != d for r in plan) for row in plan]


def _randn(generator, device, dtype, *shape, scale=1.0, grad=False):
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype) * scale
    return x.requires_grad_(grad)


@dataclass(frozen=True)
class LinearCase:
    name: str = "linear"
    baselines: tuple[str, ...] = ("torch.eager", "torch.compile")

    def problems(
        self, device: str, dtypes: Sequence[torch.dtype] | None, quick: bool,
        shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> list[Problem]:
        check_shapes(self.name, shapes, (3,), "MxNxK with all >= 1")
        if shapes:
            quick_rows = [(v, s) for s in shapes for v in LINEAR_VARIANTS]
        else:
            quick_rows = LINEAR_QUICK if quick else None
        rows = _plan_rows(LINEAR_PLAN[device], dtypes, quick_rows)
        return [self._problem(variant, shape, dtype) for dtype, variant, shape in rows]

    @staticmethod
    def _problem(variant: str, shape: tuple[int, ...], dtype: torch.dtype) -> Problem:
        size = dtype.itemsize
        if variant == "mlp-fwd+bwd":
            m, c = shape
            flops = 3 * 2 * (2 * m * 4 * c * c)  # two GEMMs forward, four backward
            # x, the weights and y forward; dy in, dx and the weight gradients out backward
            bytes_ = (2 * m * c + 8 * c * c + 5 * c) * size * 2 + 2 * m * c * size
            return Problem(variant, shape, dtype, bytes_, flops, gemm_dtype=dtype)
        m, n, k = shape
        cols = 2 * n if variant == "swiglu" else n
        bytes_ = (m * k + cols * k + m * n) * size
        bytes_ += cols * size if variant in ("gelu_tanh", "residual") else 0  # bias
        bytes_ += m * n * size if variant == "residual" else 0
        return Problem(variant, shape, dtype, bytes_, 2 * m * cols * k, gemm_dtype=dtype)

    def workload(self, problem: Problem, device: str) -> Workload:
        g = torch.Generator(device=device).manual_seed(0)
        dtype = problem.dtype
        if problem.variant == "mlp-fwd+bwd":
            m, c = problem.shape
            x = _randn(g, device, dtype, m, c, grad=True)
            params = (_randn(g, device, dtype, 4 * c, c, scale=c ** -0.5, grad=True),
                      _randn(g, device, dtype, 4 * c, scale=0.1, grad=True),
                      _randn(g, device, dtype, c, 4 * c, scale=(4 * c) ** -0.5, grad=True),
                      _randn(g, device, dtype, c, scale=0.1, grad=True))
            return Workload((x, *params), (_randn(g, device, dtype, m, c),), with_forward=True)
        m, n, k = problem.shape
        cols = 2 * n if problem.variant == "swiglu" else n
        x = _randn(g, device, dtype, m, k)
        w = _randn(g, device, dtype, cols, k, scale=k ** -0.5)
        bias = _randn(g, device, dtype, cols, scale=0.1) if problem.variant in (
            "gelu_tanh", "residual") else None
        residual = _randn(g, device, dtype, m, n) if problem.variant == "residual" else None
        return Workload((x, w, bias, residual))

    def contenders(self, problem: Problem, device: str, compile: bool) -> list[Contender]:
        if problem.variant == "mlp-fwd+bwd":
            def eager(x, w1, b1, w2, b2):
                return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2) + x

            def fastgpt_fn(backend: str) -> Callable[..., Any]:
                def mlp(x, w1, b1, w2, b2):
                    h = fastgpt.linear(x, w1, b1, "gelu_tanh", backend=backend)
                    return fastgpt.linear(h, w2, b2, residual=x, backend=backend)
                return mlp

            return standard_contenders(eager, fastgpt_fn, device, compile)
        activation = _ACTIVATION[problem.variant]

        def eager(x, w, bias, residual):
            return _eager_linear(x, w, bias, activation, residual)

        def fastgpt_fn(backend: str) -> Callable[..., Any]:
            return lambda x, w, bias, residual: fastgpt.linear(x, w, bias, activation, residual,
                                                               backend=backend)

        return standard_contenders(eager, fastgpt_fn, device, compile)


@dataclass(frozen=True)
class MatmulCase:
    """fastgpt.matmul (M x N x K: a (M, K) @ b (K, N)) against torch.matmul (cuBLAS on CUDA;
    on the CPU fastgpt has no matmul kernel of its own and its rows say so)."""

    name: str = "matmul"
    baselines: tuple[str, ...] = ("torch.eager",)

    def problems(
        self, device: str, dtypes: Sequence[torch.dtype] | None, quick: bool,
        shapes: Sequence[tuple[int, ...]] | None = None,
    ) -> list[Problem]:
        check_shapes(self.name, shapes, (3,), "MxNxK with all >= 1")
        quick_rows = [(s,) for s in shapes] if shapes else ([(s,) for s in MATMUL_QUICK]
                                                            if quick else None)
        rows = _plan_rows(MATMUL_PLAN[device], dtypes, quick_rows)
        return [Problem("matmul", shape, dtype, (shape[0] * shape[2] + shape[2] * shape[1]
                                                 + shape[0] * shape[1]) * dtype.itemsize,
                        2 * shape[0] * shape[1] * shape[2], gemm_dtype=dtype)
                for dtype, shape in rows]

    def workload(self, problem: Problem, device: str) -> Workload:
        g = torch.Generator(device=device).manual_seed(0)
        m, n, k = problem.shape
        return Workload((_randn(g, device, problem.dtype, m, k),
                         _randn(g, device, problem.dtype, k, n, scale=k ** -0.5)))

    def contenders(self, problem: Problem, device: str, compile: bool) -> list[Contender]:
        # torch.compile of a lone matmul is the same cuBLAS call: not a separate contender.
        return standard_contenders(
            torch.matmul, lambda backend: lambda a, b: fastgpt.matmul(a, b, backend=backend),
            device, compile=False)


CASES = (LinearCase(), MatmulCase())
