"""m2f_deploy.utils.atomic_output: the usual file mode without touching the umask, fsync before and after the
rename, nothing left behind on failure."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from m2f_deploy import utils
from m2f_deploy.utils import atomic_output, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
@pytest.mark.parametrize("proc", [True, False], ids=["proc-status", "probe-file"])
def test_the_result_gets_the_mode_of_a_new_file(tmp_path, umask, proc):
    script = textwrap.dedent(
        f"""
        import os, pathlib
        from m2f_deploy import utils
        if not {proc}:
            utils._PROC_STATUS = pathlib.Path({str(tmp_path / "no-such-file")!r})
        os.umask({umask})
        utils.atomic_write_text({str(tmp_path / "out.txt")!r}, "x")
        print(oct(os.stat({str(tmp_path / "out.txt")!r}).st_mode & 0o777))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert out.strip() == oct(0o666 & ~umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no probe or temporary file left


def test_the_umask_is_read_without_setting_it(tmp_path, monkeypatch):
    def forbidden(mask):
        raise AssertionError("os.umask changes the umask of every thread")

    monkeypatch.setattr(os, "umask", forbidden)
    for proc in (utils._PROC_STATUS, tmp_path / "no-such-file"):
        monkeypatch.setattr(utils, "_PROC_STATUS", proc)
        atomic_write_text(tmp_path / "a.txt", "a")
        assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) & 0o600 == 0o600


def test_the_file_is_flushed_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    fsync, replace, chmod = os.fsync, os.replace, os.chmod

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def record_replace(src, dst):
        events.append(("replace", str(src)))
        replace(src, dst)

    def record_chmod(path, mode):
        events.append(("chmod", str(path)))
        chmod(path, mode)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    monkeypatch.setattr(os, "chmod", record_chmod)
    with atomic_output(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"data")
    # flushed while mkstemp's 0o600 still lets it be opened (a strict umask's mode may not)
    assert events == [("fsync", str(tmp)), ("chmod", str(tmp)), ("replace", str(tmp)), ("fsync", str(tmp_path))]
    assert (tmp_path / "out.bin").read_bytes() == b"data"


def test_a_failure_leaves_the_old_file_and_nothing_else(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.parametrize("error", [OSError(22, "Invalid argument"), PermissionError(13, "Permission denied")])
def test_a_folder_that_cannot_be_flushed_does_not_fail_a_published_file(tmp_path, monkeypatch, error):
    fsync = os.fsync

    def no_folder_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise error
        fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folder_fsync)
    assert atomic_write_text(tmp_path / "out.txt", "new").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
