"""``fastgpt profile attention``: speed and peak memory of attention against sequence length.

For each sequence length T, every contender (eager attention with the T x T softmax
materialised, torch's SDPA with its default choice, and each fastgpt backend usable on the
device) runs q, k, v of shape (B, H, T, D), forward (or forward + backward with
``--backward``); its time and its peak memory above the inputs are recorded. A contender that
runs out of memory at a length is recorded as OOM there (and not run at longer ones).

Peak memory: on CUDA, the caching allocator's peak above what was allocated before the call;
on the CPU no allocator reports one, so each contender's sweep runs in a fresh process whose
peak resident set (``ru_maxrss``) is read after each length: lengths run in increasing order,
so each figure is the peak of that length (memory grows with T), including the allocator's
slack. There, that process's address space is capped near the memory the machine has free, so
that an eager T x T matrix too large for it fails as an allocation (OOM) instead of drawing the
system's OOM killer.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import timeit
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import fastgpt
from fastgpt.testing import eager_attention

from .attention import attention_flops
from .harness import device_info, fastgpt_backends, versions

DEFAULT_SEQ_LENS = (512, 1024, 2048, 4096)
BASELINE = "eager"


@dataclass
class Spec:
    """One profile run's settings (also what a CPU worker process receives)."""

    device: str
    seq_lens: list[int]
    batch: int = 1
    heads: int = 12
    head_dim: int = 64
    causal: bool = False
    backward: bool = False
    dtype: str = "fp32"
    trace_dir: str | None = None
    min_time_s: float = 0.5  # CPU: least time of timed calls per point
    contenders: list[str] = field(default_factory=list)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_contenders(device: str) -> list[str]:
    return [BASELINE, "sdpa"] + [f"fastgpt.{b}" for b in fastgpt_backends(device)]


def _function(name: str, causal: bool) -> Callable[..., torch.Tensor]:
    if name == BASELINE:
        return lambda q, k, v: eager_attention(q, k, v, is_causal=causal)
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    backend = name.split(".", 1)[1]
    return lambda q, k, v: fastgpt.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                backend=backend)


def _inputs(spec: Spec, t: int) -> tuple:
    g = torch.Generator(device=spec.device).manual_seed(t)
    shape = (spec.batch, spec.heads, t, spec.head_dim)
    dtype = _DTYPES[spec.dtype]
    qkv = [torch.randn(shape, generator=g, device=spec.device, dtype=dtype).requires_grad_(
        spec.backward) for _ in range(3)]
    grad = torch.randn(shape, generator=g, device=spec.device, dtype=dtype)
    return (*qkv, grad)


def _step(fn: Callable, spec: Spec, q, k, v, grad) -> Callable[[], Any]:
    if not spec.backward:
        return lambda: fn(q, k, v)
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), grad)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, (RuntimeError, MemoryError)) and (
        "can't allocate memory" in text or "not enough memory" in text or isinstance(e, MemoryError))


def _time(step: Callable[[], Any], spec: Spec) -> float:
    """Median milliseconds of one call."""
    if spec.device == "cuda":
        from triton.testing import do_bench

        return do_bench(step, warmup=10, rep=50, return_mode="median")
    step()  # warm-up
    once = timeit.Timer(step).timeit(1)
    number = max(1, min(20, math.ceil(spec.min_time_s / 3 / max(once, 1e-6))))
    return 1e3 * sorted(timeit.Timer(step).repeat(3, number))[1] / number


def _trace(step: Callable[[], Any], spec: Spec, name: str, t: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec.device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if spec.device == "cuda":
            torch.cuda.synchronize()
    path = Path(spec.trace_dir) / f"attention-{name}-T{t}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return str(path)


def measure(spec: Spec, name: str, t: int) -> dict[str, Any]:
    """Time and peak memory of contender `name` at length `t` (run in a fresh process on CPU)."""
    point: dict[str, Any] = {"contender": name, "seq_len": t, "status": "ok", "ms": None,
                             "peak_mib": None, "detail": ""}
    fn = _function(name, spec.causal)
    cuda = spec.device == "cuda"
    try:
        q, k, v, grad = _inputs(spec, t)
        step = _step(fn, spec, q, k, v, grad)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        step()  # the first call: the one whose peak memory is read (its result is dropped)
        if cuda:
            torch.cuda.synchronize()
            point["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            point["peak_mib"] = max(rss - _CPU_BASE_KIB[0], 0) / 1024
        point["ms"] = _time(step, spec)
        if spec.trace_dir:
            point["trace"] = _trace(step, spec, name, t)
    except Exception as e:  # noqa: BLE001 - every failure becomes this point's status
        point["status"] = "oom" if _is_oom(e) else "error"
        point["detail"] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return point


# ru_maxrss of a CPU worker once torch, fastgpt and the kernels are loaded: the zero of its
# peak memory figures.
_CPU_BASE_KIB = [0]


def _cap_address_space() -> None:
    """Limit this process's address space to what it has mapped plus the memory the machine
    has available, so an allocation beyond it fails (an OOM result) rather than swapping or
    calling the OOM killer."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        status = Path("/proc/self/status").read_text()
    except OSError:
        return
    avail = next(int(line.split()[1]) for line in meminfo.splitlines()
                 if line.startswith("MemAvailable:"))
    mapped = next(int(line.split()[1]) for line in status.splitlines()
                  if line.startswith("VmSize:"))
    limit = (mapped + int(avail * 0.9)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))


def _worker(spec_json: str, name: str) -> None:
    spec = Spec(**json.loads(spec_json))
    torch.set_num_threads(int(os.environ.get("FASTGPT_PROFILE_THREADS", torch.get_num_threads())))
    # Load everything the contender needs at a tiny size first, so the zero includes it.
    measure(Spec(**{**asdict(spec), "trace_dir": None, "min_time_s": 0.0}), name, 8)
    _CPU_BASE_KIB[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _cap_address_space()
    for t in spec.seq_lens:
        point = measure(spec, name, t)
        print(json.dumps(point), flush=True)
        if point["status"] == "oom":
            break


def _sweep_in_process(spec: Spec, name: str) -> Any:
    for t in spec.seq_lens:
        point = measure(spec, name, t)
        yield point
        if point["status"] == "oom":
            return


def _sweep_in_worker(spec: Spec, name: str) -> Any:
    code = "import sys; from fastgpt.bench.profile import _worker; _worker(sys.argv[1], sys.argv[2])"
    env = dict(os.environ, FASTGPT_PROFILE_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(asdict(spec)), name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = set()
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            point = json.loads(line)
            seen.add(point["seq_len"])
            yield point
    err = proc.stderr.read() if proc.stderr else ""
    code_ = proc.wait()
    if code_ != 0:  # killed (the OOM killer, a crash): the length it was on is the result
        missing = [t for t in spec.seq_lens if t not in seen]
        if missing:
            status = "oom" if code_ == -9 else "error"
            yield {"contender": name, "seq_len": missing[0], "status": status, "ms": None,
                   "peak_mib": None, "detail": f"worker exited with {code_}: {err[-300:]}"}


def run(spec: Spec, progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Measure every contender at every length; the result as a JSON-ready dict."""
    names = spec.contenders or default_contenders(spec.device)
    total, done = len(names) * len(spec.seq_lens), 0
    points = []
    for name in names:
        sweep = _sweep_in_worker if spec.device == "cpu" else _sweep_in_process
        for point in sweep(spec, name):
            points.append(point)
            done += 1
            if progress:
                progress(done, total, f"{name} T={point['seq_len']} {point['status']}")
        # lengths after an OOM are not run: they count as done for the progress bar
        done = (names.index(name) + 1) * len(spec.seq_lens)
    result = {"op": "attention", "device": device_info(spec.device), "versions": versions(),
              "spec": asdict(spec), "contenders": names, "points": points}
    result["summary"] = summary_lines(result)
    return result


def _points(result: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(p["contender"], p["seq_len"]): p for p in result["points"]}


def summary_lines(result: dict[str, Any]) -> list[str]:
    """One line per length: each contender's speed and memory against eager's."""
    by = _points(result)
    lines = []
    for t in result["spec"]["seq_lens"]:
        base = by.get((BASELINE, t))
        parts = []
        for name in result["contenders"]:
            if name == BASELINE:
                continue
            p = by.get((name, t))
            if p is None or p["status"] != "ok":
                parts.append(f"{name}: {p['status'] if p else 'not run'}")
            elif base is None or base["status"] != "ok":
                parts.append(f"{name}: {p['ms']:.3g} ms (eager {base['status'] if base else 'not run'})")
            else:
                speed = base["ms"] / p["ms"]
                mem = (base["peak_mib"] / p["peak_mib"]) if p["peak_mib"] else None
                mem_text = f", {mem:.3g}x less memory" if mem and mem >= 1 else (
                    f", {1 / mem:.3g}x more memory" if mem else "")
                parts.append(f"{name}: {speed:.3g}x eager{mem_text}")
        lines.append(f"T={t}: " + "; ".join(parts))
    return lines


def render_table(result: dict[str, Any]) -> str:
    by = _points(result)
    spec = result["spec"]
    head = (f"attention {'fwd+bwd' if spec['backward'] else 'fwd'}"
            f"{' causal' if spec['causal'] else ''}, B={spec['batch']} H={spec['heads']} "
            f"D={spec['head_dim']} {spec['dtype']} on {result['device']['name']}")
    cols = ["T"] + [f"{n} ms" for n in result["contenders"]] + [f"{n} MiB" for n in result["contenders"]]
    rows = []
    for t in spec["seq_lens"]:
        cells = [str(t)]
        for key in ("ms", "peak_mib"):
            for n in result["contenders"]:
                p = by.get((n, t))
                if p is None:
                    cells.append("-")
                elif p["status"] != "ok":
                    cells.append(p["status"].upper())
                else:
                    cells.append(f"{p[key]:.3f}" if key == "ms" else f"{p[key]:.0f}")
        rows.append(cells)
    widths = [max(len(c) for c in col) for col in zip(cols, *rows)]
    fmt = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([head, fmt(cols), *map(fmt, rows)])


def plot(result: dict[str, Any], path: str) -> None:
    """Speed-up over eager and peak memory against T, one line per contender, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = _points(result)
    lens = result["spec"]["seq_lens"]
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for name in result["contenders"]:
        ok = [t for t in lens if by.get((name, t), {}).get("status") == "ok"]
        speed = [(t, by[(BASELINE, t)]["ms"] / by[(name, t)]["ms"]) for t in ok
                 if by.get((BASELINE, t), {}).get("status") == "ok"]
        if speed:
            ax_speed.plot(*zip(*speed), marker="o", label=name)
        mem = [(t, by[(name, t)]["peak_mib"]) for t in ok if by[(name, t)]["peak_mib"]]
        if mem:
            ax_mem.plot(*zip(*mem), marker="o", label=name)
        for t in lens:
            if by.get((name, t), {}).get("status") == "oom":
                ax_mem.axvline(t, linestyle=":", color="grey")
                ax_mem.annotate(f"{name} OOM", (t, 1), rotation=90, fontsize=7)
    spec = result["spec"]
    title = (f"{'fwd+bwd' if spec['backward'] else 'fwd'}{' causal' if spec['causal'] else ''} "
             f"B={spec['batch']} H={spec['heads']} D={spec['head_dim']} {spec['dtype']}, "
             f"{result['device']['name']}")
    for ax, label in ((ax_speed, "speed-up over eager (x)"), (ax_mem, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_mem.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_seq_lens(text: str) -> list[int]:
    lens = [int(x) for x in text.split(",") if x.strip()]
    if not lens or min(lens) < 1:
        raise ValueError(f"expected positive lengths joined by ',', got {text!r}")
    return sorted(dict.fromkeys(lens))

