"""Ahead-of-time compilation of Triton launches, for tests on machines without a GPU (docs/design.md §5).

A test module defines `aot_cases()`: calls of its family's launchers on meta tensors, over the
shapes and dtypes whose configurations dispatch can pick. `compile_cases(test_module)` runs them in
fresh processes (the interpreter, which the other tests use, replaces Triton's compiler front end),
with the package's `launch` replaced so that what gets compiled is exactly what dispatch would
start, and compiles each distinct launch for sm_80 and sm_90.

Each launch's report is cached on disk under a key made of the Triton version, the kernel's source
hash (its dependencies included), the launch's specialization and the architecture: a rerun compiles
only launches whose source or configuration changed. `LORS_KERNELS_AOT_CACHE` moves the cache
(default ~/.cache/lors_kernels/aot); deleting it forces a full compile.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import JITFunction

# Largest dynamic shared memory per block: A100 (sm_80) 163 KB, H100/H200 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Bumped when a report's fields change, so that old cache entries are not read.
CACHE_FORMAT = 2


def _specialize(value):
    """(type, specialization) exactly as Triton's launcher derives them (meta tensors count as aligned)."""
    return native_specialize_impl(CUDABackend, value, False, True, True)


class Launch:
    """One kernel start as the JIT would compile it: the same types, divisibility-by-16 hints and
    constant-1 specializations that `kernel[grid](...)` derives from the arguments."""

    def __init__(self, kernel, args, constexprs, num_warps, num_stages):
        # Under TRITON_INTERPRET=1 the decorated kernel is an interpreter object: compile its function.
        self.fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
        names = self.fn.arg_names
        self.signature, self.attrs, self.constexprs = {}, {}, dict(constexprs)
        for i, (name, value) in enumerate(zip(names, args)):
            kind, spec = _specialize(value)
            self.signature[name] = kind
            if kind == "constexpr":
                self.constexprs[name] = spec
            elif isinstance(spec, str):
                self.attrs[(i,)] = CUDABackend.parse_attr(spec)
        for name in names[len(args) :]:
            self.signature[name] = "constexpr"
        self.num_warps = num_warps
        self.num_stages = num_stages

    def key(self):
        return (
            self.fn.__name__,
            tuple(sorted(self.signature.items())),
            tuple(sorted(self.attrs)),
            tuple(sorted((k, str(v)) for k, v in self.constexprs.items())),
            self.num_warps,
            self.num_stages,
        )

    def __repr__(self):
        flags = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.fn.__name__}[{flags},warps={self.num_warps},stages={self.num_stages}]"


@contextlib.contextmanager
def record_launches(module):
    """Within the block, `module.launch` records Launch objects (deduplicated) instead of running."""
    seen: dict = {}
    original = module.launch

    def fake_launch(kernel, grid, args, constexprs, num_warps, num_stages=1):
        launch = Launch(kernel, args, constexprs, num_warps, num_stages)
        seen.setdefault(launch.key(), launch)

    module.launch = fake_launch
    try:
        yield seen
    finally:
        module.launch = original


def compile_launch(launch: Launch, capability: int):
    src = triton.compiler.ASTSource(
        fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs
    )
    return triton.compile(
        src,
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
    )


# 16-bit wgmma with 8 columns (m64n8k16.f16/bf16): Triton emits it for a dot whose columns per warpgroup
# come to 8 (BLOCK_N = 16 over two warpgroups), and it crashes or computes wrong results on H100/H200
# (triton-lang/triton#7830; seen as illegal memory accesses on an H200 with Triton 3.6).
NARROW_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m64n8k16\.f32\.(?:bf16|f16)")


def hopper_report(ptx: str, ptxas_log: str) -> dict:
    """What an sm_90 compile shows without a GPU: Hopper's tensor-core MMA (wgmma), 16-bit wgmma only 8
    columns wide (NARROW_WGMMA), bulk tensor copies (TMA), and the registers spilled to local memory, as
    Triton's own ptxas run reported them."""
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", ptxas_log))
    return {
        "wgmma": "wgmma.mma_async" in ptx,
        "narrow_wgmma": bool(NARROW_WGMMA.search(ptx)),
        "tma": "cp.async.bulk.tensor" in ptx,
        "spills": spills,
    }


def _report(launch: Launch, capability: int) -> dict:
    """Shared memory, and on sm_90 hopper_report, of one compile. The spills come from the ptxas log of
    the compile itself: ptxas flags differ between Triton versions, so a separate ptxas run could
    disagree with what Triton builds."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints the ptxas log with dump_ptxas_log
        kernel = compile_launch(launch, capability)
    entry = {"shared": kernel.metadata.shared}
    if capability == 90:
        if "bytes spill stores" not in log.getvalue():  # else no spill could ever be seen
            raise RuntimeError(f"no ptxas log captured for {launch!r}: got {log.getvalue()[-500:]!r}")
        entry.update(hopper_report(kernel.asm["ptx"], log.getvalue()))
    return entry


def _cache_path(launch: Launch, capability: int) -> str:
    root = os.environ.get("LORS_KERNELS_AOT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lors_kernels", "aot"
    )
    key = json.dumps([CACHE_FORMAT, triton.__version__, launch.fn.cache_key, repr(launch.key()), capability])
    return os.path.join(root, hashlib.sha256(key.encode()).hexdigest() + ".json")


def _cached_report(launch: Launch, capability: int) -> dict:
    path = _cache_path(launch, capability)
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            return json.load(f)
    entry = _report(launch, capability)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as f:
        json.dump(entry, f)
    os.replace(f.name, path)  # atomic: workers of concurrent runs may write the same entry
    return entry


def _compile_share(test_module: str, worker: int, workers: int) -> list:
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # Triton's cache would skip ptxas, and with it the log
    cases = importlib.import_module(test_module)
    with record_launches(importlib.import_module("lors_kernels.triton_utils")) as seen:
        cases.aot_cases()
    report = []
    for launch in list(seen.values())[worker::workers]:
        for capability in SHARED_LIMIT:
            entry = {"launch": repr(launch), "capability": capability}
            try:
                entry.update(_cached_report(launch, capability))
            except Exception as err:  # reported to the test, which fails on it
                entry["error"] = f"{type(err).__name__}: {err}"[:2000]
            if entry.get("narrow_wgmma"):  # every family's test fails on it, as on a compile error
                entry["error"] = "16-bit wgmma 8 columns wide (m64n8k16): wrong or crashing on Hopper (NARROW_WGMMA)"
            report.append(entry)
    return report


def compile_cases(test_module: str) -> list:
    """Compile every launch of `test_module.aot_cases()` in clean processes (one per core).

    Returns one dict per (launch, capability): its name and shared memory (and for sm_90 wgmma, tma,
    spills: hopper_report), or its error.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    workers = max(1, min(os.cpu_count() or 1, 8))
    procs = []
    for worker in range(workers):
        code = f"import json, aot; print('AOT' + json.dumps(aot._compile_share({test_module!r}, {worker}, {workers})))"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=here,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    report = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        lines = [line for line in stdout.splitlines() if line.startswith("AOT")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"AOT compilation process failed ({proc.returncode}):\n{stderr[-4000:]}")
        report += json.loads(lines[-1][3:])
    return report
