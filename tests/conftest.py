"""Shared test configuration.

Triton kernels run through Triton's interpreter on machines without a CUDA GPU; the variable must be
set before triton is first imported, hence here. TRITON_INTERPRET is read once per process, so a
process runs the kernels either compiled on CUDA tensors or interpreted on CPU tensors: the
``kernel_device`` fixture gives the kernel tests that device, so the same assertions run compiled
on a GPU machine and in the interpreter elsewhere.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
TESTS_DIR = Path(__file__).resolve().parent

#: Where the Triton kernels run in this process: "cpu" (interpreter) or "cuda" (compiled).
KERNEL_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"


def load_build_config():
    """The repository's build_config.py (what setup.py decides with; not an installed module)."""
    spec = importlib.util.spec_from_file_location("build_config", REPO_ROOT / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_config", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def shared_path(*parts: str) -> Path:
    """A path under ``../shared``; skips the calling test when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the project's shared data beside the repo")
    return path


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def kernel_device():
    """The device of the Triton kernel tests' tensors (see the module docstring). On CUDA, TF32
    is switched off for the test so that fp32 references (convolutions, matmuls) stay fp32.

    The flags are saved and restored by hand: pytest's monkeypatch cannot patch torch's
    ``torch.backends.cuda.matmul`` on newer releases, whose attributes are computed."""
    if KERNEL_DEVICE != "cuda":
        yield torch.device(KERNEL_DEVICE)
        return
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no CUDA GPU: the kernels cannot run")
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield torch.device(KERNEL_DEVICE)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved
