"""Triton kernels, one module per op; installed as `fastgpt.kernels` (imports only torch and triton)."""
