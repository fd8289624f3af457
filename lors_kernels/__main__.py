"""Command line: ``python -m lors_kernels env|bench|gpu-check``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from .bench import DTYPES, families

    parser = argparse.ArgumentParser(prog="python -m lors_kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, built backends and what is usable on this machine")
    bench = sub.add_parser("bench", help="time each op family against its peers (table, JSON, PNG plot)")
    bench.add_argument("--op", choices=[*families(), "all"], default="all")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    bench.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on cuda, fp32 on cpu")
    bench.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing (< 2 min on CPU)")
    bench.add_argument(
        "--json", metavar="PATH", help="default: lors_bench/bench.json, with --quick lors_bench/bench-quick.json"
    )
    bench.add_argument(
        "--plot",
        metavar="PATH",
        help="one PNG per family: PATH with -<family> before the extension (--plot out.png "
        "writes out-lors_linear.png, ...); default: lors_bench/bench-<family>.png, with "
        "--quick lors_bench/bench-quick-<family>.png",
    )
    check = sub.add_parser(
        "gpu-check",
        help="on a GPU: the CUDA tests and the quick bf16 benchmarks, with a "
        "JSON and markdown summary, within a time budget",
    )
    check.add_argument("--out", metavar="DIR", default="gpu-check", help="where the results go (default: gpu-check)")
    check.add_argument(
        "--budget",
        metavar="SECONDS",
        type=float,
        default=450,
        help="time for all stages, two thirds of it for the tests (default: 450)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "env":
        from .backend import env_report

        print(env_report())
        return 0
    if args.command == "gpu-check":
        from .gpu_check import main as gpu_check_main

        return gpu_check_main(args)
    from .bench import main as bench_main

    return bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
