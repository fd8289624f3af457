"""Benchmarks: the standard cases of each op family against their peers, timed in the same run.

Used by ``python -m lors_kernels bench`` (table, JSON, plot) and by the pytest-benchmark suites in
``bench/`` (which import the cases from here, so both measure the same thing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OURS = "lors_kernels"
MODES = ("fwd", "fwd+bwd")
# What the pytest-benchmark suites run on: the GPU in bf16 where there is one, else the CPU in fp32.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@dataclasses.dataclass
class Case:
    """One shape of one op family: each provider is a zero-argument callable doing the work once."""

    family: str
    mode: str  # "fwd" or "fwd+bwd"
    shape: dict
    providers: dict[str, Callable[[], object]]
    # Target ratios time(ours) / time(peer) that the op's issue sets: {peer: max ratio}.
    targets: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


def _forward_backward(fn, inputs, grad_out):
    """fwd+bwd without accumulating into .grad, so every provider does the same extra work: none."""

    def run():
        y = fn()
        return torch.autograd.grad(y, inputs, grad_out)

    return run


# ------------------------------------------------------------------------------------------- lors_linear


def lors_linear_grid(device: str, quick: bool):
    """(M, in=out, R) triples. GPUs take the issue's full grid; CPUs skip the multi-second shapes."""
    if device == "cuda":
        ms, dims, ranks = (1, 16, 256, 4096), (256, 1024, 4096), (8, 32)
        if quick:
            ms, dims, ranks = (1, 4096), (1024, 4096), (8,)
    else:
        ms, dims, ranks = (1, 16, 256), (256, 1024, 4096), (8, 32)
        if quick:
            ms, dims, ranks = (1, 16, 256), (256, 1024), (8,)
    return [(m, d, r) for d in dims for m in ms for r in ranks]


def lors_linear_providers(x, weight, down, up, bias, scaling=1.0):
    import lors_kernels as lk

    return {
        OURS: lambda: lk.lors_linear(x, weight, down, up, bias, scaling=scaling),
        "dense F.linear": lambda: F.linear(x, weight, bias),
        "peft eager": lambda: F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, down), up),
        "materialize": lambda: F.linear(x, torch.addmm(weight, up, down, alpha=scaling), bias),
    }


def lors_linear_case(device: str, dtype: torch.dtype, m: int, d: int, r: int, mode: str) -> Case:
    g = torch.Generator().manual_seed(0)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    inputs = [rand(m, d), rand(d, d, std=d ** -0.5), rand(r, d, std=d ** -0.5), rand(d, r, std=r ** -0.5), rand(d)]
    shape = {"M": m, "in=out": d, "R": r}
    targets = lors_linear_targets(device, m, d, mode)
    if mode == "fwd":
        return Case("lors_linear", mode, shape, lors_linear_providers(*inputs), targets)
    leaves = [t.detach().requires_grad_() for t in inputs]
    x, weight, _, _, bias = leaves
    grad_out = rand(m, d)
    providers = {name: _forward_backward(fn, [x, weight, bias] if name == "dense F.linear" else leaves, grad_out)
                 for name, fn in lors_linear_providers(*leaves).items()}
    return Case("lors_linear", mode, shape, providers, targets)


def lors_linear_cases(device: str, dtype: torch.dtype, quick: bool = False):
    return [lors_linear_case(device, dtype, m, d, r, mode)
            for m, d, r in lors_linear_grid(device, quick) for mode in MODES]


def lors_linear_targets(device: str, m: int, d: int, mode: str) -> dict:
    """The foundation issue's targets, as max time(ours)/time(peer)."""
    if device == "cuda":
        targets = {"peft eager": 1 / 1.4}
        if m >= 4096:
            targets["dense F.linear"] = 1.05 if mode == "fwd" else 1.10
        return targets
    if mode == "fwd" and m <= 16:
        return {"peft eager": 1 / 1.3} if d <= 256 else {"dense F.linear": 1.1}
    return {}


# ---------------------------------------------------------------------------------------- adaptive_mixing

# (name, G, P_in, C, P_out, r, K): the LORS paper's last stage (K = 3) and plain AdaMixer.
ADAPTIVE_SHAPES = {"lors": (2, 64, 128, 128, 16, 3), "adamixer": (4, 32, 64, 128, 0, 0)}


def adaptive_mixing_grid(device: str, quick: bool):
    """(shape name, B, N): the issue's B=16 with N in {100, 300} on GPUs; CPUs take B=2, N=100."""
    if device == "cuda":
        return [(name, 16, n) for name in ADAPTIVE_SHAPES for n in ((100,) if quick else (100, 300))]
    return [(name, 2, 100) for name in ADAPTIVE_SHAPES] if not quick else [("adamixer", 1, 100), ("lors", 1, 50)]


def adaptive_mixing_providers(x, m, s, channel_private, spatial_private, device):
    import lors_kernels as lk
    from lors_kernels.adaptive import reference

    def eager():
        return reference.adaptive_mixing(x, m, s, channel_private, spatial_private)

    providers = {OURS: lambda: lk.adaptive_mixing(x, m, s, channel_private=channel_private,
                                                  spatial_private=spatial_private),
                 "eager": eager}
    if device == "cuda":  # on CPU compiling each shape takes longer than the whole quick run
        providers["torch.compile(eager)"] = torch.compile(eager)
    return providers


def adaptive_mixing_case(device: str, dtype: torch.dtype, name: str, b: int, n: int, mode: str) -> Case:
    groups, p_in, c, p_out, r, k = ADAPTIVE_SHAPES[name]
    g = torch.Generator().manual_seed(0)

    def rand(*shape, fan=1):
        return (torch.randn(*shape, generator=g) / fan ** 0.5).to(device=device, dtype=dtype)

    bn = b * n
    inputs = [rand(bn, groups, p_in, c), rand(bn, groups, c, c, fan=c), rand(bn, groups, p_out, p_in, fan=p_in)]
    if k:
        inputs += [rand(groups * k, c, r, fan=c), rand(bn, groups * k, r, r, fan=r), rand(groups * k, r, c, fan=r),
                   rand(groups * k, p_out, r, fan=r), rand(bn, groups * k, r, r, fan=r),
                   rand(groups * k, r, p_in, fan=p_in)]
    shape = {"shape": name, "B": b, "N": n, "G": groups, "P_in": p_in, "C": c, "P_out": p_out, "K": k}
    # Issue 3's GPU target (fwd+bwd >= 2x eager) and issue 6's CPU one (the native kernels >= 1.6x eager).
    targets = {"eager": 0.5} if device == "cuda" and mode == "fwd+bwd" else {"eager": 1 / 1.6} if device == "cpu" else {}
    if mode == "fwd+bwd":
        inputs = [t.requires_grad_() for t in inputs]

    def split(ts):
        return ts[0], ts[1], ts[2], (tuple(ts[3:6]) if k else None), (tuple(ts[6:9]) if k else None)

    providers = adaptive_mixing_providers(*split(inputs), device)
    if mode == "fwd+bwd":
        grad_out = rand(bn, groups, p_out, c)
        providers = {name: _forward_backward(fn, inputs, grad_out) for name, fn in providers.items()}
    return Case("adaptive_mixing", mode, shape, providers, targets)


def adaptive_mixing_cases(device: str, dtype: torch.dtype, quick: bool = False):
    return [adaptive_mixing_case(device, dtype, name, b, n, mode)
            for name, b, n in adaptive_mixing_grid(device, quick) for mode in MODES]


# -------------------------------------------------------------------------------------------------- hrca

# (low_hw, high_hw, windows kept): ADE20K at 512^2 and Cityscapes at 1024 x 2048, strides 32 and 4.
HRCA_SIZES = {"ade": ((16, 16), (128, 128), 8), "cityscapes": ((32, 64), (256, 512), 64)}
HRCA_HEADS, HRCA_DIM = 8, 256


def hrca_grid(device: str, quick: bool):
    """(size, selection, B, N). Selection: FASeg's windows, or bilinear top-k (k = windows * ws^2
    pixels) shared per image or per query."""
    if device == "cuda":
        sizes, ns = ("ade", "cityscapes"), ((100,) if quick else (100, 300))
        return [(size, sel, 2, n) for size in sizes for sel in ("window", "bilinear", "bilinear-per-query")
                for n in ns]
    if quick:
        return [("ade", "window", 1, 100)]
    return [("ade", sel, 1, 100) for sel in ("window", "bilinear", "bilinear-per-query")]


def torch_topk_pixels(scores, low_hw, high_hw, k, per_query):
    """Bilinear top-k as one writes it in PyTorch: upsample the whole map, top-k -> [B, 1 or N, k]."""
    (lh, lw), (hh, hw) = low_hw, high_hw
    maps = scores.sum(1, keepdim=True) if not per_query else scores
    up = F.interpolate(maps.reshape(-1, 1, lh, lw).float(), size=(hh, hw), mode="bilinear", align_corners=False)
    return up.reshape(scores.shape[0], -1, hh * hw).topk(k, dim=-1).indices


def hrca_providers(scores, q, k, v, low_hw, high_hw, windows, selection):
    """Ours (fused selection, attention reading K/V rows by index) against what one writes in PyTorch:
    top-k (of the upsampled scores for bilinear), gather K/V rows, SDPA; and SDPA over the whole map."""
    import lors_kernels as lk

    (lh, lw), (hh, hw) = low_hw, high_hw
    ws = hh // lh
    per_query = selection.endswith("per-query")
    b, h, n, d = q.shape

    def ours():
        if selection == "window":
            index = lk.select_windows(scores, low_hw, high_hw, windows)
        else:
            index = lk.select_topk_pixels(scores, low_hw, high_hw, windows * ws * ws, per_query=per_query)
        return lk.sparse_cross_attention(q, k, v, index)

    def topk_gather_sdpa():
        if selection == "window":
            cells = scores.sum(1).topk(windows, dim=-1).indices  # [B, k]
            offsets = torch.arange(ws, device=q.device)
            rows = (cells // lw * ws)[:, :, None, None] + offsets[:, None]
            cols = (cells % lw * ws)[:, :, None, None] + offsets
            index = (rows * hw + cols).flatten(1)
        else:
            index = torch_topk_pixels(scores, low_hw, high_hw, windows * ws * ws, per_query)  # [B, 1 or N, S]
        if not per_query:
            rows = index.reshape(b, 1, -1, 1).expand(b, h, -1, d)
            return F.scaled_dot_product_attention(q, k.gather(2, rows), v.gather(2, rows))
        rows = index[:, None, :, :, None].expand(b, h, n, -1, d)  # every query's own K/V rows
        k_s = k[:, :, None].expand(b, h, n, -1, d).gather(3, rows)
        v_s = v[:, :, None].expand(b, h, n, -1, d).gather(3, rows)
        return F.scaled_dot_product_attention(q[:, :, :, None], k_s, v_s)[:, :, :, 0]

    return {OURS: ours, "topk+gather+SDPA": topk_gather_sdpa,
            "dense SDPA": lambda: F.scaled_dot_product_attention(q, k, v)}


def hrca_scores(device, dtype, size, b, n):
    low_hw = HRCA_SIZES[size][0]
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, n, low_hw[0] * low_hw[1], generator=g).softmax(-1).to(device=device, dtype=dtype)


def hrca_case(device: str, dtype: torch.dtype, size: str, selection: str, b: int, n: int, mode: str) -> Case:
    low_hw, high_hw, windows = HRCA_SIZES[size]
    g = torch.Generator().manual_seed(0)
    d = HRCA_DIM // HRCA_HEADS
    length = high_hw[0] * high_hw[1]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    scores = hrca_scores(device, dtype, size, b, n)
    q, k, v = rand(b, HRCA_HEADS, n, d), rand(b, HRCA_HEADS, length, d), rand(b, HRCA_HEADS, length, d)
    pixels = windows * (high_hw[0] // low_hw[0]) ** 2
    shape = {"size": size, "select": selection, "B": b, "N": n, "S": pixels}
    # The target: at Cityscapes size on GPUs, >= 3x faster than top-k + gather + SDPA.
    targets = {"topk+gather+SDPA": 1 / 3} if device == "cuda" and size == "cityscapes" else {}
    if mode == "fwd":
        return Case("hrca", mode, shape, hrca_providers(scores, q, k, v, low_hw, high_hw, windows, selection), targets)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    providers = hrca_providers(scores, *leaves, low_hw, high_hw, windows, selection)
    grad_out = rand(b, HRCA_HEADS, n, d)
    return Case("hrca", mode, shape, {name: _forward_backward(fn, leaves, grad_out) for name, fn in providers.items()},
                targets)


def hrca_cases(device: str, dtype: torch.dtype, quick: bool = False):
    return [hrca_case(device, dtype, *shape, mode) for shape in hrca_grid(device, quick) for mode in MODES]


def hrca_selection_grid(device: str, quick: bool):
    """(size, selection, B, N): bilinear top-k alone, at the sizes where it is expensive."""
    b, ns = (2, (100, 300)) if device == "cuda" else (1, (100,) if quick else (100, 300))
    sizes = ("cityscapes",) if quick else ("ade", "cityscapes")
    return [(size, sel, b, n) for size in sizes for sel in ("bilinear", "bilinear-per-query") for n in ns]


def hrca_selection_case(device: str, dtype: torch.dtype, size: str, selection: str, b: int, n: int) -> Case:
    low_hw, high_hw, windows = HRCA_SIZES[size]
    scores = hrca_scores(device, dtype, size, b, n)
    k = windows * (high_hw[0] // low_hw[0]) ** 2
    per_query = selection.endswith("per-query")
    import lors_kernels as lk

    def ours():
        return lk.select_topk_pixels(scores, low_hw, high_hw, k, per_query=per_query)

    def interpolate_topk():  # sorted ascending as ours is: the same result
        return torch_topk_pixels(scores, low_hw, high_hw, k, per_query).sort(-1).values

    shape = {"size": size, "select": selection, "B": b, "N": n, "k": k}
    # Issue 6's CPU target: the native selection >= 2x faster than interpolate + top-k at Cityscapes size.
    targets = {"interpolate+topk": 0.5} if device == "cpu" and size == "cityscapes" else {}
    return Case("hrca_selection", "fwd", shape, {OURS: ours, "interpolate+topk": interpolate_topk}, targets)


def hrca_selection_cases(device: str, dtype: torch.dtype, quick: bool = False):
    return [hrca_selection_case(device, dtype, *shape) for shape in hrca_selection_grid(device, quick)]


FAMILIES = {"lors_linear": lors_linear_cases, "adaptive_mixing": adaptive_mixing_cases, "hrca": hrca_cases,
            "hrca_selection": hrca_selection_cases}


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


def run(families, device: str, dtype: str, quick: bool, progress=True) -> dict:
    """Time every provider of every case; returns the JSON-ready results."""
    cases = [case for family in families for case in FAMILIES[family](device, DTYPES[dtype], quick)]
    budget = 0.1 if quick else 0.3
    results = []
    bar = _progress(len(cases) * max(len(c.providers) for c in cases), progress)
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


# ---------------------------------------------------------------------------------------------- reports


def family_tables(report: dict):
    """(family, header, rows of cells) per family: what the terminal table and the README show."""
    results = report["results"]
    on_gpu = report["machine"]["device"] == "cuda"
    for family in dict.fromkeys(r["family"] for r in results):
        rows = [r for r in results if r["family"] == family]
        peers = [p for p in rows[0]["times"] if p != OURS]
        header = ["mode", "shape", f"{OURS} ms"] + (["peak MiB"] if on_gpu else [])
        header += [f"{p} ms" for p in peers] + [f"÷{p}" for p in peers] + ["target"]
        table = []
        for r in rows:
            cells = [r["mode"], r["label"], f"{r['times'][OURS]['median_ms']:.4f}"]
            if on_gpu:
                cells.append(f"{(r['peak_bytes'][OURS] or 0) / 2**20:.1f}")
            cells += [f"{r['times'][p]['median_ms']:.4f}" for p in peers]
            cells += [f"{r['ratios'][p]:.2f}" for p in peers]
            verdicts = [f"{'PASS' if ok else 'FAIL'} ≤{r['targets'][p]:.2f}×{p.split()[0]}" for p, ok in r["meets"].items()]
            cells.append(", ".join(verdicts) or "-")
            table.append(cells)
        yield family, header, table


def format_table(report: dict) -> str:
    lines = []
    for family, header, table in family_tables(report):
        widths = [max(len(str(c)) for c in col) for col in zip(header, *table)]
        lines.append(f"\n{family}  (ratio = time ours / time peer: below 1 is faster)")
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Speed-up of ours over each peer, case by case, one panel per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    families = list(dict.fromkeys(r["family"] for r in results))
    fig, axes = plt.subplots(len(families), 1, figsize=(11, 4 * len(families)), squeeze=False)
    for ax, family in zip(axes[:, 0], families):
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
    families = list(FAMILIES) if args.op == "all" else [args.op]
    print(f"lors_kernels bench: {', '.join(families)} on {device}, {dtype}{' (quick)' if args.quick else ''}; "
          "versions and backends: python -m lors_kernels env")
    report = run(families, device, dtype, args.quick)
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
