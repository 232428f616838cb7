"""fastgpt benchmarks (installed as ``fastgpt.bench``; run with ``fastgpt bench``).

``CASES`` maps each case name to its definition; ``harness`` holds the measurement core
(check, timing, device ceilings, result files) that every case shares. ``cpuheap`` (CPU
heap settings and the first-touch probe) is optional and imported only by runs that ask.
"""

from .harness import (
    DTYPES,
    Session,
    failed_rows,
    render_header,
    render_markdown,
    render_table,
    run_case,
    write_results,
)
from .attention import CASES as _ATTENTION_CASES
from .layernorm import CASES as _NORM_CASES
from .linear import CASES as _LINEAR_CASES
from .model import CASES as _MODEL_CASES

CASES = {case.name: case for case in _NORM_CASES + _ATTENTION_CASES + _LINEAR_CASES + _MODEL_CASES}

__all__ = [
    "CASES",
    "DTYPES",
    "Session",
    "failed_rows",
    "render_header",
    "render_markdown",
    "render_table",
    "run_case",
    "write_results",
]
