"""Run a serialized TensorRT engine: Polygraphy's loaders deserialize it, its CUDA helpers hold the memory.

The engine file is what ``trtexec --loadEngine`` reads; its sidecar ``model.engine.json`` carries the metadata and
says which TensorRT version and GPU architecture it was built for (checked before TensorRT deserializes it) and
which plugin libraries it needs (loaded, through Polygraphy's ``LoadPlugins``, before it is deserialized).

A thin wrapper rather than Polygraphy's ``TrtRunner``: one input, float32 outputs, device buffers and a stream made
once and grown only when a larger batch comes. Inputs are checked by :class:`~m2f_deploy.runtime.base.BaseRunner`
against the engine's optimization profile. The TensorRT calls used (``num_io_tensors``, ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``) are the same in TensorRT 10 and 11; dtypes go through
:mod:`m2f_deploy.runtime.trt_api`. Not run on the machine this project is built on (no GPU, no TensorRT):
tests/test_tensorrt.py runs it on fakes there and on a real engine where TensorRT and a GPU are present.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.artifact import HW_MULTIPLE, INPUT_NAME, check_engine_compatible
from m2f_deploy.errors import BackendError, InputError
from m2f_deploy.runtime import trt_api
from m2f_deploy.runtime.base import BaseRunner, InputSpec

log = logging.getLogger("m2f_deploy.runtime")

INSTALL_HINT = "pip install 'm2f-deploy[gpu]' (tensorrt, polygraphy; on Jetson use JetPack's TensorRT 10)"


def tensorrt_module() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise BackendError(f"TensorRT is not installed: {INSTALL_HINT}") from None
    return tensorrt


def polygraphy_cuda() -> Any:
    """Polygraphy's CUDA helpers, with the CUDA runtime library found first (:func:`~m2f_deploy.runtime.cuda.
    ensure_cudart`: a pip-only TensorRT install has no CUDA toolkit on the loader path)."""
    try:
        from polygraphy import cuda
    except ImportError:
        raise BackendError(f"Polygraphy is not installed: {INSTALL_HINT}") from None
    from m2f_deploy.runtime.cuda import ensure_cudart

    ensure_cudart()
    return cuda


def polygraphy_trt() -> Any:
    try:
        from polygraphy.backend import trt as backend
    except ImportError:
        raise BackendError(f"Polygraphy is not installed: {INSTALL_HINT}") from None
    return backend


def polygraphy_quiet(verbose: bool = False) -> None:
    """Polygraphy logs at INFO and prints everything below CRITICAL (TensorRT's warnings, the ONNX parser's errors)
    on stdout, which m2f-deploy keeps for its results: only warnings and worse, sent to Python logging under
    ``m2f_deploy.polygraphy`` (stderr in the CLIs, like our own messages)."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.VERBOSE if verbose else G_LOGGER.WARNING
    if hasattr(type(G_LOGGER), "use_python_logging_system"):  # Polygraphy >= 0.49
        G_LOGGER.use_python_logging_system = True
        G_LOGGER.colors = False  # no escape codes in log records (and no "'colored' is not installed" on stdout)
        G_LOGGER.python_logger = logging.getLogger("m2f_deploy.polygraphy")
        G_LOGGER.python_logger.setLevel(1 if verbose else logging.NOTSET)


def load_plugins(libraries: Sequence[str | Path], where: str) -> None:
    """Load TensorRT plugin libraries (they register their plugins when loaded) through Polygraphy's loader."""
    if not libraries:
        return
    backend = polygraphy_trt()
    for library in libraries:
        try:
            backend.LoadPlugins(plugins=[str(library)])()
        except OSError as e:
            raise InputError(f"{where}: plugin library {library} cannot be loaded ({e})") from None


def _polygraphy_error() -> type[Exception]:
    try:
        from polygraphy.exception import PolygraphyException
    except ImportError:  # pragma: no cover - Polygraphy is present wherever this is called
        return RuntimeError
    return PolygraphyException


class TensorRTRunner(BaseRunner):
    """An execution context over one engine; ``infer`` takes ``[B, 3, H, W]`` float32 within the engine's profile."""

    def __init__(self, path: Path, meta: dict[str, Any], *, device_id: int = 0):
        from m2f_deploy.runtime.cuda import gpu_info

        trt = tensorrt_module()
        backend = polygraphy_trt()
        cuda = polygraphy_cuda()
        polygraphy_quiet()
        if device_id != 0:
            raise BackendError("the TensorRT backend runs on CUDA device 0; choose the GPU with CUDA_VISIBLE_DEVICES")
        gpu = gpu_info(device_id)
        built = meta["tensorrt"]
        check_engine_compatible(
            meta, str(path), tensorrt_version=trt.__version__, gpu=gpu.name, compute_capability=gpu.compute_capability
        )
        self.path = Path(path)
        self.backend = "tensorrt"
        self.description = f"TensorRT {trt.__version__} on {gpu.name}"
        load_plugins(built.get("plugin_libraries", []), f"{path} (its sidecar lists the plugin libraries it needs)")
        try:
            self.engine = backend.EngineFromBytes(self.path.read_bytes())()
        except _polygraphy_error():
            raise InputError(
                f"{path}: TensorRT cannot deserialize it (truncated, not an engine, or a plugin is missing; "
                "see its log above)"
            ) from None
        self.context = self.engine.create_execution_context()
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        inputs = [n for n in names if is_input[n]]
        if inputs != [INPUT_NAME]:
            raise InputError(f"{path}: engine inputs are {inputs}, expected [{INPUT_NAME!r}]")
        self.output_names = [n for n in names if not is_input[n]]
        self.dtypes = {n: trt_api.numpy_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        low, opt, high = trt_api.profile_shapes(engine, INPUT_NAME, built.get("profile", {}))
        self.profile = (low, opt, high)
        self.input_spec = InputSpec.from_profile(low, high, meta["input"].get("hw_multiple", HW_MULTIPLE))
        self.stream = cuda.Stream()
        self.buffers = {n: cuda.DeviceArray(shape=(0,), dtype=self.dtypes[n]) for n in names}

    def infer_impl(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        shape = tuple(pixel_values.shape)
        if not self.context.set_input_shape(INPUT_NAME, shape):
            raise InputError(f"{self.path}: TensorRT refused input shape {shape} (see its log above)")
        data = np.ascontiguousarray(pixel_values, dtype=self.dtypes[INPUT_NAME])
        buffer = self.buffers[INPUT_NAME]
        buffer.resize(shape)  # Polygraphy's copy_from refuses a host array larger than the device array
        buffer.copy_from(data, stream=self.stream)
        self.context.set_tensor_address(INPUT_NAME, buffer.ptr)
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
        for buffer in getattr(self, "buffers", {}).values():
            buffer.free()
        self.buffers = {}
        if getattr(self, "stream", None) is not None:
            self.stream.free()
            self.stream = None
        self.context = self.engine = None
