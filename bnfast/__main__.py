"""Command line: ``python -m bnfast {bench,config}`` (also installed as ``bnfast``).

Examples
--------
::

    python -m bnfast config                     # build and thread configuration
    python -m bnfast bench --quick              # ~20 s self-check vs NumPy/PyTorch/ONNX Runtime
    python -m bnfast bench --modes eval,train --dtypes float32 --json out.json --plot out.png
    python -m bnfast bench --shapes 32x64x112x112,256x1024 --threads 1
    python -m bnfast bench --dtypes float16,bfloat16 --peers torch,onnxruntime
    python -m bnfast bench --quick --busy 1     # beside a neighbour process running bnfast
"""
import argparse
import json
import math
import os
import sys

__all__ = ["main", "build_parser"]

_QUICK = dict(min_time=0.25, min_repeat=5, max_repeat=25)


def _arg_type(parse, what):
    """Wrap a ``parse(text)`` raising ValueError into an argparse type with a clean error."""
    def convert(text):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = what  # argparse names the type in some messages
    return convert


def _positive(cast, noun, most=math.inf):
    """A parser for positive finite numbers of type ``cast`` ("integer" or "number" in
    messages), at most ``most``."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise ValueError(f"expected a positive {noun}, got {text!r}") from None
        if not 0 < value < math.inf:
            raise ValueError(f"expected a positive {noun}, got {text!r}")
        if value > most:
            raise ValueError(f"expected at most {most}, got {text!r}")
        return value
    return parse


_positive_int = _positive(int, "integer")


def _non_negative_int(text):
    if not text.strip().isdigit():
        raise ValueError(f"expected a non-negative integer, got {text!r}")
    return int(text)
_positive_float = _positive(float, "number")


def _thread_count(text):
    from ._threads import MAX_THREADS
    return _positive(int, "integer", MAX_THREADS)(text)


def build_parser():
    """The ``argparse`` parser for ``python -m bnfast``."""
    from .bench.peers import PEERS, parse_peers
    from .bench.suite import DTYPES, MODES, parse_dtypes, parse_modes, parse_shapes

    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    parser = argparse.ArgumentParser(
        prog="bnfast" if script == "bnfast" else "python -m bnfast",
        description="bnfast: PyTorch-exact BatchNorm for NumPy arrays (Cython + OpenMP).")
    sub = parser.add_subparsers(dest="command", metavar="{bench,config}")

    sub.add_parser("config", help="show version, OpenMP, threads and compiler flags",
                   description="Print bnfast.show_config().")

    bench = sub.add_parser(
        "bench", help="benchmark against NumPy, PyTorch, ONNX Runtime and np.copyto",
        description="Time bnfast and its peers on a suite of shapes; check every result "
                    "against a float64 NumPy reference.",
        epilog="Peers that are not installed are skipped with a note.  "
               "Keys of the --json document: see bnfast/bench/schema.py.")
    suite = bench.add_argument_group("suite")
    suite.add_argument("--quick", action="store_true",
                       help="a short run (10-20 s): 3 small/medium shapes, float32, fewer repeats")
    suite.add_argument("--shapes", type=_arg_type(parse_shapes, "shapes"), metavar="NxCx...",
                       help="comma-separated shapes, e.g. 32x64x112x112,256x1024 "
                            "(default: the ResNet-50/MLP/inference suite)")
    suite.add_argument("--modes", type=_arg_type(parse_modes, "modes"), metavar="LIST",
                       help=f"comma-separated, from {','.join(MODES)} (default: all)")
    suite.add_argument("--dtypes", type=_arg_type(parse_dtypes, "dtypes"), metavar="LIST",
                       help=f"comma-separated, from {','.join(DTYPES)} (half precision "
                            "with float32 parameters, against torch in the same dtype; "
                            "default: float32,float64; --quick: float32)")
    suite.add_argument("--peers", type=_arg_type(parse_peers, "peers"), metavar="LIST",
                       help=f"comma-separated, from {','.join(PEERS)}, or none (default: all)")
    run = bench.add_argument_group("how to run")
    run.add_argument("--threads", type=_arg_type(_thread_count, "threads"), metavar="N",
                     help="run every implementation with N threads (default: each library's own)")
    run.add_argument("--outputs", choices=("preallocated", "allocate"), default="preallocated",
                     help="write into output buffers made once (default; isolates the kernels), "
                          "or let every call allocate as typical user code does")
    run.add_argument("--repeat", type=_arg_type(_positive_int, "repeat"), metavar="N",
                     help="exactly N timed samples per measurement "
                          "(default: enough for --min-time)")
    run.add_argument("--busy", type=_arg_type(_non_negative_int, "busy"), default=0, metavar="N",
                     help="run N neighbour processes calling bnfast (default threads) during the "
                          "measurements, as on a shared server; compare the mean times")
    run.add_argument("--min-time", type=_arg_type(_positive_float, "min_time"), metavar="SECONDS",
                     help="target timed seconds per measurement (default 0.4; --quick 0.25)")
    out = bench.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the results as JSON ('-' for stdout)")
    out.add_argument("--plot", metavar="FILE.png", help="draw speedup bars (needs matplotlib)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench.set_defaults(subparser=bench)
    return parser


def _settings(args):
    from .bench import BenchSettings, TimingPolicy
    from .bench.peers import PEERS
    from .bench.suite import DEFAULT_DTYPES, DEFAULT_SHAPES, MODES, QUICK_SHAPES

    policy = dict(_QUICK) if args.quick else {}
    if args.min_time is not None:
        policy["min_time"] = args.min_time
    policy["repeat"] = args.repeat
    return BenchSettings(
        shapes=args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES),
        modes=args.modes or MODES,
        dtypes=args.dtypes or (("float32",) if args.quick else DEFAULT_DTYPES),
        peers=args.peers if args.peers is not None else PEERS,
        threads=args.threads,
        allocate=args.outputs == "allocate",
        policy=TimingPolicy(**policy),
        quick=args.quick,
        busy=args.busy,
    )


def _bench(args, parser, argv):
    from .bench import run_benchmark
    from .bench.report_plot import matplotlib_missing, plot_speedups
    from .bench.report_table import format_report

    # fail before a long run, not after it
    if args.plot and matplotlib_missing():
        parser.error(matplotlib_missing())
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if not path or path == "-":
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            parser.error(f"{option} {path}: directory {folder} does not exist")
        if os.path.isdir(path):
            parser.error(f"{option} {path}: is a directory (name a file)")
        if not os.access(folder, os.W_OK) or (os.path.exists(path)
                                              and not os.access(path, os.W_OK)):
            parser.error(f"{option} {path}: not writable")
    if args.plot:
        from .bench.report_plot import plot_format_problem
        problem = plot_format_problem(args.plot)
        if problem:
            parser.error(f"--plot {args.plot}: {problem}")
    try:
        doc = run_benchmark(_settings(args), show_progress=not args.no_progress,
                            command=["bnfast"] + list(argv))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    report = format_report(doc)
    if args.json == "-":
        print(report, file=sys.stderr)
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print(report)
    if args.json and args.json != "-":
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    if args.plot:
        plot_speedups(doc, args.plot)
    # A WRONG result or one that raised: either is a broken bnfast (CI runs this).
    failed = [r for r in doc["results"] if r["impl"] == "bnfast"
              and (r["correct"] is False or r["status"] == "error")]
    return 1 if failed else 0


def main(argv=None):
    """Entry point of ``python -m bnfast`` and the ``bnfast`` console script.

    Returns
    -------
    int
        Exit status: 0, 1 if a bnfast result was WRONG or raised, 2 for a usage error
        (argparse exits with it directly).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "config":
        from . import show_config
        show_config()
        return 0
    return _bench(args, args.subparser, argv)


if __name__ == "__main__":
    sys.exit(main())
