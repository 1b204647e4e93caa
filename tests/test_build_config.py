"""The build decision of setup.py (build_config.py) in faked torch / toolkit / GPU situations."""

import stat
from pathlib import Path

import pytest
from conftest import load_build_config

bc = load_build_config()

CUDA13 = bc.Toolkit("/opt/cuda-13.0", "/opt/cuda-13.0/bin/nvcc", (13, 0),
                    ("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"))


def plan(force=None, torch_cuda="13.0", toolkit=CUDA13, problem=None, gpus=(), arch_env=None):
    return bc.plan_build(force, torch_cuda, toolkit, problem, list(gpus), arch_env)


def test_cpu_torch_builds_cpu_only():
    p = plan(torch_cuda=None)
    assert not p.with_cuda and "CPU-only build" in p.reason


def test_cuda_torch_without_gpu_builds_default_architectures():
    p = plan()
    assert p.with_cuda and p.cuda_home == "/opt/cuda-13.0"
    assert p.arch_list == "8.0;9.0;10.0;12.0+PTX"
    assert "8.0" in p.arch_list and "9.0" in p.arch_list


def test_default_architectures_are_limited_to_what_nvcc_supports():
    old = bc.Toolkit("/c", "/c/bin/nvcc", (13, 0), ("7.5", "8.0", "8.6", "9.0"))
    assert plan(toolkit=old).arch_list == "8.0;9.0+PTX"
    unknown = bc.Toolkit("/c", "/c/bin/nvcc", (13, 0), ())  # nvcc could not list them
    assert plan(toolkit=unknown).arch_list == "8.0;9.0;10.0;12.0+PTX"
    none = bc.Toolkit("/c", "/c/bin/nvcc", (13, 0), ("5.0", "6.0"))
    assert not plan(toolkit=none).with_cuda


def test_visible_gpus_and_explicit_arch_list_are_left_to_torch():
    p = plan(gpus=["9.0", "9.0"])
    assert p.with_cuda and p.arch_list is None and "9.0" in p.reason
    p = plan(arch_env="8.6")
    assert p.with_cuda and p.arch_list is None and "8.6" in p.reason


def test_missing_or_mismatched_toolkit_builds_cpu_only_with_a_reason():
    p = plan(toolkit=None, problem="CUDA headers missing (/usr/local/include/x.h not found)")
    assert not p.with_cuda and "headers missing" in p.reason
    p = plan(toolkit=bc.Toolkit("/c", "/c/bin/nvcc", (12, 4), ("9.0",)))
    assert not p.with_cuda and "12.4" in p.reason and "13.0" in p.reason
    p = plan(toolkit=bc.Toolkit("/c", "/c/bin/nvcc", None, ("9.0",)))
    assert not p.with_cuda and "version" in p.reason


@pytest.mark.parametrize("word", ["0", "false", "no", "OFF"])
def test_force_cuda_off_means_cpu_only(word):
    p = plan(force=word)
    assert not p.with_cuda and "FORCE_CUDA=0" in p.reason


def test_force_cuda_on_requires_cuda():
    assert plan(force="1").with_cuda
    with pytest.raises(bc.BuildConfigError, match="CPU-only build"):
        plan(force="1", torch_cuda=None)
    with pytest.raises(bc.BuildConfigError, match="no CUDA toolkit"):
        plan(force="1", toolkit=None, problem="no CUDA toolkit found")
    with pytest.raises(bc.BuildConfigError, match="must be 0 or 1"):
        plan(force="maybe")


def _fake_toolkit(root: Path, headers=True, release="13.0") -> Path:
    """A folder laid out as a CUDA toolkit whose nvcc is a script answering like the real one."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    if headers:
        (root / "include" / "cuda_runtime_api.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(
        "#!/bin/sh\n"
        "case \"$1\" in\n"
        f"  --version) echo 'Cuda compilation tools, release {release}, V{release}.1';;\n"
        "  --list-gpu-arch) printf 'compute_80\\ncompute_90\\n';;\n"
        f"  --dryrun) echo '#$ _HERE_={root}/bin' >&2;;\n"
        "esac\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return root


def test_toolkit_is_found_behind_an_nvcc_wrapper(tmp_path):
    home = _fake_toolkit(tmp_path / "cuda-13.0")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    wrapper = wrappers / "nvcc"  # as /usr/local/bin/nvcc: a script exec'ing the real one
    wrapper.write_text(f"#!/bin/sh\nexec {home}/bin/nvcc \"$@\"\n")
    wrapper.chmod(0o755)
    toolkit, problem = bc.find_toolkit({"PATH": str(wrappers)})
    assert problem is None
    assert toolkit.home == str(home) and toolkit.version == (13, 0)
    assert toolkit.archs == ("8.0", "9.0")


def test_cuda_home_takes_precedence_and_missing_headers_are_reported(tmp_path):
    good = _fake_toolkit(tmp_path / "good")
    bad = _fake_toolkit(tmp_path / "bad", headers=False)
    toolkit, _ = bc.find_toolkit({"CUDA_HOME": str(good), "PATH": ""})
    assert toolkit.home == str(good)
    toolkit, problem = bc.find_toolkit({"CUDA_PATH": str(bad), "PATH": ""})
    assert toolkit is None and "headers missing" in problem and "CUDA_PATH" in problem


def test_torch_cxx_flags_follow_the_installed_torch():
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    import torch

    std, abi = bc.torch_cxx_flags(cpp_extension)
    assert std in ("-std=c++17", "-std=c++20", "-std=c++23")
    assert abi == f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


def test_this_machine_gets_a_plan():
    torch = pytest.importorskip("torch")
    p = bc.plan_from_environment(torch)
    assert p.reason
    assert not p.with_cuda or torch.version.cuda is not None
