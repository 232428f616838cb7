"""Accuracy checks shared by fastgpt's tests and benchmarks.

One rule, from FlashAttention's test suite: at a given dtype, fastgpt's max error against a
float64 reference may be at most twice eager PyTorch's max error at that dtype, plus a small
floor; NaN must appear exactly where the reference has it.
"""
from __future__ import annotations

from typing import Any

import torch

# The check's floor per output dtype, times the float64 reference's RMS: the error allowed
# even where eager's own error is near zero, about one ulp of a typical element. Relative
# to the RMS because gradients such as dweight/dbias are sums over all rows, whose
# magnitude grows with the row count. Eager is not always the accurate one: measured here
# (torch 2.13 CPU, 8192x4096 bf16) eager LayerNorm's dweight/dbias are off by ~40 at
# magnitude ~300 (bf16 accumulation), which is why the reference is float64 and eager's
# error only sets the budget.
CHECK_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.bfloat16: 4e-3,
    torch.float16: 5e-4,
}


def as_tuple(out: Any) -> tuple:
    """A tensor, None or a tuple/list of them, as a tuple."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def compare(out: Any, eager: Any, reference: Any, atol: float = 0.0) -> str | None:
    """None if `out` passes the check, else a one-line description of the first failure.

    `eager` is eager PyTorch's output at the same dtype and `reference` eager's output on
    float64 inputs (each a tensor, None, or a tuple of them). Per output: same dtype and
    shape as eager's, NaN exactly where the reference has NaN, and
    max|out - reference| <= 2 * max|eager - reference| + CHECK_TOLERANCE[dtype] * RMS(reference)
    + atol. `atol` is for outputs the math makes exactly zero where eager's arithmetic is exact
    too but a fused kernel's is not (attention's dq and dk with a single key: softmax over one
    element has zero gradient); give it on the scale of the inputs.
    """
    outs, eagers, refs = as_tuple(out), as_tuple(eager), as_tuple(reference)
    if len(outs) != len(eagers):
        return f"returned {len(outs)} outputs, eager {len(eagers)}"
    for i, (a, e, r) in enumerate(zip(outs, eagers, refs)):
        if a is None or e is None:
            if a is not e:
                return f"output {i}: {type(a).__name__}, eager {type(e).__name__}"
            continue
        if a.dtype != e.dtype or a.shape != e.shape:
            return f"output {i}: {a.dtype} {tuple(a.shape)}, eager {e.dtype} {tuple(e.shape)}"
        r = r.detach().double()
        nan = torch.isnan(r)
        if not torch.equal(torch.isnan(a.detach()), nan):
            return f"output {i}: NaN where the float64 reference has none, or the reverse"
        finite = ~nan

        def max_error(t: torch.Tensor) -> float:
            diff = (t.detach().double() - r)[finite].abs()
            return diff.max().item() if diff.numel() else 0.0

        rms = r[finite].square().mean().sqrt().item() if finite.any() else 0.0
        floor = CHECK_TOLERANCE.get(e.dtype, CHECK_TOLERANCE[torch.float32]) * rms + atol
        error, eager_error = max_error(a), max_error(e)
        if not error <= 2 * eager_error + floor:  # `not <=`: a NaN error fails too
            return (
                f"output {i}: max error {error:.3g} vs the float64 reference; allowed "
                f"{2 * eager_error + floor:.3g} (2 x eager's {eager_error:.3g} + floor {floor:.3g})"
            )
    return None


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False,
                    scale: float | None = None,
                    attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention as eager PyTorch writes it, the L x S softmax materialised, in the inputs' dtype:
    in float64 the reference of fastgpt's attention tests and benchmarks, at a low precision the
    "eager" of the accuracy rule, and the eager baseline of ``fastgpt bench attention``.

    q ``(..., Hq, L, E)``, k ``(..., Hk, S, E)``, v ``(..., Hk, S, Ev)``; kv heads that divide
    Hq are repeated to it (GQA); causal is torch's top-left ``tril``; a bool mask is True where
    attention is allowed, a float mask is added to the scores. A row with no visible key gives
    NaN here (torch's SDPA gives zeros); the tests compare such rows with torch itself.
    """
    hq = q.shape[-3] if q.dim() >= 3 else 1
    hk = k.shape[-3] if k.dim() >= 3 else 1
    if hq != hk and hk != 1:
        k = k.repeat_interleave(hq // hk, dim=-3)
        v = v.repeat_interleave(hq // hk, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        visible = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else scores + attn_mask)
    return torch.softmax(scores, dim=-1) @ v
