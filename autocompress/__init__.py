"""autocompress: plugin-based AutoML search for compressing BERT-style transformer classifiers.

Importing this package is light: no torch model loading, no Ray. Heavy modules load on use.
"""

from __future__ import annotations

from .errors import AutocompressError
from .hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["AutocompressError", "hookimpl", "__version__", "load", "load_tokenizer", "load_predictor"]


def load(path: str, *, device: str = "cpu"):
    """Load a compressed model saved by autocompress (safetensors + JSON recipe; no pickles)."""
    from .modeling import load_compressed

    return load_compressed(path, device=device)


def load_tokenizer(path: str):
    """The tokenizer saved next to a model by ``autocompress export`` (the study's base-model tokenizer)."""
    from .export import load_tokenizer_dir

    return load_tokenizer_dir(path)


def load_predictor(path: str, *, device: str = "cpu"):
    """Model + tokenizer of an export directory as one callable: ``load_predictor(d)(["text"])`` returns
    ``[(label, probability)]``, tokenised exactly as during the search."""
    from .export import Predictor

    return Predictor.load(path, device=device)
