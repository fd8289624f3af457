"""Command line: ``python -m lors_kernels env`` (and ``bench``, see bench.py)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lors_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="versions, built backends and what is usable on this machine")
    args = parser.parse_args(argv)
    if args.command == "env":
        from .backend import env_report

        print(env_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
