"""Benchmark harness: the records a family's cases are written in, timing, the run, the plot, the CLI.

Each op family describes its benchmarks in one `Family` record beside its code (``<family>/bench.py``):
the grid of shapes, the providers (ours and the peers it is measured against), a builder of one
case, and the targets it must meet. ``python -m lors_kernels bench`` (table, JSON, plot) and the
pytest-benchmark suite in ``bench/`` both take their cases from these records.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import platform
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from .report import OURS, assess, format_table, noisy_line

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
# What the pytest-benchmark suite runs on: the GPU in bf16 where there is one, else the CPU in fp32.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# The modules holding each family's `FAMILIES` records, in the order the tables show them.
FAMILY_MODULES = ("lors_kernels.static.bench", "lors_kernels.adaptive.bench", "lors_kernels.hrca.bench")


@dataclasses.dataclass(frozen=True)
class Target:
    """time(ours) / time(peer) <= ratio on `device`, in `modes`, for the shapes `where` accepts."""

    peer: str
    ratio: float
    device: str
    modes: tuple = MODES
    where: Callable[[dict], bool] = lambda shape: True

    def applies(self, device: str, mode: str, shape: dict) -> bool:
        return device == self.device and mode in self.modes and self.where(shape)


@dataclasses.dataclass(frozen=True)
class Family:
    """One op family's benchmarks.

    grid(device, quick) -> shapes (dicts: the table's labels and the builder's parameters);
    providers(device) -> provider names, ours first (known without building a case);
    build(device, dtype, shape, mode) -> {provider: zero-argument callable doing the work once}.
    """

    name: str
    grid: Callable[[str, bool], list]
    providers: Callable[[str], tuple]
    build: Callable[..., dict]
    targets: tuple = ()
    modes: tuple = MODES

    def cases(self, device: str, dtype: torch.dtype, quick: bool = False) -> list[Case]:
        return [self.case(device, dtype, shape, mode) for shape in self.grid(device, quick) for mode in self.modes]

    def case(self, device: str, dtype: torch.dtype, shape: dict, mode: str) -> Case:
        targets = {t.peer: t.ratio for t in self.targets if t.applies(device, mode, shape)}
        return Case(self.name, mode, shape, self.build(device, dtype, shape, mode), targets)


@dataclasses.dataclass
class Case:
    """One shape of one op family: each provider is a zero-argument callable doing the work once."""

    family: str
    mode: str  # "fwd" or "fwd+bwd"
    shape: dict
    providers: dict[str, Callable[[], object]]
    targets: dict[str, float] = dataclasses.field(default_factory=dict)  # {peer: max time(ours)/time(peer)}

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


def families() -> dict[str, Family]:
    """Every family's record by name."""
    records = [f for module in FAMILY_MODULES for f in importlib.import_module(module).FAMILIES]
    return {f.name: f for f in records}


def seeded_randn(device: str, dtype: torch.dtype, seed: int = 0) -> Callable[..., torch.Tensor]:
    """rand(*shape, std=1.0): normal values from one CPU generator (the same on every device)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    return rand


def forward_backward(
    providers: dict,
    inputs: Sequence[torch.Tensor],
    grad_out: torch.Tensor,
    inputs_of: Callable[[str], Sequence[torch.Tensor]] | None = None,
) -> dict:
    """Each provider's forward + backward, without accumulating into .grad, so every provider does the
    same extra work: none. inputs_of(name): the inputs a provider differentiates (default: all)."""

    def step(name, fn):
        wrt = inputs if inputs_of is None else inputs_of(name)
        return lambda: torch.autograd.grad(fn(), wrt, grad_out)

    return {name: step(name, fn) for name, fn in providers.items()}


# ------------------------------------------------------------------------------------------------ timing

# clock(fn, number) -> milliseconds per call of `number` back-to-back calls of fn.
Clock = Callable[[Callable[[], object], int], float]


def wall_clock(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) * 1e3 / number


def cuda_clock(fn: Callable[[], object], number: int) -> float:
    """CUDA events around the calls: the GPU's time, not the host's."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(number):
        fn()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / number


def clock_for(device: str) -> Clock:
    return cuda_clock if device == "cuda" else wall_clock


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How long a case is timed. A round times one block of calls (about `block_s` long) of each provider
    in turn, so that a burst of load from elsewhere hits ours and the peers alike. Rounds go on until the
    round-by-round ratio of ours to every peer has an interquartile range of at most `rel_iqr` times its
    median, or until `budget_s` is spent; `min_rounds` always run."""

    budget_s: float
    block_s: float
    rel_iqr: float = 0.1
    min_rounds: int = 10
    max_rounds: int = 5000


QUICK = Sampling(budget_s=2.0, block_s=1e-3)
FULL = Sampling(budget_s=6.0, block_s=2e-3)


def _quartiles(samples: list) -> tuple:
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    q1, median, q3 = statistics.quantiles(samples, n=4)
    return q1, median, q3


def _rel_iqr(samples: list) -> float:
    q1, median, q3 = _quartiles(samples)
    return (q3 - q1) / median if median > 0 else float("inf")


def _ratios(ours: list, peer: list) -> list:
    return [a / b for a, b in zip(ours, peer)]


def measure(providers: dict, clock: Clock, sampling: Sampling) -> dict:
    """Times `providers` (ours first) in interleaved rounds (see `Sampling`). Returns {"times": {provider:
    median, quartiles and relative IQR of its time per call in ms, rounds, calls per block}, "paired":
    {peer: median and quartiles of the per-round ratio time(ours) / time(peer)}}."""
    names = list(providers)
    number = {}
    for name, fn in providers.items():
        fn()  # warm-up: compilation, autotuning, allocator
        once = min(clock(fn, 1) for _ in range(3))
        number[name] = max(1, min(100_000, round(sampling.block_s * 1e3 / max(once, 1e-6))))
    samples = {name: [] for name in names}
    ours, peers = samples[names[0]], names[1:]
    start = time.perf_counter()
    for done in range(1, sampling.max_rounds + 1):
        first = done % len(names)  # rotated, so that no provider always runs right after the same one
        for name in names[first:] + names[:first]:
            samples[name].append(clock(providers[name], number[name]))
        if done >= sampling.min_rounds and (
            time.perf_counter() - start > sampling.budget_s
            or all(_rel_iqr(_ratios(ours, samples[p])) <= sampling.rel_iqr for p in peers)
        ):
            break
    times, paired = {}, {}
    for name in names:
        q1, median, q3 = _quartiles(samples[name])
        times[name] = {
            "median_ms": median,
            "q1_ms": q1,
            "q3_ms": q3,
            "rel_iqr": _rel_iqr(samples[name]),
            "n": len(samples[name]),
            "calls": number[name],
        }
    for peer in peers:
        q1, median, q3 = _quartiles(_ratios(ours, samples[peer]))
        paired[peer] = {"median": median, "q1": q1, "q3": q3}
    return {"times": times, "paired": paired}


def peak_memory(fn: Callable, device: str) -> int | None:
    """Peak bytes allocated by one call beyond what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def machine_info(device: str, dtype: str) -> dict:
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "dtype": dtype,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(names: Iterable[str], device: str, dtype: str, quick: bool, progress: bool = True) -> dict:
    """Time every provider of every case of the named families; returns the JSON-ready results."""
    records = families()
    cases = [case for name in names for case in records[name].cases(device, DTYPES[dtype], quick)]
    sampling = QUICK if quick else FULL
    clock = clock_for(device)
    results = []
    bar = _progress(len(cases), progress)
    start = time.perf_counter()
    for case in cases:
        bar.set_description(f"{case.family} {case.mode} {case.label}"[:60])
        row = {
            "family": case.family,
            "mode": case.mode,
            "shape": case.shape,
            "label": case.label,
            **measure(case.providers, clock, sampling),
            "peak_bytes": {name: peak_memory(fn, device) for name, fn in case.providers.items()},
            "targets": case.targets,
        }
        row.update(assess(row))
        results.append(row)
        bar.update(1)
    bar.close()
    return {
        "machine": machine_info(device, dtype),
        "quick": quick,
        "sampling": dataclasses.asdict(sampling),
        "seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------ plot

VERDICT_COLORS = {"PASS": "tab:green", "FAIL": "tab:red", "noisy": "darkorange"}


def plot_paths(path: str, names: Iterable[str]) -> dict[str, str]:
    """{family: PNG path}: one figure per family, `path` with -<family> before its extension."""
    root, ext = os.path.splitext(path)
    return {name: f"{root}-{name}{ext or '.png'}" for name in names}


def _short_labels(rows: list) -> tuple:
    """Each row's label from the shape keys that vary across `rows`, and the fixed ones as one line."""
    keys = list(rows[0]["shape"])
    varying = [k for k in keys if len({str(r["shape"][k]) for r in rows}) > 1] or keys
    fixed = " ".join(f"{k}={rows[0]['shape'][k]}" for k in keys if k not in varying)

    def wrap(text):
        return textwrap.fill(text, 24, break_long_words=False, break_on_hyphens=False)

    return [wrap(" ".join(f"{k}={r['shape'][k]}" for k in varying)) for r in rows], fixed


def _log_ticks(lo: float, hi: float) -> list:
    """Round ticks between lo and hi, as many as fit without their labels overlapping (at most 8)."""
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for subs in ((1, 1.5, 2, 3, 4, 5, 7), (1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0**d for d in decades for m in subs if lo <= m * 10.0**d <= hi]
        if len(ticks) <= 8:
            return ticks
    return ticks[:: math.ceil(len(ticks) / 8)]


def family_figure(report: dict, family: str) -> Figure:
    """One family's figure: a panel per mode, a row per shape, per peer the ratio time(ours) / time(peer)
    as a point with its quartile interval; target marks coloured by verdict, noisy rows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = [r for r in report["results"] if r["family"] == family]
    peers = [p for p in rows[0]["times"] if p != OURS]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    shapes = list(dict.fromkeys(r["label"] for r in rows))
    labels, fixed = _short_labels([next(r for r in rows if r["label"] == label) for label in shapes])
    by_case = {(r["mode"], r["label"]): (r, assess(r)) for r in rows}
    label_lines = max(label.count("\n") + 1 for label in labels)
    slot_in = max(0.17 * len(peers) + 0.12, 0.16 * label_lines + 0.1)
    fig, axes = plt.subplots(
        1,
        len(modes),
        figsize=(2.4 + 4.6 * len(modes), 2.0 + slot_in * len(shapes)),
        sharex=True,
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    colors = plt.get_cmap("tab10").colors
    step = 0.8 / len(peers)
    values = [1.0]
    for ax, mode in zip(axes[0], modes):
        for i, label in enumerate(shapes):
            if (mode, label) not in by_case:
                continue
            row, a = by_case[mode, label]
            if a["noisy"]:
                ax.axhspan(i - 0.5, i + 0.5, color="orange", alpha=0.18, lw=0)
                # in the band's top corner, above the points
                ax.text(
                    0.995,
                    i - 0.48,
                    "noisy",
                    transform=ax.get_yaxis_transform(),
                    ha="right",
                    va="top",
                    fontsize=6.5,
                    color="darkorange",
                )
            elif i % 2:
                ax.axhspan(i - 0.5, i + 0.5, color="0.5", alpha=0.07, lw=0)  # stripes tell the shapes apart
            for j, peer in enumerate(peers):
                y = i + (j - (len(peers) - 1) / 2) * step
                ratio, (lo, hi) = a["ratios"][peer], a["intervals"][peer]
                values += [lo, hi]
                ax.errorbar(
                    ratio,
                    y,
                    xerr=[[ratio - lo], [hi - ratio]],
                    fmt="o",
                    ms=4.5,
                    color=colors[j],
                    mfc="white" if peer in a["noisy"] else colors[j],
                    elinewidth=1.2,
                    capsize=2,
                )
                if peer in row["targets"]:
                    values.append(row["targets"][peer])
                    ax.plot(
                        row["targets"][peer],
                        y,
                        marker="|",
                        ms=12,
                        mew=2.2,
                        ls="none",
                        color=VERDICT_COLORS[a["verdicts"][peer]],
                    )
        ax.axvline(1.0, color="0.35", lw=1, ls="--", zorder=0)
        ax.set_title(mode, fontsize=11)
        ax.set_xlabel("time(ours) / time(peer)   (< 1: ours faster)", fontsize=9)
        ax.grid(axis="x", color="0.9")
    ax = axes[0, 0]
    ax.set_xscale("log")
    lo, hi = min(values) / 1.25, max(values) * 1.25
    ax.set_xlim(lo, hi)
    ticks = _log_ticks(lo, hi)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_yticks(range(len(shapes)), labels, fontsize=8)
    ax.set_ylim(len(shapes) - 0.5, -0.5)
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']} CPU, {m['threads']} threads"
    fig.suptitle(
        f"{family}: time(lors_kernels) / time(peer), median and quartile interval\n"
        f"{where} · {m['dtype']} · torch {m['torch']}{' · --quick' if report.get('quick') else ''}"
        + (f" · {fixed}" if fixed else ""),
        fontsize=10,
    )
    handles = [
        Line2D([], [], marker="o", ls="none", color=colors[j], label=f"vs {peer}") for j, peer in enumerate(peers)
    ]
    if any(a["noisy"] for _, a in by_case.values()):
        handles.append(Line2D([], [], marker="o", ls="none", color="0.4", mfc="white", label="noisy ratio"))
    shown = {v for _, a in by_case.values() for v in a["verdicts"].values()}
    handles += [
        Line2D([], [], marker="|", ms=10, mew=2.2, ls="none", color=color, label=f"target: {verdict}")
        for verdict, color in VERDICT_COLORS.items()
        if verdict in shown
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    return fig


def plot(report: dict, path: str) -> list[str]:
    """One PNG per family (see `plot_paths`); returns their paths."""
    import matplotlib.pyplot as plt

    paths = plot_paths(path, dict.fromkeys(r["family"] for r in report["results"]))
    for family, out in paths.items():
        fig = family_figure(report, family)
        fig.savefig(out, dpi=110)
        plt.close(fig)
    return list(paths.values())


def main(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked for, but torch sees no CUDA device")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    names = list(families()) if args.op == "all" else [args.op]
    print(
        f"lors_kernels bench: {', '.join(names)} on {device}, {dtype}{' (quick)' if args.quick else ''}; "
        "versions and backends: python -m lors_kernels env"
    )
    report = run(names, device, dtype, args.quick)
    report["command"] = " ".join(["python -m lors_kernels", *sys.argv[1:]])
    print(format_table(report))
    # a quick run must not replace the full run's files
    stem = os.path.join("lors_bench", "bench-quick" if args.quick else "bench")
    json_path, plot_path = args.json or stem + ".json", args.plot or stem + ".png"
    outputs = [json_path, *plot_paths(plot_path, names).values()]
    replaced = [path for path in outputs if os.path.exists(path)]
    for path in outputs:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    plot(report, plot_path)
    print(f"\nwrote {', '.join(outputs)} (timing took {report['seconds']} s)")
    if replaced:
        print(f"replaced the previous {', '.join(replaced)}")
    print(noisy_line(report))
    return 0
