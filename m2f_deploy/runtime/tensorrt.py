"""Run a serialized TensorRT engine through TensorRT's Python API, with Polygraphy's CUDA helpers for memory.

The engine file is what ``trtexec --loadEngine`` reads; its sidecar ``model.engine.json`` carries the metadata and
says which TensorRT version and GPU architecture it was built for, checked before TensorRT deserializes it.
Device buffers and the stream are made once and reused; a buffer grows only when a larger batch comes.

Written against TensorRT 10 (``num_io_tensors``, ``set_input_shape``, ``execute_async_v3``). Not run on the machine
this project is built on (no GPU, no TensorRT): tests/test_tensorrt.py runs it where both are present.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.artifact import INPUT_NAME, check_engine_compatible
from m2f_deploy.errors import BackendError, InputError

log = logging.getLogger("m2f_deploy.runtime")


def tensorrt_module() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise BackendError("TensorRT is not installed: pip install 'm2f-deploy[gpu]' (tensorrt, polygraphy)") from None
    return tensorrt


def polygraphy_cuda() -> Any:
    try:
        from polygraphy import cuda
    except ImportError:
        raise BackendError(
            "Polygraphy is not installed: pip install 'm2f-deploy[gpu]' (tensorrt, polygraphy)"
        ) from None
    return cuda


def trt_logger(trt: Any, verbose: bool = False) -> Any:
    """One logger per process; TensorRT's built-in plugins (the MSDA plugin among them) registered with it."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(_LOGGER, "")
    return _LOGGER


_LOGGER = None


class TensorRTRunner:
    """An execution context over one engine; ``infer`` takes ``[B, 3, H, W]`` float32 within the engine's profile."""

    def __init__(self, path: Path, meta: dict[str, Any], *, device_id: int = 0):
        from m2f_deploy.runtime.cuda import gpu_info

        trt = tensorrt_module()
        cuda = polygraphy_cuda()
        if device_id != 0:
            raise BackendError("the TensorRT backend runs on CUDA device 0; choose the GPU with CUDA_VISIBLE_DEVICES")
        gpu = gpu_info(device_id)
        check_engine_compatible(
            meta,
            str(path),
            tensorrt_version=trt.__version__,
            gpu=gpu.name,
            compute_capability=gpu.compute_capability,
        )
        self.path = path
        self.backend = "tensorrt"
        self.description = f"TensorRT {trt.__version__} on {gpu.name}"
        runtime = trt.Runtime(trt_logger(trt))
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise InputError(f"{path}: TensorRT cannot deserialize it (truncated or not an engine; see its log above)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        if [n for n in names if is_input[n]] != [INPUT_NAME]:
            raise InputError(
                f"{path}: engine inputs are {[n for n in names if is_input[n]]}, expected [{INPUT_NAME!r}]"
            )
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.profile = [tuple(s) for s in self.engine.get_tensor_profile_shape(INPUT_NAME, 0)]  # min, opt, max
        self.stream = cuda.Stream()
        self.buffers = {n: cuda.DeviceArray(shape=(0,), dtype=self.dtypes[n]) for n in names}

    def infer(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        shape = tuple(pixel_values.shape)
        low, _, high = self.profile
        if len(shape) != 4 or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            raise InputError(
                f"input {shape} is outside the engine's profile (min {low}, max {high}); rebuild it with wider --shapes"
            )
        self.context.set_input_shape(INPUT_NAME, shape)
        data = np.ascontiguousarray(pixel_values, dtype=self.dtypes[INPUT_NAME])
        self.buffers[INPUT_NAME].copy_from(data, stream=self.stream)
        self.context.set_tensor_address(INPUT_NAME, self.buffers[INPUT_NAME].ptr)
        hosts = {}
        for name in self.output_names:
            out_shape = tuple(self.context.get_tensor_shape(name))
            self.buffers[name].resize(out_shape)
            self.context.set_tensor_address(name, self.buffers[name].ptr)
            hosts[name] = np.empty(out_shape, self.dtypes[name])
        if not self.context.execute_async_v3(self.stream.ptr):
            raise BackendError(f"{self.path}: TensorRT failed to run the engine on input {shape} (see its log above)")
        for name in self.output_names:
            self.buffers[name].copy_to(hosts[name], stream=self.stream)
        self.stream.synchronize()
        return {name: hosts[name].astype(np.float32, copy=False) for name in self.output_names}

    def close(self) -> None:
        for buffer in self.buffers.values():
            buffer.free()
        self.buffers = {}
        self.stream.free()
        self.context = self.engine = None
