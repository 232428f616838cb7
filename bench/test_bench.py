"""pytest-benchmark suite over the same cases as ``fastgpt bench``.

    pytest bench/test_bench.py                          # small shapes (--quick's)
    FASTGPT_BENCH_FULL=1 pytest bench/test_bench.py     # the CLI's full shapes
    pytest bench/test_bench.py --benchmark-disable      # checks only, each call run once

One test per case x problem (variant, shape, dtype) x contender: eager PyTorch and each
fastgpt backend usable on the device (CUDA if available, else CPU), and the case's other
contenders (torch's SDPA, transformers' model, ...). Each checked test first checks its output
as the CLI does (the case's check, by default: error against eager run in float64 at most twice
eager's own error), then times. pytest-benchmark times with a wall clock, so on CUDA each
call synchronizes; prefer ``fastgpt bench`` (CUDA events) for reported numbers. Tests
are grouped per problem, so pytest-benchmark's table compares the contenders of one
problem side by side.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from . import CASES  # noqa: E402  (after the skip: the suite needs the plugin)
import fastgpt  # noqa: E402
from fastgpt.testing import compare  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FULL = os.environ.get("FASTGPT_BENCH_FULL", "0") == "1"


def _params() -> list:
    params = []
    for case in CASES.values():
        for problem in case.problems(DEVICE, None, quick=not FULL):
            for index, contender in enumerate(case.contenders(problem, DEVICE, compile=False)):
                test_id = f"{case.name}-{problem.label.replace(' ', '-')}-{contender.name}"
                params.append(pytest.param(case.name, problem, index, id=test_id))
    return params


@pytest.mark.parametrize("case_name, problem, index", _params())
def test_bench(benchmark, case_name, problem, index):
    case = CASES[case_name]
    workload = case.workload(problem, DEVICE)
    contenders = case.contenders(problem, DEVICE, compile=False)
    run = workload.runner(contenders[index].fn)
    try:
        out = run()
    except fastgpt.BackendError as e:  # the CLI's "unsupported": refused by design
        pytest.skip(f"{contenders[index].name}: {e}")
    if contenders[index].checked:
        eager = workload.runner(contenders[0].fn)()
        reference = workload.upcast(torch.float64).runner(contenders[0].fn)()
        mismatch = (contenders[index].check or compare)(out, eager, reference)
        assert mismatch is None, f"{contenders[index].name}: {mismatch}"
    del out

    if DEVICE == "cuda":

        def timed():
            run()
            torch.cuda.synchronize()

    else:
        timed = run
    benchmark.group = f"{case_name} {problem.label}"
    benchmark.extra_info.update(contender=contenders[index].name, bytes=problem.bytes)
    benchmark(timed)
    if benchmark.stats is not None:  # None under --benchmark-disable: one untimed call
        benchmark.extra_info["GB/s"] = problem.bytes / benchmark.stats.stats.median / 1e9
