"""fastgpt: fused transformer kernels (Triton, C++ and CUDA) as PyTorch custom ops.

Example::

    import torch, fastgpt
    x = torch.randn(8, 1024, 768)
    y = fastgpt.layer_norm(x, weight, bias)             # like F.layer_norm(x, (768,), ...)
    y, h = fastgpt.rms_norm(x, weight, residual=r)      # h = x + r, y = rms_norm(h)

Importing fastgpt loads neither the C++ extension nor Triton: each is loaded the first time
a backend needs it (see :func:`available_backends`).
"""
import torch  # noqa: F401  (fastgpt._C links against torch's libraries: torch loads first)

from . import nn
from .backends import BackendError, BackendStatus, available_backends, use_backend
from .attention import attention_with_kvcache, scaled_dot_product_attention
from .layernorm import layer_norm, rms_norm
from .linear import linear, matmul

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendStatus",
    "attention_with_kvcache",
    "available_backends",
    "layer_norm",
    "linear",
    "matmul",
    "nn",
    "rms_norm",
    "scaled_dot_product_attention",
    "use_backend",
]
