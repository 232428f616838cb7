"""The Triton kernels compile for sm_90a, as a GPU launch would compile them, with or without
a GPU here; and they stay inside the register budget that kernels/layernorm.py documents.

The interpreter (which runs the Triton tests on CPU) accepts programs the compiler rejects,
and cannot say anything about registers; tests/triton_sm90.py compiles the real launch
variants to cubin in a separate process (the interpreter owns the kernels in this one).
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import triton_sm90  # noqa: E402

# Spill budget of the backward (kernels/layernorm.py, "Register budget"): a few registers' worth
# where a row of 8192 fp32 sits in registers, not the hundreds of bytes a longer row would cost.
BWD_MAX_SPILL_BYTES = 32


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # A fresh cache: every variant really goes through the compiler and ptxas.
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "triton_sm90.py")], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _case_key(op, dtype, hidden, opts):
    return (op, dtype, hidden, tuple(sorted(opts.items())))


def test_every_launch_variant_compiles_for_sm90(compiled):
    expected = {_case_key(op, dt, n, opts) for dt, n, op, opts in triton_sm90._cases()}
    seen = {_case_key(r["op"], r["dtype"], r["hidden"],
                      {k: r[k] for k in ("rms", "residual", "dh", "affine", "params_fp32") if k in r})
            for r in compiled}
    assert seen == expected
    assert {r["arch"] for r in compiled} == {90}
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {"_norm_fwd_kernel", "_norm_bwd_kernel", "_norm_bwd_row_terms_kernel"}


def test_forward_kernels_do_not_spill(compiled):
    spilled = [r for r in compiled if r["op"] == "fwd" and r["spill_store_bytes"]]
    assert not spilled, spilled


def test_backward_kernels_stay_within_the_spill_budget(compiled):
    over = [r for r in compiled
            if r["op"] == "bwd" and r["spill_store_bytes"] > BWD_MAX_SPILL_BYTES]
    assert not over, over
