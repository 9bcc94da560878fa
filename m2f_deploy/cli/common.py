"""What every command shares: one readable line and exit code 1 for user errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from m2f_deploy.errors import InputError, M2FError


def setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("m2f_deploy")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def run(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main``; an :class:`M2FError` becomes ``prog: error: ...`` on stderr and exit code 1.

    SIGTERM is handled as SIGINT (a ``KeyboardInterrupt``, exit code 130), so that ``with`` blocks remove their
    temporary files and folders on ``kill`` too. A command that has written something reports it itself.
    Any other exception is a bug and keeps its traceback.
    """
    import signal
    import threading

    def terminate(signum, frame):  # SIGTERM unwinds as Ctrl-C does: temporary files and folders are removed
        raise KeyboardInterrupt

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return main(argv)
    except M2FError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line and exit code 1, like every other user error."""

    def error(self, message: str):  # noqa: D102
        raise M2FError(message)


def height_width(size: list[int]) -> tuple[int, int]:
    """``--size H [W]`` -> (H, W); one number means a square."""
    if not 1 <= len(size) <= 2:
        raise InputError(f"--size takes H [W], got {len(size)} numbers")
    return (size * 2)[0], (size * 2)[1]


class Progress:
    """A one-line progress counter on stderr (``12/40 images``), redrawn in place on a terminal.

    Off with ``quiet``; where stderr is not a terminal (logs, CI) it prints only at every tenth of the way.
    """

    def __init__(self, total: int, unit: str, *, quiet: bool = False, stream=None):
        self.total, self.unit, self.done = total, unit, 0
        self.stream = stream or sys.stderr
        self.quiet = quiet or total == 0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_report = 0

    def step(self, label: str = "", count: int = 1) -> None:
        if count <= 0:
            return
        self.done += count
        if self.quiet:
            return
        if self.tty:
            self.stream.write(f"\r\033[K{self.done}/{self.total} {self.unit} {label}"[:200])
            self.stream.flush()
        elif self.done == self.total or self.done - self._last_report >= max(1, self.total // 10):
            self._last_report = self.done
            self.stream.write(f"{self.done}/{self.total} {self.unit}\n")

    def close(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")
