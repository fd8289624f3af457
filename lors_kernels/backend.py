"""Backend choice: which implementation runs an op, and what this machine has.

Three backends, one name each:

- ``triton``: the fused Triton kernels. Runs on CUDA tensors, and on CPU tensors only under the
  Triton interpreter (``TRITON_INTERPRET=1`` set before the kernels are imported; the tests do this).
- ``native``: the C++/CUDA extension ``lors_kernels._C`` built from ``csrc/``; ``cuda`` forces only its
  CUDA kernels (a call on CPU tensors then fails instead of running the C++ CPU kernel).
- ``reference``: pure PyTorch, the test oracle and the fallback for everything.

Each op lists its implementations in order (lors_kernels.registry): the automatic choice is the first
that runs on the inputs' device, fits the case and was measured faster there; ``LORS_KERNELS_BACKEND``
or :func:`set_backend` force one backend instead.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("triton", "native", "cuda", "reference")
# What the kernels take: the Triton kernels compute in fp32, fp16 and bf16; the C++ CPU kernels in fp32 and
# bf16 (float64 runs on the reference everywhere).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NATIVE_CPU_DTYPES = (torch.float32, torch.bfloat16)
FLOAT_DTYPES = (*TRITON_DTYPES, torch.float64)  # what the ops take: float64 runs on the reference
_override: str | None = None
_native = None
_native_error: str | None = None
_native_loaded = False


def _canonical(name: str | None) -> str | None:
    if name is None or name == "" or name == "auto":
        return None
    name = name.lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown lors_kernels backend {name!r}: expected one of {BACKENDS} or 'auto'")
    return name


def set_backend(name: str | None) -> str | None:
    """Force a backend for every op (``None`` or ``"auto"`` restores the automatic choice).

    Returns the previous override so that callers can restore it.
    """
    global _override
    previous = _override
    _override = _canonical(name)
    return previous


def forced_backend() -> str | None:
    """The override in force: :func:`set_backend` first, then ``LORS_KERNELS_BACKEND``."""
    if _override is not None:
        return _override
    name = os.environ.get("LORS_KERNELS_BACKEND")
    return _canonical(name) if name else None


def native() -> ModuleType | None:
    """The compiled extension ``lors_kernels._C``, or None when it was not built (said once)."""
    global _native, _native_error, _native_loaded
    if not _native_loaded:
        _native_loaded = True
        try:
            _native = importlib.import_module("lors_kernels._C")
        except ImportError as err:  # the package works without it: Triton / reference take over
            _native_error = str(err)
            warnings.warn(
                "lors_kernels: the native extension lors_kernels._C is not available "
                f"({err}); falling back to Triton / PyTorch reference implementations.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _native


def native_error() -> str | None:
    """Why the extension could not be imported (None when it was)."""
    native()
    return _native_error


def native_has_cuda() -> bool:
    """The extension is there and was built with its CUDA kernels."""
    return native() is not None and "cuda" in native().built_backends()


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, and on CPU tensors only under its interpreter."""
    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


def env_report() -> str:
    """What was built and what is usable here (``python -m lors_kernels env``)."""
    import platform

    lines = [
        f"python      {platform.python_version()} ({platform.machine()})",
        f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    if triton_available():
        import triton

        mode = (
            "interpreter (TRITON_INTERPRET=1)"
            if triton_interpreted()
            else "compiled"
            if torch.cuda.is_available()
            else "no CUDA device: runs on CPU tensors only with TRITON_INTERPRET=1"
        )
        lines.append(f"triton      {triton.__version__} [{mode}]")
    else:
        lines.append("triton      not installed")
    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        lines.append(
            f"device      {props.name} (sm_{props.major}{props.minor}, "
            f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
        )
    else:
        lines.append("device      no CUDA device: CPU only")
    ext = native()
    if ext is None:
        lines.append(f"native      not built ({_native_error})")
    else:
        lines.append(
            f"native      built: {', '.join(ext.built_backends())} (OpenMP threads: {torch.get_num_threads()})"
        )
    usable = ["reference"]
    if ext is not None:
        usable.append("native[cpu]")
        if cuda and "cuda" in ext.built_backends():
            usable.append("cuda (native[cuda])")
    if triton_available() and cuda:
        usable.append("triton[cuda]")
    if triton_available() and triton_interpreted():
        usable.append("triton[cpu, interpreter]")
    lines.append(f"usable      {', '.join(usable)}")
    forced = forced_backend()
    lines.append(
        f"override    {forced or 'auto'} (LORS_KERNELS_BACKEND=triton|native|cuda|reference, lors_kernels.set_backend)"
    )
    blocked = _why_not_usable(forced, usable)
    if blocked:
        lines.append(
            f"warning     backend '{forced}' is forced but cannot run here: {blocked}; "
            "calls that have a kernel of it fail until the override is removed"
        )
    return "\n".join(lines)


def _why_not_usable(forced: str | None, usable: list) -> str | None:
    """Why a forced backend has nothing usable on this machine (None when it has, or none is forced)."""
    if forced in (None, "reference") or any(u.startswith(forced) for u in usable):
        return None
    if forced == "triton":
        return (
            "triton is not installed"
            if not triton_available()
            else "no CUDA device, and TRITON_INTERPRET=1 is not set for CPU tensors"
        )
    if native() is None:
        return f"the native extension is not built ({_native_error})"
    return "the native extension was built without CUDA, or there is no CUDA device"
