"""The benchmark tables, and the README's performance section generated from bench/results/*.json.

    python -m lors_kernels.report            # rewrite the section between the README's markers
    python -m lors_kernels.report --check    # exit 1 if the README is not what the results say

How a ratio's spread is judged (`assess`), for new runs and for files recorded before the spread was
stored. `bench` times ours and each peer in interleaved rounds; the ratio time(ours) / time(peer) is the
median of the per-round ratios, and its interval their quartiles (a burst of load that slows a whole
round cancels out). Files without per-round ratios give the ratio of the medians and the interval the
two interquartile ranges allow, [q1(ours) / q3(peer), q3(ours) / q1(peer)]. A ratio is noisy when its
interval spans more than a factor SPREAD_LIMIT, or when a target applies and the interval has values on
both sides of it. A target is PASS when its ratio is not noisy and at most the target, FAIL when not
noisy and above it; a noisy ratio gets no verdict. A row is noisy when any of its ratios is.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Iterator, Sequence

# torch-free: regenerating the README needs only the recorded JSON (the package's __init__ is lazy too).
OURS = "lors_kernels"
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
# Beyond this factor between its ends, a ratio's interval says too little to quote the ratio.
SPREAD_LIMIT = 1.5
LEGEND = (
    "ratio = time ours / time peer: below 1 is faster; (a–b): its quartiles; "
    f"?: noisy, the interval wider than ×{SPREAD_LIMIT:g} or on both sides of the target: no verdict"
)


def assess(row: dict) -> dict:
    """One result row's ratios, their intervals, which are noisy and each target's verdict
    ("PASS", "FAIL" or "noisy"), from its times (per-round ratios where recorded) and targets alone."""
    times, targets = row["times"], row.get("targets", {})
    ours = times[OURS]
    ratios, intervals, noisy, verdicts = {}, {}, [], {}
    for peer, t in times.items():
        if peer == OURS:
            continue
        paired = row.get("paired", {}).get(peer)
        if paired:
            ratios[peer], lo, hi = paired["median"], paired["q1"], paired["q3"]
        else:
            ratios[peer] = ours["median_ms"] / t["median_ms"]
            lo, hi = ours["q1_ms"] / t["q3_ms"], ours["q3_ms"] / t["q1_ms"]
        intervals[peer] = [lo, hi]
        limit = targets.get(peer)
        if hi > SPREAD_LIMIT * lo or (limit is not None and lo <= limit < hi):
            noisy.append(peer)
        if limit is not None:
            verdicts[peer] = "noisy" if peer in noisy else "PASS" if ratios[peer] <= limit else "FAIL"
    return {"ratios": ratios, "intervals": intervals, "noisy": noisy, "verdicts": verdicts}


def _num(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def family_tables(report: dict) -> Iterator[tuple[str, list[str], list[list[str]]]]:
    """(family, header, rows of cells) per family: what the terminal table and the README show."""
    results = report["results"]
    on_gpu = report["machine"]["device"] == "cuda"
    for family in dict.fromkeys(r["family"] for r in results):
        rows = [r for r in results if r["family"] == family]
        peers = [p for p in rows[0]["times"] if p != OURS]
        header = ["mode", "shape", f"{OURS} ms"] + (["peak MiB"] if on_gpu else [])
        header += [f"{p} ms" for p in peers] + [f"÷{p}" for p in peers] + ["target", "noisy"]
        table = []
        for r in rows:
            a = assess(r)
            cells = [r["mode"], r["label"], f"{r['times'][OURS]['median_ms']:.4f}"]
            if on_gpu:
                cells.append(f"{(r['peak_bytes'][OURS] or 0) / 2**20:.1f}")
            cells += [f"{r['times'][p]['median_ms']:.4f}" for p in peers]
            cells += [
                f"{_num(a['ratios'][p])}{'?' if p in a['noisy'] else ''} "
                f"({_num(a['intervals'][p][0])}–{_num(a['intervals'][p][1])})"
                for p in peers
            ]
            cells.append(
                ", ".join(f"{v} ≤{r['targets'][p]:.2f}×{p.split()[0]}" for p, v in a["verdicts"].items()) or "-"
            )
            cells.append("noisy" if a["noisy"] else "")
            table.append(cells)
        yield family, header, table


def format_table(report: dict) -> str:
    """The terminal table of `python -m lors_kernels bench`."""
    lines = []
    for family, header, table in family_tables(report):
        widths = [max(len(str(c)) for c in col) for col in zip(header, *table)]
        lines.append(f"\n{family}  ({LEGEND})")
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    return "\n".join(lines)


def noisy_line(report: dict) -> str:
    """How many rows are noisy, and what to do about it."""
    rows = report["results"]
    noisy = sum(bool(assess(r)["noisy"]) for r in rows)
    if not noisy:
        return f"No row noisy (of {len(rows)})."
    return f"{noisy} of {len(rows)} rows noisy: rerun on an idle machine."


def _machine_line(report: dict) -> str:
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']} CPU, {m['threads']} threads"
    parts = [where, m["dtype"], f"torch {m['torch']}", f"triton {m['triton']}", m["date"]]
    if report.get("quick"):
        parts.append("--quick")
    return " · ".join(str(p) for p in parts)


def _targets_line(report: dict) -> str:
    verdicts = [(r, p, v) for r in report["results"] for p, v in assess(r)["verdicts"].items()]
    line = noisy_line(report)
    if not verdicts:
        return line + " No target applies on this device."
    passed = sum(v == "PASS" for _, _, v in verdicts)
    undecided = sum(v == "noisy" for _, _, v in verdicts)
    line += f" Targets met: {passed} of {len(verdicts)}" + (f" ({undecided} noisy, undecided)." if undecided else ".")
    failed = sorted({f"{r['family']} {r['mode']} {r['label']}" for r, _, v in verdicts if v == "FAIL"})
    return line + ("" if not failed else " Not met: " + "; ".join(failed) + ".")


def section(results_dir: str, shown_as: str) -> str:
    paths = sorted(glob.glob(os.path.join(results_dir, "*.json")))
    lines = [
        f"Generated by `python -m lors_kernels.report` from `{shown_as}/*.json` (do not edit by hand).",
        "Ratios are time(lors_kernels) / time(peer) in the same run: below 1 is faster. Each is the median of",
        "the ratios of interleaved rounds, with their quartiles in parentheses (in files that lack them: the",
        "ratio of the medians, with q1(ours) / q3(peer) to q3(ours) / q1(peer)). A ratio is noisy (marked ?),",
        f"and its target gets no verdict, when that interval is wider than ×{SPREAD_LIMIT:g} or lies on both "
        "sides of the target.",
    ]
    if not paths:
        lines.append("\nNo recorded runs yet.")
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        command = f"`{report['command']}`" if report.get("command") else "Command not recorded."
        lines += [
            "",
            f"### {os.path.basename(path)}",
            "",
            _machine_line(report) + "  ",
            f"{command}  ",
            _targets_line(report),
        ]
        for family, header, table in family_tables(report):
            lines += ["", f"**{family}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines)


def render(readme: str, results_dir: str, shown_as: str) -> str:
    """The README text with its performance section regenerated (results named as `shown_as`)."""
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"the README has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    return f"{head}{BEGIN}\n{section(results_dir, shown_as)}\n{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lors_kernels.report", description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=os.path.join("bench", "results"))
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's section is stale")
    args = parser.parse_args(argv)
    with open(args.readme) as f:
        current = f.read()
    shown_as = os.path.relpath(args.results, os.path.dirname(os.path.abspath(args.readme))).replace(os.sep, "/")
    updated = render(current, args.results, shown_as)
    if args.check:
        if updated != current:
            print(f"{args.readme}: performance section is stale; run python -m lors_kernels.report", file=sys.stderr)
            return 1
        return 0
    with open(args.readme, "w") as f:
        f.write(updated)
    print(f"{args.readme}: performance section regenerated from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
