"""Build of the optional native extension ``lors_kernels._C`` (metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .

- C++ CPU kernels (csrc/module.cpp, csrc/bindings/*.cpp, csrc/cpu/*.cpp) are always built when torch is
  importable.
- CUDA kernels (csrc/cuda/*.cu) are added when torch has CUDA and a CUDA toolkit is found;
  LORS_KERNELS_BUILD_CUDA=0|1 overrides (1 without a CUDA torch warns and builds the CPU part).
- TORCH_CUDA_ARCH_LIST picks the GPU architectures (torch reads it), MAX_JOBS the ninja jobs.

The extension is optional: the package runs on Triton / PyTorch without it. So this build never fails:
without torch it installs pure Python, and a failed compile warns and installs without ``_C``.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "lors_kernels._C"
CSRC = os.path.join(ROOT, "csrc")  # sources include "cpu/...", "cuda/...", "bindings/..." from here


def say(message: str) -> None:
    print(f"lors_kernels setup: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    bar = "!" * 100
    print(f"\n{bar}\nlors_kernels setup WARNING: {message}\n{bar}", file=sys.stderr, flush=True)


def sources(pattern: str) -> list:
    # Relative paths: setuptools rejects absolute source paths in editable builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda(torch, cpp_extension) -> bool:
    request = os.environ.get("LORS_KERNELS_BUILD_CUDA", "").strip()
    if request not in ("", "0", "1"):
        warn(f"LORS_KERNELS_BUILD_CUDA={request!r} is not 0 or 1; choosing automatically")
        request = ""
    if request == "0":
        say("CUDA kernels off (LORS_KERNELS_BUILD_CUDA=0)")
        return False
    missing = []
    if not torch.version.cuda:
        missing.append(f"torch {torch.__version__} is built without CUDA")
    if cpp_extension.CUDA_HOME is None:
        missing.append("no CUDA toolkit found (set CUDA_HOME)")
    if missing:
        reason = "; ".join(missing)
        if request == "1":
            warn(f"LORS_KERNELS_BUILD_CUDA=1 but {reason}: building the CPU kernels only")
        else:
            say(f"building the CPU kernels only: {reason}")
        return False
    if not sources("csrc/cuda/*.cu"):
        say("no csrc/cuda/*.cu sources: building the CPU kernels only")
        return False
    return True


def extensions_and_commands():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as err:  # e.g. an isolated build: pip install without --no-build-isolation
        say(
            f"torch is not importable at build time ({err}): installing pure Python without "
            "lors_kernels._C. Rebuild with `pip install --no-build-isolation -e .` to get it."
        )
        return [], {}

    # -std is left to torch: it adds the standard its own headers need (C++17 or, since 2.10, C++20).
    cxx, link = ["-O3", "-fopenmp"], ["-fopenmp"]
    if sys.platform == "win32":
        cxx, link = ["/O2", "/openmp"], []
    elif sys.platform == "darwin":  # Apple clang has no -fopenmp: the kernels then run on one thread
        cxx, link = ["-O3"], []
    cpu_sources = sources("csrc/module.cpp") + sources("csrc/bindings/*.cpp") + sources("csrc/cpu/*.cpp")
    # Name fixed here (torch also adds it to the extension it builds itself): the CPU-only retry needs it.
    defines = [("TORCH_EXTENSION_NAME", "_C"), ("TORCH_API_INCLUDE_EXTENSION_H", None)]

    # Fresh argument lists per extension: torch appends its flags to them in place.
    cpu_ext = cpp_extension.CppExtension(
        EXT_NAME,
        cpu_sources,
        define_macros=list(defines),
        include_dirs=[CSRC],
        extra_compile_args={"cxx": list(cxx)},
        extra_link_args=list(link),
    )
    if not want_cuda(torch, cpp_extension):
        return [cpu_ext], {"build_ext": optional_build_ext(cpp_extension.BuildExtension)}

    say(
        f"building CPU + CUDA kernels (CUDA {torch.version.cuda}, toolkit {cpp_extension.CUDA_HOME}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<detected GPUs>')})"
    )
    cuda_ext = cpp_extension.CUDAExtension(
        EXT_NAME,
        cpu_sources + sources("csrc/cuda/*.cu"),
        define_macros=defines + [("LORS_WITH_CUDA", None)],
        include_dirs=[CSRC],
        extra_compile_args={"cxx": list(cxx), "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=list(link),
    )
    cuda_ext.cpu_recipe = cpu_ext
    return [cuda_ext], {"build_ext": optional_build_ext(cpp_extension.BuildExtension)}


# What makes an extension CUDA or CPU-only; the rest (name, setuptools' private bookkeeping) is kept.
RECIPE = (
    "sources",
    "include_dirs",
    "define_macros",
    "undef_macros",
    "library_dirs",
    "libraries",
    "runtime_library_dirs",
    "extra_compile_args",
    "extra_link_args",
    "language",
)


def optional_build_ext(base):
    """torch's BuildExtension, made unable to fail the install.

    A failed CUDA build is retried CPU-only; a failed CPU build drops the extension (with a loud
    warning) so that the package still installs and falls back to Triton / PyTorch.
    Failures are caught around the whole of BuildExtension.build_extensions: torch raises from its own
    checks (compiler ABI, CUDA version) before compiling, ninja raises RuntimeError, distutils
    CompileError / LinkError.
    """

    class OptionalBuildExt(base):
        def run(self):
            self.dropped = []
            super().run()
            # An in-place (editable) build must not leave an older _C behind to be imported instead.
            for name in self.dropped if self.inplace else []:
                stale = self.get_ext_fullpath(name)
                if os.path.exists(stale):
                    os.remove(stale)
                    say(f"removed the stale {os.path.relpath(stale, ROOT)} of an earlier build")

        def build_extensions(self):
            compiler = self.compiler
            wrapped = {name: vars(compiler).get(name) for name in ("compile", "_compile")}
            while True:
                try:
                    super().build_extensions()
                    return
                except Exception as err:  # noqa: BLE001 -- any failure of an optional extension
                    retry = [ext for ext in self.extensions if getattr(ext, "cpu_recipe", None) is not None]
                    detail = (str(err).splitlines() or [""])[0][:300]
                    warn(
                        f"building {EXT_NAME} failed: {type(err).__name__}: {detail}"
                        + (" -- retrying without CUDA" if retry else "")
                    )
                if not retry:
                    break
                for ext in retry:
                    recipe = ext.__dict__.pop("cpu_recipe")
                    for attr in RECIPE:
                        setattr(ext, attr, getattr(recipe, attr))
                # BuildExtension wraps the compiler's compile method on every call: undo that first.
                for name, method in wrapped.items():
                    if method is not None:
                        setattr(compiler, name, method)
                    elif name in vars(compiler):
                        delattr(compiler, name)
            warn(
                f"installing lors_kernels WITHOUT its native extension {EXT_NAME}; the package falls back "
                "to Triton / PyTorch implementations. See the compiler output above."
            )
            # Nothing to copy or list as output: editable and wheel builds then proceed without it.
            self.dropped = [ext.name for ext in self.extensions]
            self.extensions = []

    return OptionalBuildExt


ext_modules, cmdclass = extensions_and_commands()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
