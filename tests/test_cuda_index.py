"""The index arithmetic of the CUDA kernels, run on the CPU.

The kernels themselves cannot run without a GPU, so their tile bookkeeping (swizzled shared
memory addresses, mma fragment coordinates, causal block bounds, split-KV partitions) lives in
small FASTGPT_HOST_DEVICE helpers (csrc/cuda/*_index.h). Each tests/cpp/*_test.cpp is compiled
with the host compiler against those headers and run; it checks the helpers against direct
definitions (brute force over the index space) and exits non-zero, naming the case, on the
first mismatch.
"""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPP_TESTS = sorted(glob.glob(os.path.join(ROOT, "tests", "cpp", "*_test.cpp")))
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def test_there_are_index_tests():
    assert CPP_TESTS, "no tests/cpp/*_test.cpp found"


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("src", CPP_TESTS, ids=os.path.basename)
def test_index_helpers(src, tmp_path):
    exe = tmp_path / "t"
    cmd = [CXX, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{os.path.join(ROOT, 'csrc')}",
           src, "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "checked" in run.stdout, run.stdout[-2000:]  # the test reports what it covered
