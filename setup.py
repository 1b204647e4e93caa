"""Build script: the Python package, the Triton kernels (``msidtrans_fast.kernels``) and the
compiled extension ``msidtrans_fast._C``.

torch must already be installed: install with ``pip install --no-build-isolation -e .`` so that the
extension is built against the torch in your environment (build isolation would fetch another).
"""

from setuptools import setup

PACKAGES = ["msidtrans_fast", "msidtrans_fast.kernels"]
PACKAGE_DIR = {"msidtrans_fast": "msidtrans_fast", "msidtrans_fast.kernels": "kernels"}


def extension_modules():
    """The compiled extension and the build command that builds it (see csrc/)."""
    return [], {}


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
