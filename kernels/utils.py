"""Launch helpers shared by every Triton kernel module (block sizes, warps, devices, layouts)."""

import contextlib
import functools
import os

import torch


def interpreting():
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET set)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch(tuned, grid, *args, interpreter_config, **meta):
    """Launch an autotuned kernel; under the interpreter its kernel with one fixed config (the
    interpreter would autotune by running every config, at numpy speed)."""
    if interpreting():
        tuned.fn[grid](*args, **meta, **interpreter_config.all_kwargs())
    else:
        tuned[grid](*args, **meta)


@functools.lru_cache(maxsize=None)
def sm_count(device_index):
    """SM count of a CUDA device, cached: the property query is too slow for every launch."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def warps_for(block_elems, element_size, bytes_per_warp=1024, max_warps=16):
    """Warps for a program that streams `block_elems` elements of `element_size` bytes: one warp
    per `bytes_per_warp` (1 KiB is 32 bytes per thread, two 16-byte vector loads in flight),
    between 1 and `max_warps`."""
    return min(max(block_elems * element_size // bytes_per_warp, 1), max_warps)


def on_device(t):
    """Triton launches on the current CUDA device: make it the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_rows(name, t, shape, dtype=None, contiguous=False):
    """Assert the layout a launcher relies on: `t` is 2-D of `shape`, unit column stride (or
    fully contiguous), of `dtype` if given; so a wrong stride can never read out of bounds."""
    assert t.dim() == 2 and tuple(t.shape) == tuple(shape), f"{name}: shape {tuple(t.shape)}, want {tuple(shape)}"
    assert dtype is None or t.dtype == dtype, f"{name}: dtype {t.dtype}, want {dtype}"
    if contiguous:
        assert t.is_contiguous(), f"{name} must be contiguous, strides {t.stride()}"
    else:
        # Rows may overlap (a broadcast row dimension has stride 0): inputs are only read.
        assert t.stride(1) == 1 or t.shape[1] == 1, f"{name} must have unit column stride, strides {t.stride()}"


def check_vector(name, t, n):
    """Assert a parameter is None or n contiguous elements."""
    assert t is None or (t.dim() == 1 and t.shape[0] == n and t.is_contiguous()), (
        f"{name} must be None or contiguous ({n},), got {tuple(t.shape)} strides {t.stride()}"
    )
