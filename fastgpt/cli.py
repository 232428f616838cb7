"""The ``fastgpt`` command (also ``python -m fastgpt``).

    fastgpt bench [CASE ...] [--device cpu|cuda|auto] [--dtype DTYPE ...] [--shape SHAPE ...]
                  [--quick] [--warm-heap | --first-touch] [--out DIR] [--no-compile]
    fastgpt info
    fastgpt profile attention [--seq-lens 512,1024,...] [--batch B] [--heads H] [--head-dim D]
                  [--causal] [--backward] [--dtype DTYPE] [--device cpu|cuda|auto]
                  [--json FILE] [--plot FILE.png] [--trace DIR]

Exit status: 0 ok; 1 a fastgpt contender failed its check against eager PyTorch or raised
(a backend refusing an input by design, with BackendError, is reported but not a failure);
2 usage error.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# Where `fastgpt bench` writes unless --out says otherwise: ignored by git (.gitignore), so
# that running a benchmark never dirties a checkout. Results worth keeping are copied into
# bench/results/ and committed on purpose.
DEFAULT_OUT = "bench/results/local"


def _bench(args: argparse.Namespace) -> int:
    # Imported here: `fastgpt info` should not pay for the benchmark machinery.
    from . import bench

    cases = list(dict.fromkeys(args.cases)) or list(bench.CASES)
    unknown = [c for c in cases if c not in bench.CASES]
    if unknown:
        args.parser.error(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(bench.CASES)}")
    device = _resolve_device(args)

    shapes = list(dict.fromkeys(args.shape)) if args.shape else None
    for name in cases:  # a shape a case cannot take is a usage error, before anything runs
        try:
            bench.CASES[name].problems(device, None, args.quick, shapes)
        except ValueError as exc:
            args.parser.error(f"--shape: {exc}")

    cpu_heap = None
    if device == "cpu":
        # Before any benchmark tensor exists: mallopt only governs later blocks. The flags'
        # work (mallopt, the probe) runs only when asked; the record is kept either way, so
        # that a CPU result says which heap its times include.
        from .bench import cpuheap

        cpu_heap = cpuheap.setup(warm=args.warm_heap, first_touch=args.first_touch)
    elif args.warm_heap or args.first_touch:
        flag = "--warm-heap" if args.warm_heap else "--first-touch"
        args.parser.error(f"{flag}: CPU only (CUDA's caching allocator already reuses memory)")
    session = bench.Session(device, quick=args.quick, compile=not args.no_compile, shapes=shapes,
                            cpu_heap=cpu_heap)
    dtypes = [bench.DTYPES[d] for d in dict.fromkeys(args.dtype)] if args.dtype else None

    print("\n".join(bench.render_header(session.metadata())) + "\n", flush=True)
    failed = []
    for name in cases:
        result = bench.run_case(bench.CASES[name], session, dtypes, log=_progress)
        json_path, md_path = bench.write_results(result, args.out)
        print(bench.render_table(result))
        print(f"wrote {json_path} and {md_path.name}\n", flush=True)
        failed += bench.failed_rows(result)
    if failed:
        print(f"{len(failed)} row(s) failed:", file=sys.stderr)
        for r in failed:
            print(f"  {r['case']} {r['variant']} {r['dtype']} {r['contender']}: {r['status']}: {r['detail']}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _shape(text: str) -> tuple[int, ...]:
    """argparse type for --shape: sizes joined by "x", e.g. 4x768."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes joined by 'x' (e.g. 4x768), got {text!r}")
    return shape


def _progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def _info(args: argparse.Namespace) -> int:
    import fastgpt

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"fastgpt {fastgpt.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {triton_version}, python {platform.python_version()}")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"devices: cpu ({torch.get_num_threads()} threads), cuda: {cuda}")
    print("backends:")
    for name, per_device in fastgpt.available_backends().items():
        for device, status in per_device.items():
            print(f"  {name:<7} {device:<5} {'available' if status.available else 'no: ' + status.reason}")
    return EXIT_OK


def _resolve_device(args: argparse.Namespace) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        args.parser.error("--device cuda: torch sees no CUDA device")
    return args.device


def _profile(args: argparse.Namespace) -> int:
    import json

    from .bench import profile

    device = _resolve_device(args)
    try:
        seq_lens = profile.parse_seq_lens(args.seq_lens)
    except ValueError as exc:
        args.parser.error(f"--seq-lens: {exc}")
    for flag in ("batch", "heads", "head_dim"):
        if getattr(args, flag) < 1:
            args.parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            args.parser.error("--plot needs matplotlib (pip install matplotlib)")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    spec = profile.Spec(device=device, seq_lens=seq_lens, batch=args.batch, heads=args.heads,
                        head_dim=args.head_dim, causal=args.causal, backward=args.backward,
                        dtype=dtype, trace_dir=args.trace)
    result = profile.run(spec, progress=_progress_bar)
    print(profile.render_table(result))
    print("\n".join(result["summary"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        profile.plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.trace:
        print(f"wrote Chrome traces under {args.trace} (open in chrome://tracing or Perfetto)")
    failed = [p for p in result["points"]
              if p["status"] == "error" or (p["status"] == "oom" and p["contender"].startswith("fastgpt."))]
    for p in failed:
        print(f"{p['contender']} T={p['seq_len']}: {p['status']}: {p['detail']}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _progress_bar(done: int, total: int, what: str) -> None:
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {what:<48}", end=end,
          file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="fastgpt", description="fastgpt kernels: benchmarks and diagnostics")
    parser.add_argument("--version", action="version", version=f"fastgpt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = commands.add_parser(
        "bench",
        help="check and time the ops against eager PyTorch and torch.compile",
        description=(
            "Check each fastgpt backend against eager PyTorch, then time it; print a table and "
            "write <case>-<device>-<date>.json and .md under --out. Exit 1 if any check fails."
        ),
    )
    bench.add_argument("cases", nargs="*", metavar="CASE", help="cases to run (default: all)")
    bench.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="auto: cuda if available")
    bench.add_argument(
        "--dtype",
        action="append",
        choices=("fp32", "bf16", "fp16"),
        help="run only these dtypes (repeatable; default: the device's default set)",
    )
    bench.add_argument("--quick", action="store_true", help="tiny shapes, short timings: a smoke test")
    bench.add_argument(
        "--shape",
        action="append",
        type=_shape,
        metavar="SHAPE",
        help=("time these shapes, every variant, instead of the default plan (repeatable; norms: "
              "ROWSxHIDDEN, e.g. 4x768; attention: BxHxTxD; decode: BxHqxHkxTxD, e.g. 1x32x8x32768x128)"),
    )
    heap = bench.add_mutually_exclusive_group()
    heap.add_argument(
        "--warm-heap",
        action="store_true",
        help=(
            "CPU: make glibc malloc reuse freed buffers, so times exclude the page faults of "
            "first-touching fresh outputs (default: include them, as users see them)"
        ),
    )
    heap.add_argument(
        "--first-touch",
        action="store_true",
        help="CPU: also measure the write rate to freshly allocated pages, the floor under large outputs",
    )
    bench.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=(
            "result directory (default: %(default)s, ignored by git; "
            "commit results worth keeping under bench/results/)"
        ),
    )
    bench.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    bench.set_defaults(handler=_bench, parser=bench)  # usage errors name `fastgpt bench`

    info = commands.add_parser("info", help="versions and the backends usable here")
    info.set_defaults(handler=_info)

    profile = commands.add_parser("profile", help="profile an op's speed and memory against its size")
    ops = profile.add_subparsers(dest="op", metavar="OP", required=True)
    attention = ops.add_parser(
        "attention",
        help="attention: time and peak memory of each backend vs eager and SDPA, per sequence length",
        description=(
            "For each sequence length, time and peak memory of every fastgpt backend usable here, "
            "of eager attention (T x T softmax materialised) and of torch's SDPA; a summary line "
            "per length. Eager running out of memory is recorded as OOM. Exit 1 if a fastgpt "
            "backend fails."
        ),
    )
    attention.add_argument("--seq-lens", default="512,1024,2048,4096", metavar="T,T,...",
                           help="sequence lengths (default: %(default)s)")
    attention.add_argument("--batch", type=int, default=1, help="B (default: %(default)s)")
    attention.add_argument("--heads", type=int, default=12, help="H (default: %(default)s)")
    attention.add_argument("--head-dim", type=int, default=64, help="D (default: %(default)s)")
    attention.add_argument("--causal", action="store_true", help="causal attention")
    attention.add_argument("--backward", action="store_true", help="time forward + backward")
    attention.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                           help="default: bf16 on cuda, fp32 on cpu")
    attention.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    attention.add_argument("--json", metavar="FILE", help="write every measurement as JSON")
    attention.add_argument("--plot", metavar="FILE.png",
                           help="plot speed-up and memory against T (needs matplotlib)")
    attention.add_argument("--trace", metavar="DIR",
                           help="write a torch.profiler Chrome trace per contender and length")
    attention.set_defaults(handler=_profile, parser=attention)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)  # exits with status 2 on a usage error
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return args.handler(args)
