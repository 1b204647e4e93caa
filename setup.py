"""Build script: the Python package, the Triton kernels (``msidtrans_fast.kernels``) and the
compiled extension ``msidtrans_fast._C``.

torch must already be installed: install with ``pip install --no-build-isolation -e .`` so that the
extension is built against the torch in your environment (build isolation would fetch another).
"""

from setuptools import setup

PACKAGES = ["msidtrans_fast", "msidtrans_fast.kernels"]
PACKAGE_DIR = {"msidtrans_fast": "msidtrans_fast", "msidtrans_fast.kernels": "kernels"}


def extension_modules():
    """The compiled extension and the build command that builds it (README.md, "Building").

    The C++ CPU part is always built; build_config.py decides whether the CUDA kernels
    (csrc/*.cu) are added and for which GPUs (FORCE_CUDA=0 forces a CPU-only build, FORCE_CUDA=1
    requires CUDA, TORCH_CUDA_ARCH_LIST picks architectures; MAX_JOBS the parallel compile jobs).
    """
    import glob
    import os
    import sys

    try:
        import torch
    except ImportError:
        print("msidtrans_fast: torch is not importable, so msidtrans_fast._C is not built "
              "(install torch, then `pip install --no-build-isolation -e .`)", file=sys.stderr)
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    import build_config

    try:
        plan = build_config.plan_from_environment(torch)
    except build_config.BuildConfigError as e:
        sys.exit(f"msidtrans_fast: {e}")
    print(f"msidtrans_fast: {plan.reason}", file=sys.stderr)
    if plan.with_cuda:
        # torch reads these when cpp_extension is imported / when it compiles: set them first
        os.environ["CUDA_HOME"] = plan.cuda_home
        if plan.arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list
    from torch.utils import cpp_extension

    cpp = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cpp")))
    cuda = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cu")))
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard and ABI flags come from torch
    if plan.with_cuda:
        ext = cpp_extension.CUDAExtension(
            "msidtrans_fast._C", cpp + cuda, define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("msidtrans_fast._C", cpp,
                                         extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=["-fopenmp"])
    build = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = extension_modules()

setup(
    name="msidtrans_fast",
    version="0.1.0",
    description="Fast, faithful MSI-DTrans multi-focus image fusion: fused kernels, CLI and API",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"msidtrans_fast": ["data/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "ninja",
        "pybind11",
        "pillow",  # image IO: 8-bit formats, 16-bit grayscale (msidtrans_fast/io.py)
        "tifffile",  # image IO: TIFF, 16-bit RGB included
        "pypng",  # image IO: 16-bit PNG (Pillow truncates 16-bit RGB)
        "tqdm",  # progress bars of the command-line tools
        "opencv-python-headless>=4.5",  # registration of the sources (msidtrans_fast/align.py)
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "PyWavelets", "scikit-image"],
    },
    entry_points={"console_scripts": [
        "msidtrans-fuse = msidtrans_fast.cli:main",
        "msidtrans-train = msidtrans_fast.training:main",
        "msidtrans-eval = msidtrans_fast.evaluate:main",
    ]},
)
