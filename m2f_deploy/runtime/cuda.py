"""The GPU's name and compute capability from the CUDA driver (libcuda through ctypes; no CUDA toolkit needed)."""

from __future__ import annotations

import ctypes
import ctypes.util
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
