"""The CUDA sources of msidtrans_fast._C compile, also on machines without a GPU or CUDA torch.

The .cu kernels include no torch headers, so nvcc compiles them on their own. The CUDA branches of
the per-op .cpp files (under WITH_CUDA) need torch's c10/cuda headers: they are syntax-checked with
the host compiler; a CPU build of torch lacks one generated header (c10/cuda/impl/
cuda_cmake_macros.h, which only holds build macros), so an empty stand-in is supplied when absent.
The toolkit is the one setup.py would use (build_config.find_toolkit), and the C++ standard and
ABI flags are those of the installed torch's own extension build (build_config.torch_cxx_flags).
Runs where a CUDA toolkit is found; skips otherwise.
"""

import os
import subprocess
from pathlib import Path

import pytest
from conftest import load_build_config

bc = load_build_config()

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
TOOLKIT, PROBLEM = bc.find_toolkit()

pytestmark = pytest.mark.skipif(TOOLKIT is None, reason=f"no usable CUDA toolkit: {PROBLEM}")


def torch_flags() -> list[str]:
    return bc.torch_cxx_flags(pytest.importorskip("torch.utils.cpp_extension"))


@pytest.mark.parametrize("source", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cu_source_compiles_standalone(source, tmp_path):
    arch = os.environ.get("MSID_TEST_CUDA_ARCH", "sm_90")
    std = torch_flags()[0]
    cmd = [TOOLKIT.nvcc, std, "-O3", f"-arch={arch}", "--Werror", "all-warnings",
           "-I", str(CSRC), "-c", str(CSRC / source), "-o", str(tmp_path / "out.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "out.o").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("source", ["haar_split.cpp", "remove_small_regions.cpp"])
def test_cuda_dispatch_code_compiles(source, tmp_path):
    torch_ext = pytest.importorskip("torch.utils.cpp_extension")
    includes = [f"-I{p}" for p in torch_ext.include_paths()]
    macros = Path(torch_ext.include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not macros.exists():
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        includes.append(f"-I{tmp_path / 'stub'}")
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, *torch_flags(), "-fsyntax-only", "-DWITH_CUDA", *includes,
           f"-I{Path(TOOLKIT.home) / 'include'}", f"-I{CSRC}", str(CSRC / source)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr[-4000:]}"
