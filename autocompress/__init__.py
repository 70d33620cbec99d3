"""autocompress: plugin-based AutoML search for compressing BERT-style transformer classifiers.

Importing this package is light: no torch model loading, no Ray. Heavy modules load on use.
"""

from __future__ import annotations

from .errors import AutocompressError
from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["AutocompressError", "hookimpl", "__version__", "load"]


def load(path: str, *, device: str = "cpu"):
    """Load a compressed model saved by autocompress (safetensors + JSON recipe; no pickles)."""
    from .modeling import load_compressed

    return load_compressed(path, device=device)
