"""msidtrans_fast: a fast, faithful implementation of MSI-DTrans for multi-focus image fusion."""

from .backends import available_backends, resolve_backend
from .model import MSIDTrans, Network
from .pipeline import FuseOptions, fuse

try:  # registers backend "triton"; a missing or broken triton leaves "reference" working
    from . import triton_backend  # noqa: F401
except Exception as _error:  # noqa: BLE001 - any failure of an optional backend is reported
    import warnings

    warnings.warn(f"msidtrans_fast: Triton backend unavailable ({type(_error).__name__}: "
                  f"{_error})", ImportWarning, stacklevel=2)

__version__ = "0.1.0"

__all__ = ["FuseOptions", "MSIDTrans", "Network", "available_backends", "fuse", "resolve_backend",
           "__version__"]
