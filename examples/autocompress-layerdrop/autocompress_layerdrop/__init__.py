"""autocompress-layerdrop: a third-party autocompress technique plugin that removes whole encoder layers.

The plugin module registered in the ``autocompress`` entry-point group is
:mod:`autocompress_layerdrop.layer_drop`.
"""

from __future__ import annotations

__version__ = "0.1.0"
