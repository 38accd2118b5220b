"""Helpers shared by the `python -m cir.<tool>` entry points."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from cir.errors import UserError


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1, written in digits only (no sign, spaces or "_")."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Run `main(argv)`, turning a UserError into a one-line message on stderr and exit code 2."""
    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
