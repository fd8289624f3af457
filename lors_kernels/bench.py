"""Benchmark harness: the records a family's cases are written in, timing, the run, the plot, the CLI.

Each op family describes its benchmarks in one `Family` record beside its code (``<family>/bench.py``):
the grid of shapes, the providers (ours and the peers it is measured against), a builder of one
case, and the targets its issue set. ``python -m lors_kernels bench`` (table, JSON, plot) and the
pytest-benchmark suite in ``bench/`` both take their cases from these records.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from .report import OURS, format_table

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODES = ("fwd", "fwd+bwd")
# What the pytest-benchmark suite runs on: the GPU in bf16 where there is one, else the CPU in fp32.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# The modules holding each family's `FAMILIES` records, in the order the tables show them.
FAMILY_MODULES = ("lors_kernels.lors_linear.bench", "lors_kernels.adaptive.bench", "lors_kernels.hrca.bench")


@dataclasses.dataclass(frozen=True)
class Target:
    """time(ours) / time(peer) <= ratio on `device`, in `modes`, for the shapes `where` accepts."""

    peer: str
    ratio: float
    device: str
    source: str  # the issue that set it
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

    def cases(self, device: str, dtype: torch.dtype, quick: bool = False):
        return [self.case(device, dtype, shape, mode) for shape in self.grid(device, quick) for mode in self.modes]

    def case(self, device: str, dtype: torch.dtype, shape: dict, mode: str) -> "Case":
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


def seeded_randn(device: str, dtype: torch.dtype, seed: int = 0):
    """rand(*shape, std=1.0): normal values from one CPU generator (the same on every device)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    return rand


def forward_backward(providers: dict, inputs, grad_out, inputs_of=None) -> dict:
    """Each provider's forward + backward, without accumulating into .grad, so every provider does the
    same extra work: none. inputs_of(name): the inputs a provider differentiates (default: all)."""

    def step(name, fn):
        wrt = inputs if inputs_of is None else inputs_of(name)
        return lambda: torch.autograd.grad(fn(), wrt, grad_out)

    return {name: step(name, fn) for name, fn in providers.items()}


# ------------------------------------------------------------------------------------------------ timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_provider(fn: Callable, device: str, budget_s: float = 0.3) -> dict:
    """Median and spread (interquartile range) of one call, in milliseconds, after warm-up.

    CUDA: events around each call, median of >= 20. CPU: wall clock, >= 5 calls or `budget_s`.
    """
    fn()  # warm-up: compilation, autotuning, allocator
    _sync(device)
    if device == "cuda":
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        once = time.perf_counter() - start
        reps = max(20, min(1000, int(budget_s / max(once, 1e-6))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        times = []
        deadline = time.perf_counter() + budget_s
        while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 1000):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2], "n": len(times)}


def peak_memory(fn: Callable, device: str):
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
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "device": device, "dtype": dtype,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run(names, device: str, dtype: str, quick: bool, progress=True) -> dict:
    """Time every provider of every case of the named families; returns the JSON-ready results."""
    records = families()
    cases = [case for name in names for case in records[name].cases(device, DTYPES[dtype], quick)]
    budget = 0.1 if quick else 0.3
    results = []
    bar = _progress(sum(len(c.providers) for c in cases), progress)
    for case in cases:
        row = {"family": case.family, "mode": case.mode, "shape": case.shape, "label": case.label,
               "times": {}, "peak_bytes": {}, "targets": case.targets}
        for name, fn in case.providers.items():
            bar.set_description(f"{case.family} {case.mode} {case.label} {name}"[:60])
            row["times"][name] = time_provider(fn, device, budget)
            row["peak_bytes"][name] = peak_memory(fn, device)
            bar.update(1)
        ours = row["times"][OURS]["median_ms"]
        row["ratios"] = {peer: ours / t["median_ms"] for peer, t in row["times"].items() if peer != OURS}
        row["meets"] = {peer: row["ratios"][peer] <= limit for peer, limit in case.targets.items()}
        results.append(row)
    bar.close()
    return {"machine": machine_info(device, dtype), "quick": quick, "results": results}


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, leave=False, dynamic_ncols=True)


def plot(report: dict, path: str) -> None:
    """Speed-up of ours over each peer, case by case, one panel per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = list(dict.fromkeys(r["family"] for r in results))
    fig, axes = plt.subplots(len(names), 1, figsize=(11, 4 * len(names)), squeeze=False)
    for ax, family in zip(axes[:, 0], names):
        rows = [r for r in results if r["family"] == family]
        peers = [p for p in rows[0]["times"] if p != OURS]
        xs = range(len(rows))
        for peer in peers:
            ax.plot(xs, [1 / r["ratios"][peer] for r in rows], marker="o", label=f"vs {peer}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [f"{r['mode']}\n{r['label']}" for r in rows], rotation=90, fontsize=6)
        ax.set_ylabel("speed-up (peer time / our time)")
        m = report["machine"]
        ax.set_title(f"{family} — {m.get('gpu', m['cpu'])}, {m['dtype']}, torch {m['torch']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda asked for, but torch sees no CUDA device")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    names = list(families()) if args.op == "all" else [args.op]
    print(f"lors_kernels bench: {', '.join(names)} on {device}, {dtype}{' (quick)' if args.quick else ''}; "
          "versions and backends: python -m lors_kernels env")
    report = run(names, device, dtype, args.quick)
    report["command"] = " ".join(["python -m lors_kernels", *sys.argv[1:]])
    print(format_table(report))
    out_dir = "lors_bench"
    json_path = args.json or os.path.join(out_dir, "bench.json")
    plot_path = args.plot or os.path.join(out_dir, "bench.png")
    for path in (json_path, plot_path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    plot(report, plot_path)
    print(f"\nwrote {json_path} and {plot_path}")
    return 0
