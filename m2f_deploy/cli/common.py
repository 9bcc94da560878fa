"""What every command shares: one readable line and exit code 1 for user errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from m2f_deploy.errors import M2FError


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("m2f_deploy")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def run(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; an :class:`M2FError` becomes ``prog: error: ...`` on stderr and exit code 1.

    Any other exception is a bug and keeps its traceback.
    """
    try:
        return main(argv)
    except M2FError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line and exit code 1, like every other user error."""

    def error(self, message: str):  # noqa: D102
        raise M2FError(message)
