"""The benchmark CLI end to end at tiny sizes (a smoke test: timings are not asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastgpt


def _fastgpt(*args, timeout=600, cwd=None):
    return subprocess.run([sys.executable, "-m", "fastgpt", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def _results(out_dir):
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]


def test_bench_quick_writes_checked_results(tmp_path):
    proc = _fastgpt("bench", "--quick", "--no-compile", "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.json"))
    assert files == ["attention", "decode", "layernorm", "linear", "matmul", "model", "rmsnorm"]
    variants = {"attention": {"fwd-causal", "bwd-causal", "fwd+bwd-causal"}, "decode": {"decode"},
                "linear": {"gelu_tanh", "swiglu", "mlp-fwd+bwd"}, "matmul": set(),
                "layernorm": {"fwd", "fwd+grad", "fwd+residual", "bwd", "bwd+residual"},
                "model": {"train-tiny", "prefill-tiny", "decode-tiny"}}
    variants["rmsnorm"] = variants["layernorm"]
    for path in tmp_path.glob("*.json"):
        result = json.loads(path.read_text())
        assert result["device"]["kind"] == "cpu" and result["device"]["name"]
        assert result["ceilings"]["copy_gbps"] > 0
        # The heap is recorded, but neither changed nor probed unless asked.
        heap = result["cpu_heap"]
        assert not heap["requested"] and not heap["applied"] and heap["first_touch_gbps"] is None, heap
        # (fastgpt has no CPU matmul kernel: torch.matmul is ATen's GEMM already)
        native = [r for r in result["rows"] if r["contender"] == "fastgpt.native"
                  and r["status"] != "unsupported"]
        assert {r["variant"] for r in native} == variants[result["case"]]
        for row in native:
            # the work is stated: bytes, or FLOPs where they alone bound it (a training step)
            assert row["status"] == "ok" and row["ms"] > 0, row
            assert row["bytes"] > 0 or (row["flops"] > 0 and row["pct_gemm"] > 0), row
            assert row["speedup"]["torch.eager"] > 0, row
        md = path.with_suffix(".md").read_text()
        assert "heap: default" in md and "first touch (" not in md


def test_bench_writes_to_an_ignored_folder_by_default(tmp_path):
    from fastgpt.cli import DEFAULT_OUT

    proc = _fastgpt("bench", "rmsnorm", "--quick", "--no-compile", "--device", "cpu",
                    "--dtype", "fp32", "--shape", "1x5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / DEFAULT_OUT).glob("rmsnorm-cpu-*.json")), proc.stdout[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_OUT.split("/")[0]]
    # The same folder inside this checkout is ignored by git, so a run leaves it clean.
    repo = Path(__file__).resolve().parent.parent
    ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", f"{DEFAULT_OUT}/x.json"])
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, f"{DEFAULT_OUT} is not ignored by git"


def test_bench_heap_flags(tmp_path):
    args = ("bench", "rmsnorm", "--quick", "--no-compile", "--device", "cpu", "--dtype", "fp32",
            "--shape", "1x5")
    proc = _fastgpt(*args, "--first-touch", "--out", str(tmp_path / "touch"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = _results(tmp_path / "touch")
    touch = result["cpu_heap"]["first_touch_gbps"]
    assert touch["bytes"] >= 64 << 20 and touch["resident"] > 0 and touch["fresh_4k"] > 0, touch
    assert touch["fresh_huge"] is None or touch["fresh_huge"] > 0, touch
    assert "first touch (fill_ of a new" in proc.stdout

    proc = _fastgpt(*args, "--warm-heap", "--out", str(tmp_path / "warm"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = _results(tmp_path / "warm")
    heap = result["cpu_heap"]
    assert heap["requested"] and heap["applied"] and heap["first_touch_gbps"] is None, heap
    assert "heap: warm" in proc.stdout

    # A warm heap has no fresh pages to probe.
    assert _fastgpt(*args, "--warm-heap", "--first-touch").returncode == 2


def test_fwd_grad_records_autograd_and_times_only_the_forward():
    from fastgpt.bench import CASES
    from fastgpt.bench.harness import Problem

    case = CASES["layernorm"]
    for variant, records in (("fwd", False), ("fwd+grad", True)):
        problem = Problem(variant, (8, 768), torch.float32, case.bytes(variant, 8, 768, torch.float32))
        workload = case.workload(problem, "cpu")
        assert workload.grad_outputs is None  # timed: the forward call alone
        for contender in case.contenders(problem, "cpu", compile=False):
            out = workload.runner(contender.fn)()
            assert (out.grad_fn is not None) == records, (variant, contender.name)


def test_default_cpu_plan_times_fwd_grad_on_the_decode_row_only():
    from fastgpt.bench import CASES

    for case in (CASES["layernorm"], CASES["rmsnorm"]):
        problems = case.problems("cpu", None, quick=False)
        grad = {(p.shape, p.dtype) for p in problems if p.variant == "fwd+grad"}
        assert grad == {((8, 768), torch.float32)}, case.name
        assert {p.variant for p in problems if p.shape == (8, 768)} == {"fwd", "fwd+grad"}


def test_bench_shape_replaces_the_plan(tmp_path):
    proc = _fastgpt("bench", "rmsnorm", "--quick", "--no-compile", "--device", "cpu",
                    "--dtype", "fp32", "--shape", "3x17", "--shape", "1x5", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("rmsnorm-*.json")
    result = json.loads(path.read_text())
    assert result["settings"]["shapes"] == ["3x17", "1x5"]
    assert {tuple(r["shape"]) for r in result["rows"]} == {(3, 17), (1, 5)}
    assert all(r["status"] == "ok" for r in result["rows"]), result["rows"]


def test_bench_usage_errors():
    assert _fastgpt("bench", "nosuchcase").returncode == 2
    assert _fastgpt().returncode == 2
    for bad in ("4x768x2", "0x8", "4by768"):  # norms take ROWSxHIDDEN, sizes >= 1
        proc = _fastgpt("bench", "layernorm", "--device", "cpu", "--shape", bad)
        assert proc.returncode == 2 and "--shape" in proc.stderr, (bad, proc.stderr[-500:])


def test_info_lists_backends():
    proc = _fastgpt("info")
    assert proc.returncode == 0, proc.stderr
    assert f"fastgpt {fastgpt.__version__}" in proc.stdout
    for name in ("torch", "triton", "native"):
        assert name in proc.stdout


def test_cpu_timing_interleaves_contenders_and_keeps_failures_apart():
    from fastgpt.bench.harness import CPU_ROUNDS, QUICK_TIMER, Session

    session = Session("cpu", quick=True)
    order = []

    def contender(name, fail_after=None):
        def fn():
            order.append(name)
            if fail_after is not None and order.count(name) > fail_after:
                raise RuntimeError(f"{name} broke")
        return fn

    ok, broken = session.time_all([contender("a"), contender("b", fail_after=2)])
    assert isinstance(broken, RuntimeError) and "b broke" in str(broken)
    median, iqr = ok
    assert 0 < median < 1e3 * QUICK_TIMER.cpu_min_run_time_s and iqr >= 0
    # Blocks alternate (round 0, the warm-up, then round 1) until "b" fails on its third
    # call; "a" goes on alone, one block per round: at least one call in each of the rounds.
    runs = [name for i, name in enumerate(order) if i == 0 or name != order[i - 1]]
    assert runs[:4] == ["a", "b", "a", "b"] and order.count("b") == 3
    assert order.count("a") >= CPU_ROUNDS + 1


def test_bench_attention_rows_and_work():
    from fastgpt.bench import CASES
    from fastgpt.bench.attention import attention_flops

    case = CASES["attention"]
    (fwd, bwd, both) = case.problems("cpu", None, quick=False)
    assert fwd.shape == (4, 12, 1024, 64) and fwd.dtype == torch.float32
    # FlashAttention's convention: 4*B*H*L*S*D, halved when causal; backward 2.5x forward
    assert fwd.flops == 4 * 4 * 12 * 1024 * 1024 * 64 // 2
    assert bwd.flops == fwd.flops * 5 // 2 and both.flops == fwd.flops * 7 // 2
    assert attention_flops(1, 1, 8, 8, 4, causal=False) == 4 * 8 * 8 * 4
    names = [c.name for c in case.contenders(fwd, "cpu", compile=True)]
    assert names[:3] == ["torch.eager", "torch.compile", "torch.sdpa"]
    assert "torch.sdpa[math]" in names and "fastgpt.native" in names
    # fwd+bwd times the forward and the backward in each call
    workload = case.workload(both, "cpu")
    assert workload.with_forward and workload.grad_outputs is not None


def test_bench_decode_rows_and_work(tmp_path):
    from fastgpt.bench import CASES

    case = CASES["decode"]
    problems = case.problems("cpu", None, quick=False)
    assert {p.shape[0] for p in problems} == {1, 8}  # batch 1 and 8
    (p,) = case.problems("cpu", None, quick=False, shapes=[(2, 8, 2, 100, 16)])
    # the K and V caches read once, q read and out written; one token per batch row
    assert p.bytes == (2 * 2 * 2 * 100 * 16 + 2 * 2 * 8 * 16) * 4 and p.tokens == 2
    names = [c.name for c in case.contenders(p, "cpu", compile=False)]
    assert names[:2] == ["torch.eager", "torch.sdpa"] and "fastgpt.native" in names
    with pytest.raises(ValueError, match="Hk"):
        case.problems("cpu", None, quick=False, shapes=[(1, 6, 4, 10, 8)])
    proc = _fastgpt("bench", "decode", "--no-compile", "--quick", "--device", "cpu",
                    "--shape", "2x8x2x100x16", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens/s" in proc.stdout
    (result,) = _results(tmp_path)
    rows = {r["contender"]: r for r in result["rows"]}
    assert rows["fastgpt.native"]["status"] == "ok", rows["fastgpt.native"]
    assert rows["fastgpt.native"]["tokens_per_s"] > 0


def test_bench_linear_rows_and_work():
    from fastgpt.bench import CASES

    case = CASES["linear"]
    problems = {p.variant: p for p in case.problems("cpu", None, quick=False)}
    gelu = problems["gelu_tanh"]
    assert gelu.shape == (4096, 3072, 768) and gelu.flops == 2 * 4096 * 3072 * 768
    (swiglu,) = [p for p in case.problems("cpu", None, quick=False, shapes=[(8, 16, 32)])
                 if p.variant == "swiglu"]
    assert swiglu.flops == 2 * 8 * 32 * 32  # gate and up: 2N columns
    names = [c.name for c in case.contenders(gelu, "cpu", compile=True)]
    assert names[:2] == ["torch.eager", "torch.compile"] and "fastgpt.native" in names
    mlp = problems["mlp-fwd+bwd"]
    workload = case.workload(mlp, "cpu")
    assert workload.with_forward and workload.grad_outputs is not None
    with pytest.raises(ValueError, match="MxNxK"):
        case.problems("cpu", None, quick=False, shapes=[(8, 16)])


def test_bench_model_rows_and_work():
    from fastgpt.bench import CASES
    from fastgpt.bench.model import model_problem
    from fastgpt.model import GPT, GPTConfig

    case = CASES["model"]
    plan = {(p.variant, p.shape) for p in case.problems("cpu", None, quick=False)}
    assert plan == {("train-small", (8, 256)), ("prefill-small", (8, 256)),
                    ("decode-gpt2", (1, 1, 8))}
    train, prefill = case.problems("cpu", None, quick=False, shapes=[(2, 16)])
    assert (train.variant, prefill.variant) == ("train-small", "prefill-small")
    assert train.tokens == prefill.tokens == 32 and train.bytes == prefill.bytes == 0
    assert train.flops > 3 * prefill.flops > 0  # backward 2x the GEMMs, 2.5x the attention
    config = GPTConfig.from_preset("tiny")
    with torch.device("meta"):
        weights = GPT(config).num_parameters() - config.block_size * config.n_embd
    (decode,) = case.problems("cpu", None, quick=True, shapes=[(2, 3, 4)])
    # weights once per pass (the prompt's, then 3 one-token passes); K and V of 3, 4, 5, 6 tokens
    cache = 2 * config.n_layer * 2 * (3 + 4 + 5 + 6) * config.n_embd
    assert decode.bytes == (4 * weights + cache) * 4 and decode.tokens == 2 * 4
    with pytest.raises(ValueError, match="block_size"):
        case.problems("cpu", None, quick=False, shapes=[(1, 257)])
    with pytest.raises(ValueError, match="BxPxN"):
        case.problems("cpu", None, quick=False, shapes=[(1, 2, 3, 4)])

    names = [c.name for c in case.contenders(decode, "cpu", compile=True)]
    assert names[:2] == ["torch.eager", "torch.compile"]
    assert {"fastgpt.native", "fastgpt.native+compile"} <= set(names)

    # The decode check passes eager's own tokens and fails a token that is not the best one.
    workload = case.workload(decode, "cpu")
    contenders = case.contenders(decode, "cpu", compile=False)
    native = next(c for c in contenders if c.name == "fastgpt.native")
    eager = workload.runner(contenders[0].fn)()
    reference = workload.upcast(torch.float64).runner(contenders[0].fn)()
    assert reference.shape == eager.shape == (2, 7)
    assert native.check(workload.runner(native.fn)(), eager, reference) is None
    assert native.check(eager, eager, reference) is None
    wrong = eager.clone()
    wrong[1, -1] = (wrong[1, -1] + 1) % config.vocab_size
    assert "below the float64 model's best logit" in native.check(wrong, eager, reference)
    wrong = eager.clone()
    wrong[0, 0] = (wrong[0, 0] + 1) % config.vocab_size
    assert "prompt" in native.check(wrong, eager, reference)

    # The training step: every contender starts from the same weights (the same first loss)
    # and steps its own copy (the second loss is another).
    train = model_problem("train", "tiny", (2, 16), torch.float32)
    workload = case.workload(train, "cpu")
    runs = [workload.runner(c.fn) for c in case.contenders(train, "cpu", compile=False)]
    first = [run()[0] for run in runs]
    assert all(torch.allclose(loss, first[0], rtol=1e-5) for loss in first), first
    assert not torch.allclose(runs[0]()[0], first[0], rtol=1e-5)


def test_profile_attention_end_to_end(tmp_path):
    out = tmp_path / "p.json"
    proc = _fastgpt("profile", "attention", "--seq-lens", "64,512", "--heads", "2",
                    "--head-dim", "16", "--causal", "--backward", "--device", "cpu",
                    "--json", str(out), "--plot", str(tmp_path / "p.png"),
                    "--trace", str(tmp_path / "traces"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    names = result["contenders"]
    assert names[:2] == ["eager", "sdpa"] and "fastgpt.native" in names
    points = {(p["contender"], p["seq_len"]): p for p in result["points"]}
    assert set(points) == {(n, t) for n in names for t in (64, 512)}
    for p in points.values():
        assert p["status"] == "ok" and p["ms"] > 0 and p["peak_mib"] is not None, p
    # eager's T x T matrices (B=1, H=2, fp32, with the backward's: ~8 MiB at T=512) show in its
    # peak; at T=200 (~1 MiB) the resident-set peak sometimes stayed below the worker's zero
    assert points[("eager", 512)]["peak_mib"] > points[("eager", 64)]["peak_mib"]
    assert "T=512: sdpa:" in proc.stdout and "x eager" in proc.stdout
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    traces = sorted(p.name for p in (tmp_path / "traces").iterdir())
    assert "attention-fastgpt.native-T512.json" in traces and len(traces) == 2 * len(names)
    assert "6/6" in proc.stderr or f"{2 * len(names)}/{2 * len(names)}" in proc.stderr


def test_profile_marks_out_of_memory_as_a_result():
    from fastgpt.bench import profile

    # Eager's T x T score matrix (B=1, H=16, T=262144, fp32: 4 TiB) cannot be allocated: the
    # point is recorded as OOM (the inputs, 128 MiB each, can), and longer lengths are not run.
    spec = profile.Spec(device="cpu", seq_lens=[262144, 524288], heads=16, head_dim=8,
                        contenders=["eager"])
    result = profile.run(spec)
    assert [p["status"] for p in result["points"]] == ["oom"], result["points"]


def test_profile_usage_errors():
    assert _fastgpt("profile").returncode == 2
    assert _fastgpt("profile", "attention", "--seq-lens", "0,5").returncode == 2
    assert _fastgpt("profile", "attention", "--batch", "0").returncode == 2
