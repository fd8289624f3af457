"""csrc/cuda, the native CUDA kernels, as built, without a GPU: every .cu compiles warning-free for sm_80
and sm_90 (nvcc -c, torch's nvcc flags), no csrc/cuda file includes torch, and the bindings' CUDA paths
type-check with the host compiler.
"""

import re
import shutil
import subprocess

import pytest
from helpers import CXX, ROOT
from torch.utils import cpp_extension

CUDA_DIR = ROOT / "csrc" / "cuda"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")


@pytest.mark.toolchain
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", [80, 90], ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_without_warnings(source, arch, tmp_path):
    """Compiled as the CUDA build compiles it (torch's nvcc flags: no implicit half conversions)."""
    cmd = [
        NVCC,
        "-c",
        "-O3",
        "-std=c++17",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        "-Wall,-Wextra,-Werror",
        str(source),
        "-o",
        str(tmp_path / f"{source.stem}.o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), result.stderr


def cuda_include_dir():
    """The toolkit's include directory, as nvcc itself passes it (nvcc may be a wrapper script)."""
    dryrun = subprocess.run([NVCC, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True)
    found = re.search(r'INCLUDES="[^"]*?-I([^"\s]+)', dryrun.stdout + dryrun.stderr)
    return found.group(1) if found else None


BINDINGS = sorted((ROOT / "csrc" / "bindings").glob("*.cpp")) + [ROOT / "csrc" / "module.cpp"]


@pytest.mark.toolchain
@pytest.mark.skipif(NVCC is None or CXX is None, reason="needs nvcc (for the CUDA headers) and a C++ compiler")
@pytest.mark.parametrize("source", BINDINGS, ids=lambda p: p.name)
def test_bindings_compile_with_the_cuda_path(source):
    """Each binding file with LORS_WITH_CUDA, checked by the host compiler against this torch's headers: the
    CUDA functions' checks and launcher calls type-check even where torch has no CUDA. (The CPU wheel
    lacks one generated c10/cuda header; C10_CUDA_NO_CMAKE_CONFIGURE_FILE is torch's switch to skip it.)"""
    include = cuda_include_dir()
    if include is None:
        pytest.skip("could not find the CUDA include directory in nvcc --dryrun")
    import sysconfig

    system = [include, *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    cmd = [
        CXX,
        "-fsyntax-only",
        "-std=c++20",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-DLORS_WITH_CUDA",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        *[flag for path in system for flag in ("-isystem", path)],
        f"-I{ROOT / 'csrc'}",
        str(source),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-6000:]}"


def test_cuda_sources_include_no_torch():
    """The kernels stay plain CUDA (nvcc builds them without torch): only csrc/bindings/ sees torch."""
    files = sorted(p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".h"))
    assert CU_SOURCES and files, f"no CUDA sources under {CUDA_DIR}"
    include = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2)/', re.MULTILINE)
    offenders = [p.name for p in files if include.search(p.read_text())]
    assert not offenders, f"torch headers included by {offenders}"
