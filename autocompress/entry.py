"""The ``autocompress`` console script. It exists to catch Ctrl-C from the very first moment: while the
command line's own dependencies import (typer, rich), before :func:`autocompress.cli.main` can install its
handlers, a Ctrl-C would otherwise end in Python's bare KeyboardInterrupt traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        raise SystemExit(130) from None
    cli_main()
