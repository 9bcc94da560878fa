"""Small helpers shared by every part (no torch)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_PROC_STATUS = Path("/proc/self/status")


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is flushed to disk and renamed onto ``path``.

    An exception (or an interrupt) removes the temporary file, so nothing that looks finished is ever left behind.
    The file is fsynced before the rename and its folder after it (where the filesystem can), so that a crash
    (power loss) leaves the old file or the whole new one, never a renamed empty one. The result gets the mode a
    new file gets here (0o666 less the umask), not mkstemp's private 0o600.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)  # before the chmod: a strict umask (e.g. 0o477) could leave a mode it cannot be read with
        os.chmod(tmp_path, _new_file_mode(path.parent))
        os.replace(tmp_path, path)
        try:
            _fsync(path.parent)
        except OSError:  # published already: some filesystems cannot fsync a folder (EINVAL) or open it (EACCES)
            pass
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _new_file_mode(folder: Path) -> int:
    """0o666 less the process's umask, read without changing it (``os.umask`` can only read by setting, which
    races with other threads creating files): from ``/proc/self/status`` on Linux, else from a probe file."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    probe = folder / f".umask-probe-{os.getpid()}-{os.urandom(4).hex()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (folders: POSIX only; Windows cannot open them)."""
    if path.is_dir() and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()


def parse_json_object(text: str, where: str, error: type[Exception]) -> dict[str, Any]:
    """``json.loads`` that must give an object; otherwise one ``error`` naming ``where``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(value, dict):
        raise error(f"{where}: expected a JSON object")
    return value


def did_you_mean(value: str, choices, cutoff: float = 0.6) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or an empty string."""
    import difflib

    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""
