"""msidtrans_fast: a fast, faithful implementation of MSI-DTrans for multi-focus image fusion."""

from . import backends
from .backends import available_backends, resolve_backend, unavailable_backends
from .model import MSIDTrans, Network
from .pipeline import FuseOptions, fuse

# Registers backend "triton"; without it "reference" keeps working and unavailable_backends()
# says why.
backends.load_backend("triton", "msidtrans_fast.triton_backend")

__version__ = "0.1.0"

__all__ = ["FuseOptions", "MSIDTrans", "Network", "available_backends", "fuse", "resolve_backend",
           "unavailable_backends", "__version__"]
