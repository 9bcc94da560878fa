"""The GPU's name and compute capability from the CUDA driver (libcuda through ctypes; no CUDA toolkit needed)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from dataclasses import dataclass

from m2f_deploy.errors import BackendError

_COMPUTE_CAPABILITY_MAJOR, _COMPUTE_CAPABILITY_MINOR = (
    75,
    76,
)  # CUdevice_attribute values


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.9"


def _driver() -> ctypes.CDLL:
    for name in ("libcuda.so.1", ctypes.util.find_library("cuda"), "nvcuda.dll"):
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise BackendError("no CUDA driver found (libcuda): this machine has no usable NVIDIA GPU")


def gpu_info(device: int = 0) -> GpuInfo:
    """Name and compute capability of CUDA device ``device``; :class:`BackendError` when there is none."""
    cuda = _driver()

    def call(what: str, status: int) -> None:
        if status != 0:
            raise BackendError(f"CUDA driver call {what} failed with status {status} (is a GPU present and free?)")

    handle, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    call("cuInit", cuda.cuInit(0))
    count = ctypes.c_int()
    call("cuDeviceGetCount", cuda.cuDeviceGetCount(ctypes.byref(count)))
    if not 0 <= device < count.value:
        raise BackendError(f"CUDA device {device} does not exist (this machine has {count.value})")
    call("cuDeviceGet", cuda.cuDeviceGet(ctypes.byref(handle), device))
    call("cuDeviceGetName", cuda.cuDeviceGetName(name, len(name), handle))
    call(
        "cuDeviceGetAttribute",
        cuda.cuDeviceGetAttribute(ctypes.byref(major), _COMPUTE_CAPABILITY_MAJOR, handle),
    )
    call(
        "cuDeviceGetAttribute",
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), _COMPUTE_CAPABILITY_MINOR, handle),
    )
    return GpuInfo(name.value.decode(errors="replace"), f"{major.value}.{minor.value}")


# -- the CUDA runtime library (libcudart) for Polygraphy's CUDA helpers ---------------------------------------------
# Polygraphy looks for libcudart.so* on LD_LIBRARY_PATH, in /usr/local/cuda/lib64, /usr/lib, /lib and (0.53+) in the
# nvidia-cuda-runtime-cu12 wheel's folder. A pip-only TensorRT install may have it elsewhere: the CUDA 13 wheels
# (nvidia/cu13/lib), a distribution's multiarch folder, JetPack's /usr/local/cuda-*/. We look there too and put the
# folder found on LD_LIBRARY_PATH (PATH on Windows; Polygraphy reads it when it first loads the library). Found
# nowhere: a warning, and Polygraphy tries its own search and then the loader's default paths (ld.so.cache).
WINDOWS = sys.platform.startswith("win")
CUDART_GLOB = "cudart64_*.dll" if WINDOWS else "libcudart.so*"


def cudart_dirs() -> list[str]:
    """Folders that may hold libcudart, most specific first."""
    import glob
    import os
    import site
    import sys

    dirs = [d for d in os.environ.get("PATH" if WINDOWS else "LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    roots = [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]  # fmt: skip
    subs = ("bin", "bin/x64") if WINDOWS else ("lib64", "lib", "targets/x86_64-linux/lib", "targets/aarch64-linux/lib")
    dirs += [os.path.join(r, sub) for r in roots if r for sub in subs]
    packages = [*sys.path, *site.getsitepackages(), site.getusersitepackages()]
    for root in dict.fromkeys(p for p in packages if p and os.path.isdir(os.path.join(p, "nvidia"))):
        # cuda_runtime (cu12), cu13, ...
        dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "bin" if WINDOWS else "lib")))
    dirs += [os.path.join(sys.prefix, "Library", "bin") if WINDOWS else os.path.join(sys.prefix, "lib")]  # conda
    if not WINDOWS:
        dirs += ["/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib"]
    return list(dict.fromkeys(os.path.normpath(d) for d in dirs))


def find_cudart(dirs: list[str] | None = None) -> str | None:
    """The first libcudart.so* in :func:`cudart_dirs` (or ``dirs``), or None."""
    import glob
    import os

    for folder in cudart_dirs() if dirs is None else dirs:
        found = sorted(glob.glob(os.path.join(folder, CUDART_GLOB)))
        if found:
            return found[0]
    return None


def ensure_cudart() -> str | None:
    """Make sure Polygraphy's CUDA helpers will find libcudart; returns its path. Not found: a warning and None,
    and Polygraphy tries its own search, then the loader's default paths (which may know it: ld.so.cache)."""
    import os

    path = find_cudart()
    if path is None:
        logging.getLogger("m2f_deploy.runtime").warning(
            "the CUDA runtime library (%s) was not found (looked in %s, the CUDA toolkit folders, pip's nvidia/*/ "
            "and %s): Polygraphy will try the loader's default paths; if that fails: pip install "
            "nvidia-cuda-runtime-cu12 (TensorRT 10 for CUDA 12) or nvidia-cuda-runtime (CUDA 13)",
            CUDART_GLOB, "PATH" if WINDOWS else "LD_LIBRARY_PATH", sys.prefix,
        )  # fmt: skip
        return None
    folder = os.path.dirname(path)
    variable = "PATH" if WINDOWS else "LD_LIBRARY_PATH"
    current = os.environ.get(variable, "")
    if folder not in current.split(os.pathsep):
        os.environ[variable] = os.pathsep.join(p for p in (folder, current) if p)
    return path
