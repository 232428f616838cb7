"""The CPU process heap under large outputs: opt-in tools, not part of the harness.

glibc serves every allocation above its mmap threshold (at most 32 MB when left dynamic)
with a fresh mmap and unmaps it on free, and the kernel zero-fills each page at first touch.
Every contender allocates its outputs, so a default process pays that on each call. Default
benchmarks measure that, as users see it; this module offers the two ways to look past it:

- `warm_heap` (``fastgpt bench --warm-heap``): make glibc reuse freed blocks, so times are
  the kernels' own cost;
- `first_touch_rates` (``fastgpt bench --first-touch``): measure the write rate to fresh
  pages against resident ones, the floor that first touch puts under a default-heap run.

`setup` applies what a run asked for and returns the record that the run's results keep
(``result["cpu_heap"]``); `describe` renders that record as header lines.
"""

from __future__ import annotations

import ctypes
import statistics
import timeit
from typing import Any, Callable

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_MADV_HUGEPAGE = 14  # Linux
_HUGE_PAGE = 2 << 20
_FRESH_MIN_BYTES = 64 << 20  # twice glibc's largest mmap threshold (32 MiB)
FIRST_TOUCH_BYTES = 256 << 20  # the copy-bandwidth probe's buffer size (harness.FULL_TIMER)


def _libc_function(name: str) -> Any:
    """`name` from the C library already loaded in this process, or None."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def warm_heap() -> dict[str, Any]:
    """Make glibc's malloc reuse freed large buffers; call before allocating any tensor.

    Measured on a 2-core AMD EPYC VM: allocating and first-touching a 128 MB tensor costs
    ~45 ms while copying 128 MB into an existing buffer takes ~7-10 ms, and eager
    F.layer_norm at 8192x4096 fp32 takes ~45 ms in a default process and ~11.5 ms with a
    warm heap.

    Raises M_TRIM_THRESHOLD (freed memory stays in the heap) and M_MMAP_THRESHOLD (large
    blocks come from the heap); glibc versions that cap the threshold reject the latter
    (mallopt returns 0), and then M_MMAP_MAX=0 (no mmap at all) does the same job.
    Returns {"applied": bool, "detail": str}.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return {"applied": False, "detail": "no mallopt in this process's C library"}
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_TRIM_THRESHOLD, _INT_MAX) != 1:
        return {"applied": False, "detail": "mallopt(M_TRIM_THRESHOLD) rejected"}
    if mallopt(_M_MMAP_THRESHOLD, _INT_MAX) == 1:
        return {"applied": True, "detail": "mallopt M_TRIM_THRESHOLD=M_MMAP_THRESHOLD=2^31-1"}
    if mallopt(_M_MMAP_MAX, 0) == 1:
        return {"applied": True, "detail": "mallopt M_TRIM_THRESHOLD=2^31-1, M_MMAP_MAX=0"}
    return {"applied": False, "detail": "mallopt(M_MMAP_THRESHOLD) and mallopt(M_MMAP_MAX) rejected"}


def _advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask for transparent huge pages on the whole 2 MiB pages inside t's still-untouched
    buffer, as the native CPU ops do for their large outputs. False where that is refused."""
    begin = t.data_ptr()
    first = (begin + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    last = (begin + t.nbytes) & ~(_HUGE_PAGE - 1)
    madvise = _libc_function("madvise")
    if last <= first or madvise is None:
        return False
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise(first, last - first, _MADV_HUGEPAGE) == 0


def first_touch_rates(nbytes: int = FIRST_TOUCH_BYTES, repeats: int = 5) -> dict[str, Any]:
    """GB/s of writing every byte of a buffer (``fill_``) that was just allocated, so that
    each page is faulted in and zero-filled by the OS on first touch, against the same write
    to pages already resident. With the default heap every large output of every contender
    pays the first-touch rate, which caps "% copy" below 100 there (on the 2-core CI VM: a
    fresh 128 MiB output costs about as much as reading and writing 128 MiB).

    Keys: "bytes" (the buffer's size), "resident", "fresh_4k" (pages as allocated),
    "fresh_huge" (after MADV_HUGEPAGE; None where refused); medians over `repeats` writes
    (each to a new buffer for the fresh rates). `nbytes` is raised to 64 MiB: glibc may serve
    smaller blocks from its heap, on pages that are already resident. Meaningless on a warm
    heap, where "fresh" buffers are reused ones.
    """
    nbytes = max(nbytes, _FRESH_MIN_BYTES)

    def rate(buffers: Callable[[], torch.Tensor | None]) -> float | None:
        times = []
        for _ in range(repeats):
            buf = buffers()
            if buf is None:
                return None
            start = timeit.default_timer()
            buf.fill_(1)
            times.append(timeit.default_timer() - start)
        return nbytes / statistics.median(times) / 1e9

    def new(huge: bool) -> torch.Tensor | None:
        buf = torch.empty(nbytes, dtype=torch.uint8)
        return None if huge and not _advise_huge_pages(buf) else buf

    resident = torch.zeros(nbytes, dtype=torch.uint8)
    return {"bytes": nbytes, "resident": rate(lambda: resident),
            "fresh_4k": rate(lambda: new(False)), "fresh_huge": rate(lambda: new(True))}


def setup(warm: bool, first_touch: bool) -> dict[str, Any]:
    """Apply what a CPU run asked for, before it allocates any benchmark tensor (mallopt only
    governs later blocks), and return the run's record: {"requested", "applied", "detail"}
    of the warm heap, plus "first_touch_gbps" (`first_touch_rates`, or None if not asked).
    The two exclude each other: on a warm heap no buffer is fresh."""
    if warm and first_touch:
        raise ValueError("the first-touch probe needs the default heap, not a warm one")
    heap = warm_heap() if warm else {"applied": False, "detail": "default glibc malloc"}
    return {"requested": warm, **heap, "first_touch_gbps": first_touch_rates() if first_touch else None}


def describe(record: dict[str, Any]) -> list[str]:
    """Header lines for a run's record from `setup`."""
    if record["applied"]:
        return [f"heap: warm ({record['detail']}): freed buffers are reused, so times exclude "
                "first-touch page faults of fresh outputs: the kernels' own cost"]
    lines = [f"heap: default ({record['detail']}): each output over 32 MB is a fresh mmap that "
             "the OS zero-fills on first touch; times include that, as users see it"]
    touch = record["first_touch_gbps"]
    if touch:
        def rate(key: str) -> str:
            return "refused" if touch[key] is None else f"{touch[key]:.1f} GB/s"

        lines.append(f"first touch (fill_ of a new {touch['bytes'] >> 20} MiB buffer): "
                     f"{rate('fresh_4k')} with 4 KiB pages, {rate('fresh_huge')} with huge "
                     f"pages, against {rate('resident')} on resident pages")
    return lines


__all__ = ["FIRST_TOUCH_BYTES", "describe", "first_touch_rates", "setup", "warm_heap"]
