"""msidtrans_fast: a fast, faithful implementation of MSI-DTrans for multi-focus image fusion."""

from .backends import available_backends, resolve_backend
from .model import MSIDTrans, Network
from .pipeline import fuse

__version__ = "0.1.0"

__all__ = ["MSIDTrans", "Network", "available_backends", "fuse", "resolve_backend", "__version__"]
