"""What every command shares: exit codes and one-line errors, --size, the progress counter."""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time

import pytest

from m2f_deploy.cli.common import Parser, Progress, height_width, run, setup_logging
from m2f_deploy.errors import InputError, M2FError


def test_run_exit_codes(capsys):
    assert run("m2f-x", lambda argv: 0) == 0

    def fails(argv):
        raise InputError("bad.png: not an image")

    assert run("m2f-x", fails) == 1
    assert capsys.readouterr().err == "m2f-x: error: bad.png: not an image\n"

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run("m2f-x", interrupted) == 130
    assert capsys.readouterr().err == "m2f-x: interrupted; nothing was written\n"
    with pytest.raises(M2FError, match="^unrecognized arguments: --nope$"):
        Parser(prog="m2f-x").parse_args(["--nope"])



def test_sigterm_unwinds_as_ctrl_c_and_the_handler_is_put_back(capsys):
    received = []
    guard = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))  # never the default: kill
    try:
        before = signal.getsignal(signal.SIGTERM)

        def killed(argv):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs in the main thread between two bytecodes
                time.sleep(0.01)
            return 0

        assert run("m2f-x", killed) == 130 and received == []
        assert capsys.readouterr().err == "m2f-x: interrupted; nothing was written\n"
        assert signal.getsignal(signal.SIGTERM) is before
        results = []  # outside the main thread (no signal handlers there): runs, and leaves SIGTERM alone
        thread = threading.Thread(target=lambda: results.append(run("m2f-x", lambda argv: 0)))
        thread.start()
        thread.join()
        assert results == [0] and signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, guard)


def test_size():
    assert height_width([64]) == (64, 64) and height_width([64, 96]) == (64, 96)
    with pytest.raises(InputError) as e:
        height_width([1, 2, 3])
    assert str(e.value) == "--size takes H [W], got 3 numbers"


def test_progress_in_a_log_every_tenth():
    stream = io.StringIO()
    progress = Progress(20, "images", stream=stream)
    for _ in range(20):
        progress.step("x.png")
    progress.step(count=0)  # nothing done: nothing printed
    assert stream.getvalue().splitlines() == [f"{n}/20 images" for n in range(2, 21, 2)]
    stream = io.StringIO()
    progress = Progress(3, "images", stream=stream)
    progress.step(count=2)
    progress.step()
    assert stream.getvalue() == "2/3 images\n3/3 images\n" and progress.done == 3
    quiet = io.StringIO()
    Progress(3, "images", quiet=True, stream=quiet).step()
    assert quiet.getvalue() == ""


def test_progress_on_a_terminal_redraws_one_line():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(2, "images", stream=stream)
    progress.step("a.png")
    progress.step("b" * 300)
    progress.close()
    first, second = stream.getvalue().split("\r")[1:]
    assert first == "\033[K1/2 images a.png"
    assert second == ("\r\033[K2/2 images " + "b" * 300)[1:200] + "\n"  # a line of at most 200 characters


@pytest.fixture
def package_logger():
    """setup_logging changes the package's logger: put it back as it was for the other tests."""
    logger = logging.getLogger("m2f_deploy")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield logger
    logger.handlers[:], logger.propagate = saved[0], saved[2]
    logger.setLevel(saved[1])


def test_setup_logging_prints_bare_messages_on_stderr(package_logger, capsys, caplog):
    setup_logging(quiet=False)
    setup_logging(quiet=False)  # twice (a second command in one process): still one handler, one line per message
    logging.getLogger("m2f_deploy.runtime").debug("not shown")
    logging.getLogger("m2f_deploy.runtime").info("wrote %s", "x.onnx")
    logging.getLogger("m2f_deploy").warning("careful")
    captured = capsys.readouterr()
    assert captured.err == "wrote x.onnx\ncareful\n" and captured.out == ""  # the message alone, no level or name
    assert caplog.records == []  # not propagated: the root logger's handlers would print each line a second time
    assert package_logger.level == logging.INFO and not package_logger.propagate


def test_setup_logging_quiet_keeps_warnings(package_logger, capsys):
    setup_logging(quiet=True)
    logging.getLogger("m2f_deploy.runtime").info("wrote x.onnx")
    logging.getLogger("m2f_deploy").warning("careful")
    assert capsys.readouterr().err == "careful\n"
    assert package_logger.level == logging.WARNING


def test_progress_small_totals():
    one = io.StringIO()
    progress = Progress(1, "images", stream=one)
    progress.step()
    assert one.getvalue() == "1/1 images\n"  # one image is still reported
    none = io.StringIO()
    progress = Progress(0, "images", stream=none)
    progress.step()
    progress.close()
    assert none.getvalue() == "" and progress.quiet  # nothing to count: silent


def test_progress_steps_are_whole_tenths():
    stream = io.StringIO()
    progress = Progress(25, "images", stream=stream)
    for _ in range(25):
        progress.step()
    # a tenth of 25 is 2 whole images (not 2.5, which would print at 3, 6, ...); the last one always prints
    assert stream.getvalue().splitlines() == [f"{n}/25 images" for n in [*range(2, 25, 2), 25]]
