"""``python -m fastserial`` and the ``fastserial`` console script: see :mod:`fastserial.cli`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Runs ``fastserial COMMAND ...``; returns the exit status."""
    from .cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
