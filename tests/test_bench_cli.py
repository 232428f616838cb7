"""The benchmark CLI end to end at tiny sizes (a smoke test: timings are not asserted)."""
import json
import subprocess
import sys

import fastgpt


def _fastgpt(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastgpt", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_bench_quick_writes_checked_results(tmp_path):
    proc = _fastgpt("bench", "--quick", "--no-compile", "--device", "cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.json"))
    assert files == ["layernorm", "rmsnorm"]
    for path in tmp_path.glob("*.json"):
        result = json.loads(path.read_text())
        assert result["device"]["kind"] == "cpu" and result["device"]["name"]
        assert result["ceilings"]["copy_gbps"] > 0
        touch = result["ceilings"]["first_touch_gbps"]
        assert touch["resident"] > 0 and touch["fresh_4k"] > 0, touch
        assert touch["fresh_huge"] is None or touch["fresh_huge"] > 0, touch
        assert "first touch (fill_ of a new 64 MiB buffer)" in path.with_suffix(".md").read_text()
        native = [r for r in result["rows"] if r["contender"] == "fastgpt.native"]
        assert {r["variant"] for r in native} == {"fwd", "fwd+residual", "bwd", "bwd+residual"}
        for row in native:
            assert row["status"] == "ok" and row["ms"] > 0 and row["bytes"] > 0, row
        assert path.with_suffix(".md").exists()


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


def test_first_touch_is_probed_on_the_default_cpu_heap_only():
    from fastgpt.bench.harness import Session

    warm = {"requested": True, "applied": True, "detail": "test"}
    assert Session("cpu", quick=True, heap=warm).first_touch() is None
    assert Session("cuda", quick=True).first_touch() is None
    touch = Session("cpu", quick=True).first_touch()
    assert set(touch) == {"bytes", "resident", "fresh_4k", "fresh_huge"}
    assert touch["bytes"] >= 64 << 20 and touch["resident"] > 0
