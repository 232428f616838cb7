"""The Triton kernels compile for sm_90a, as a GPU launch would compile them, with or without
a GPU here; and they stay inside the resource budgets their modules document.

The interpreter (which runs the Triton tests on CPU) accepts programs the compiler rejects,
and cannot say anything about registers, shared memory or instructions; tests/triton_sm90.py
compiles the real launch variants to cubin in separate processes (the interpreter owns the
kernels in this one).
"""
import json
import os
import subprocess
import sys

import pytest

from fastgpt.kernels import attention, linear

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import triton_sm90  # noqa: E402

# The kernels each op's launchers compile.
KERNELS = {
    "layernorm": {"_norm_fwd_kernel", "_norm_bwd_kernel", "_norm_bwd_row_terms_kernel"},
    "attention": {"_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
                  "_attn_bwd_dq_kernel"},
    "attention_with_kvcache": {"_attn_kvcache_split_kernel", "_attn_kvcache_combine_kernel"},
    "linear": {"_gemm_kernel", "_act_bwd_kernel"},
}

# Spill budget of the layernorm backward (kernels/layernorm.py, "Register budget"): a few
# registers' worth where a row of 8192 fp32 sits in registers, not the hundreds of bytes a
# longer row would cost.
NORM_BWD_MAX_SPILL_BYTES = 32

# The attention kernels that hold tiles for tl.dot, by the name kernels/attention.py's config
# tables use for them.
ATTN_DOT_KERNELS = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv",
                    "_attn_bwd_dq_kernel": "dq"}

# Shared memory a thread block may use on an H100 (sm_90: 227 KiB of the SM's 228 KiB).
SM90_MAX_SHARED_BYTES = 227 * 1024

# Spill budget of the attention kernels per dtype. 16-bit: none. fp32 (exact products on the
# FMA units, the accurate path rather than the fast one): ptxas keeps the dk/dv kernel at ~80
# registers with 8 warps and spills 8-12 bytes in the non-causal variant (seen at head dims 64
# and 128, triton 3.9), a couple of registers' worth; larger tiles spill kilobytes instead.
ATTN_MAX_SPILL_BYTES = {"fp16": 0, "bf16": 0, "fp32": 16}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    # A fresh cache: every variant really goes through the compiler and ptxas.
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    jobs = max(1, min(os.cpu_count() or 1, 4))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "triton_sm90.py"), "--jobs", str(jobs)],
        env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _case_key(suite, case):
    return suite, json.dumps(case, sort_keys=True)


def _suite(compiled, name):
    return [r for r in compiled if r["suite"] == name]


def _config_key(config):
    return config["BLOCK_M"], config["BLOCK_N"], config["num_warps"], config["num_stages"]


def test_every_launch_variant_compiles_for_sm90(compiled):
    expected = {_case_key(suite, case) for suite, case in triton_sm90.cases()}
    seen = {_case_key(r["suite"], r["case"]) for r in compiled}
    assert seen == expected
    assert {r["arch"] for r in compiled} == {90}


@pytest.mark.parametrize("suite", sorted(KERNELS))
def test_each_op_compiles_all_its_kernels(compiled, suite):
    assert {r["kernel"] for r in _suite(compiled, suite)} == KERNELS[suite]


def test_layernorm_forward_kernels_do_not_spill(compiled):
    spilled = [r for r in _suite(compiled, "layernorm")
               if r["case"]["op"] == "fwd" and r["spill_store_bytes"]]
    assert not spilled, spilled


def test_layernorm_backward_kernels_stay_within_the_spill_budget(compiled):
    over = [r for r in _suite(compiled, "layernorm")
            if r["case"]["op"] == "bwd" and r["spill_store_bytes"] > NORM_BWD_MAX_SPILL_BYTES]
    assert not over, over


def test_attention_compiles_every_config_its_autotuner_can_pick(compiled):
    records = _suite(compiled, "attention")
    for name, kernel in ATTN_DOT_KERNELS.items():
        # Every config of the kernel's tables is compiled somewhere...
        seen = {_config_key(r["config"]) for r in records if r["kernel"] == name}
        assert seen == {_config_key(dict(c.kwargs, num_warps=c.num_warps,
                                         num_stages=c.num_stages))
                        for c in attention._configs(kernel)}, name
        # ...and a case compiled at full strength compiles the whole table row of its launch.
        for key, case in {_case_key("attention", r["case"]): r["case"] for r in records}.items():
            if case["configs"] != "all" or (name == "_attn_fwd_kernel") != (case["op"] == "fwd"):
                continue
            block = attention._block(case["head_dim"])
            size = triton_sm90.DTYPES[case["dtype"]].itemsize
            want = [_config_key(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
                    for c in attention._configs_for(kernel, block, block, size)]
            got = [_config_key(r["config"]) for r in records
                   if r["kernel"] == name and _case_key("attention", r["case"]) == key]
            assert got == want, (name, case)


def test_attention_16bit_dots_run_on_tensor_cores(compiled):
    dots = [r for r in _suite(compiled, "attention") if r["kernel"] in ATTN_DOT_KERNELS]
    assert {r["case"]["dtype"] for r in dots} == {"fp16", "bf16", "fp32"}
    missing = [r for r in dots if r["case"]["dtype"] != "fp32" and not r["tensor_cores"]]
    assert not missing, missing
    # fp32 asks for exact products (input_precision="ieee"): a tensor-core dot there would be
    # tf32, 10 mantissa bits.
    tf32 = [r for r in dots if r["case"]["dtype"] == "fp32" and r["tensor_cores"]]
    assert not tf32, tf32


@pytest.mark.parametrize("suite", ["attention", "attention_with_kvcache"])
def test_attention_shared_memory_fits_an_h100_block(compiled, suite):
    over = [r for r in _suite(compiled, suite) if r["shared"] > SM90_MAX_SHARED_BYTES]
    assert not over, over


@pytest.mark.parametrize("suite", ["attention", "attention_with_kvcache"])
def test_attention_kernels_stay_within_the_spill_budget(compiled, suite):
    over = [r for r in _suite(compiled, suite)
            if r["spill_store_bytes"] > ATTN_MAX_SPILL_BYTES[r["case"]["dtype"]]]
    assert not over, over


def _kvcache_config_key(config):
    return config["BLOCK_N"], config["num_warps"], config["num_stages"]


def test_kvcache_compiles_every_config_its_autotuner_can_pick(compiled):
    splits = [r for r in _suite(compiled, "attention_with_kvcache")
              if r["kernel"] == "_attn_kvcache_split_kernel"]
    want_all = {_kvcache_config_key(dict(c.kwargs, num_warps=c.num_warps,
                                         num_stages=c.num_stages))
                for c in attention._kvcache_configs()}
    assert {_kvcache_config_key(r["config"]) for r in splits} == want_all
    for key, case in {_case_key("attention_with_kvcache", r["case"]): r["case"]
                      for r in splits}.items():
        if case["configs"] != "all":
            continue
        block = attention._block(case["head_dim"])
        size = triton_sm90.DTYPES[case["dtype"]].itemsize
        want = [_kvcache_config_key(dict(c.kwargs, num_warps=c.num_warps,
                                         num_stages=c.num_stages))
                for c in attention._kvcache_configs_for(block, block, size)]
        got = [_kvcache_config_key(r["config"]) for r in splits
               if _case_key("attention_with_kvcache", r["case"]) == key]
        assert got == want, case


def test_kvcache_16bit_dots_run_on_tensor_cores(compiled):
    splits = [r for r in _suite(compiled, "attention_with_kvcache")
              if r["kernel"] == "_attn_kvcache_split_kernel"]
    assert {r["case"]["dtype"] for r in splits} == {"fp16", "bf16", "fp32"}
    missing = [r for r in splits if r["case"]["dtype"] != "fp32" and not r["tensor_cores"]]
    assert not missing, missing
    tf32 = [r for r in splits if r["case"]["dtype"] == "fp32" and r["tensor_cores"]]
    assert not tf32, tf32


def _gemm_config_key(config):
    return (config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["GROUP_M"],
            config["num_warps"], config["num_stages"])


def test_linear_compiles_every_config_its_autotuner_can_pick(compiled):
    gemms = [r for r in _suite(compiled, "linear") if r["kernel"] == "_gemm_kernel"]
    want = {_gemm_config_key(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
            for c in linear._configs()}
    assert {_gemm_config_key(r["config"]) for r in gemms} == want
    # each full-strength case compiles exactly the configs its launch's pruning keeps
    for r0 in gemms:
        case = r0["case"]
        if case["configs"] != "all":
            continue
        size = triton_sm90.DTYPES[case["dtype"]].itemsize
        row = [_gemm_config_key(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
               for c in linear._configs_for(size, case["act"] in linear.GATED,
                                            persistent=case["op"] == "gemm_persistent",
                                            tma=case["tma"] is not None, act=case["act"])]
        assert [_gemm_config_key(r["config"]) for r in gemms if r["case"] == case] == row, case


def test_linear_16bit_gemms_use_wgmma_and_fp32_follows_tf32(compiled):
    gemms = [r for r in _suite(compiled, "linear") if r["kernel"] == "_gemm_kernel"]
    # Hopper's warpgroup MMA for every 16-bit tile big enough for it (a warp group holds 64
    # rows: BLOCK_M = 16, the decode-sized tiles, runs on mma.sync).
    no_wgmma = [r for r in gemms if r["case"]["dtype"] != "fp32" and r["config"]["BLOCK_M"] >= 64
                and not r["wgmma"]]
    assert not no_wgmma, no_wgmma
    assert all(r["tensor_cores"] for r in gemms if r["case"]["dtype"] != "fp32")
    # fp32 reaches tensor cores (tf32) only when allow_tf32 says so; else exact FMA products.
    for r in gemms:
        if r["case"]["dtype"] == "fp32":
            assert r["tensor_cores"] == (r["case"]["precision"] == "tf32"), r


def test_linear_tma_variants_load_through_tma(compiled):
    gemms = [r for r in _suite(compiled, "linear") if r["kernel"] == "_gemm_kernel"]
    tma = [r for r in gemms if r["case"]["tma"] is not None]
    # per tile and persistent, plain and gated, 16-bit, every config
    assert {(r["case"]["op"], r["case"]["act"] in linear.GATED) for r in tma
            if r["case"]["dtype"] != "fp32" and r["case"]["configs"] == "all"} == {
        (op, gated) for op in ("gemm", "gemm_persistent") for gated in (False, True)}
    # TMA descriptor loads (cp.async.bulk.tensor) exactly where the TMA path was compiled
    wrong = [r for r in gemms if r["tma"] != (r["case"]["tma"] is not None)]
    assert not wrong, wrong


# Spill budget of the linear kernels: none, except the TMA path's 16-row tiles (mma.sync, not
# wgmma), where ptxas parks one 32-bit value in local memory across the K loop in some variants
# (sm_90a, triton 3.9: 8 bytes in fp16 plain 16 x 128 x 128 with 48 registers used, bf16 gated
# persistent 16 x 64 x 128 with 80; in the SASS one STL before the loop, one LDL after it):
# not register pressure, and nothing inside the loop, so these configs stay.
LINEAR_TMA_16_ROW_MAX_SPILL_BYTES = 8


def test_linear_kernels_fit_and_do_not_spill(compiled):
    records = _suite(compiled, "linear")
    over = [r for r in records if r["shared"] > SM90_MAX_SHARED_BYTES]
    assert not over, over

    def budget(r):
        tma_16_rows = r["case"]["tma"] is not None and r["config"]["BLOCK_M"] == 16
        return LINEAR_TMA_16_ROW_MAX_SPILL_BYTES if tma_16_rows else 0

    spilled = [r for r in records if r["spill_store_bytes"] > budget(r)]
    assert not spilled, spilled
