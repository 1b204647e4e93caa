"""How ``setup.py`` builds ``msidtrans_fast._C``: with or without CUDA kernels, and for which GPUs.

The decision (:func:`plan_build`) is a pure function of what was found, so that it can be tested
for every situation without building anything:

- ``FORCE_CUDA=0`` builds the CPU part only; ``FORCE_CUDA=1`` requires the CUDA kernels (the build
  stops with one line saying what is missing); unset, the CUDA kernels are built when they can be.
- They can be when torch is a CUDA build and a CUDA toolkit is found whose nvcc has torch's CUDA
  major version and whose headers exist. The toolkit is looked for in ``CUDA_HOME``, then
  ``CUDA_PATH``, then behind the ``nvcc`` on ``PATH`` (asking nvcc where it really lives, since
  ``nvcc`` is often a wrapper script or a symlink), then in ``/usr/local/cuda``.
- Architectures: ``TORCH_CUDA_ARCH_LIST`` when set; else the visible GPUs' (torch's default);
  with no GPU visible, :data:`DEFAULT_ARCHS` (those this nvcc supports), the last with PTX so that
  newer GPUs can JIT-compile it.

Anything that prevents the CUDA kernels (without ``FORCE_CUDA=1``) gives a CPU-only extension and a
one-line reason, never a failed install.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Compute capabilities built when no GPU is visible: Ampere (A100; sm_86/89 run sm_80 code),
#: Hopper, Blackwell datacentre and consumer; the last also as PTX for newer GPUs.
DEFAULT_ARCHS = ("8.0", "9.0", "10.0", "12.0")
FALSE_WORDS = ("0", "false", "no", "off")
TRUE_WORDS = ("1", "true", "yes", "on")


class BuildConfigError(RuntimeError):
    """The build cannot be done as asked (``FORCE_CUDA=1`` without what CUDA needs)."""


@dataclass(frozen=True)
class Toolkit:
    """A CUDA toolkit: its root folder, nvcc, nvcc's version and the architectures it compiles."""

    home: str
    nvcc: str
    version: tuple[int, int] | None
    archs: tuple[str, ...]  # "8.0", "9.0", ...; empty when nvcc could not list them


@dataclass(frozen=True)
class BuildPlan:
    """What to build. ``arch_list`` is the TORCH_CUDA_ARCH_LIST to set (None: leave it to the
    environment or torch's default for the visible GPUs)."""

    with_cuda: bool
    reason: str
    cuda_home: str | None = None
    arch_list: str | None = None


def _run(cmd: list[str]) -> str | None:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout + result.stderr if result.returncode == 0 else None


def _nvcc_home(nvcc: str) -> str | None:
    """The toolkit root of an nvcc on PATH: where nvcc says it lives (``_HERE_`` of a dry run),
    which sees through wrapper scripts, else the folder above its resolved path."""
    out = _run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull]) or ""
    match = re.search(r"^#\$ _HERE_=(.+)$", out, re.MULTILINE)
    bin_dir = Path(match.group(1).strip()) if match else Path(os.path.realpath(nvcc)).parent
    return str(bin_dir.parent)


def inspect_toolkit(home: str) -> tuple[Toolkit | None, str | None]:
    """(toolkit, None) if ``home`` holds a usable CUDA toolkit, else (None, what is wrong)."""
    nvcc = os.path.join(home, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return None, f"no nvcc in {home}/bin"
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
        return None, f"CUDA headers missing ({home}/include/cuda_runtime_api.h not found)"
    out = _run([nvcc, "--version"]) or ""
    match = re.search(r"release (\d+)\.(\d+)", out)
    version = (int(match.group(1)), int(match.group(2))) if match else None
    listed = _run([nvcc, "--list-gpu-arch"]) or ""
    archs = tuple(f"{int(n) // 10}.{int(n) % 10}" for n in re.findall(r"compute_(\d+)", listed))
    return Toolkit(home, nvcc, version, archs), None


def find_toolkit(environ: dict | None = None) -> tuple[Toolkit | None, str | None]:
    """Finds a CUDA toolkit (see the module docstring for the order); (None, reason) if none."""
    environ = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            toolkit, problem = inspect_toolkit(environ[var])
            return toolkit, None if toolkit else f"{var}={environ[var]}: {problem}"
    nvcc = shutil.which("nvcc", path=environ.get("PATH"))
    if nvcc is not None:
        home = _nvcc_home(nvcc)
        toolkit, problem = inspect_toolkit(home)
        return toolkit, None if toolkit else f"nvcc on PATH ({nvcc}, toolkit {home}): {problem}"
    if os.path.isdir("/usr/local/cuda"):
        return inspect_toolkit("/usr/local/cuda")
    return None, "no CUDA toolkit found (nvcc not on PATH, CUDA_HOME unset)"


def default_arch_list(toolkit_archs: tuple[str, ...]) -> str | None:
    """TORCH_CUDA_ARCH_LIST for a build without a visible GPU, or None if nvcc supports none."""
    archs = [a for a in DEFAULT_ARCHS if not toolkit_archs or a in toolkit_archs]
    return ";".join(archs) + "+PTX" if archs else None


def plan_build(force_cuda: str | None, torch_cuda: str | None, toolkit: Toolkit | None,
               toolkit_problem: str | None, visible_gpu_archs: list[str],
               env_arch_list: str | None) -> BuildPlan:
    """Decides the build.

    Args:
        force_cuda: the FORCE_CUDA variable (None when unset).
        torch_cuda: ``torch.version.cuda`` ("13.0"), None for a CPU build of torch.
        toolkit, toolkit_problem: what :func:`find_toolkit` returned.
        visible_gpu_archs: compute capabilities of the visible GPUs ("9.0", ...).
        env_arch_list: the TORCH_CUDA_ARCH_LIST variable (None when unset).

    Raises:
        BuildConfigError: FORCE_CUDA=1 and the CUDA kernels cannot be built, or FORCE_CUDA has a
            value that is not a yes or a no.
    """
    force = (force_cuda or "").strip().lower()
    if force and force not in FALSE_WORDS + TRUE_WORDS:
        raise BuildConfigError(f"FORCE_CUDA must be 0 or 1, got {force_cuda!r}")
    if force in FALSE_WORDS:
        return BuildPlan(False, "CPU-only build (FORCE_CUDA=0)")

    def cpu_only(why: str) -> BuildPlan:
        if force in TRUE_WORDS:
            raise BuildConfigError(f"FORCE_CUDA=1, but the CUDA kernels cannot be built: {why}")
        return BuildPlan(False, f"building the CPU part only: {why}")

    if torch_cuda is None:
        return cpu_only("torch is a CPU-only build")
    if toolkit is None:
        return cpu_only(toolkit_problem or "no CUDA toolkit found")
    torch_major = int(torch_cuda.split(".")[0])
    if toolkit.version is None:
        return cpu_only(f"could not read the version of {toolkit.nvcc}")
    if toolkit.version[0] != torch_major:
        return cpu_only(f"nvcc {toolkit.version[0]}.{toolkit.version[1]} ({toolkit.nvcc}) cannot "
                        f"build for torch's CUDA {torch_cuda} (major versions differ)")
    if env_arch_list:
        return BuildPlan(True, f"CUDA kernels for TORCH_CUDA_ARCH_LIST={env_arch_list}",
                         toolkit.home)
    if visible_gpu_archs:
        return BuildPlan(True, "CUDA kernels for the visible GPUs (compute capability "
                         f"{', '.join(sorted(set(visible_gpu_archs)))})", toolkit.home)
    archs = default_arch_list(toolkit.archs)
    if archs is None:
        return cpu_only(f"nvcc {toolkit.nvcc} supports none of {', '.join(DEFAULT_ARCHS)}")
    return BuildPlan(True, f"CUDA kernels for {archs} (no GPU visible: the default list; set "
                     "TORCH_CUDA_ARCH_LIST to choose)", toolkit.home, archs)


def plan_from_environment(torch) -> BuildPlan:
    """:func:`plan_build` for this machine, the installed ``torch`` module and ``os.environ``."""
    force = os.environ.get("FORCE_CUDA")
    if (force or "").strip().lower() in FALSE_WORDS or torch.version.cuda is None:
        toolkit, problem = None, None  # not needed: no toolkit look-up, no nvcc runs
    else:
        toolkit, problem = find_toolkit()
    gpus = []
    if torch.version.cuda is not None and torch.cuda.is_available():
        gpus = [".".join(map(str, torch.cuda.get_device_capability(i)))
                for i in range(torch.cuda.device_count())]
    return plan_build(force, torch.version.cuda, toolkit, problem, gpus,
                      os.environ.get("TORCH_CUDA_ARCH_LIST"))


def torch_cxx_flags(cpp_extension) -> list[str]:
    """The C++ standard and ABI flags torch's BuildExtension compiles extensions with, read from
    the installed torch (``-std=c++17`` for older releases, ``-std=c++20`` for newer ones)."""
    import torch

    source = inspect.getsource(cpp_extension.BuildExtension.build_extensions)
    standards = [int(s) for s in re.findall(r"c\+\+(\d\d)", source)]
    std = f"-std=c++{max(standards)}" if standards else "-std=c++17"
    return [std, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
