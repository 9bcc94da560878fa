"""Run an ONNX artifact in onnxruntime: the CPU, CUDA or TensorRT execution provider.

A provider that is asked for and cannot start is an error, never a silent fallback: onnxruntime itself falls back
to CPU when a GPU provider fails to load (missing CUDA or TensorRT libraries), so the providers the session really
got are checked after it is made.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from m2f_deploy.artifact import INPUT_NAME
from m2f_deploy.errors import BackendError, InputError, M2FError
from m2f_deploy.runtime.base import BaseRunner, InputSpec

log = logging.getLogger("m2f_deploy.runtime")

PROVIDERS = {
    "ort-tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
"""Backend name -> onnxruntime provider, fastest first (the order ``auto`` tries them in)."""


def onnxruntime_module() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BackendError(
            "onnxruntime is not installed: pip install 'm2f-deploy[runtime]' (CPU) or onnxruntime-gpu (CUDA, TensorRT)"
        ) from None
    return onnxruntime


def present() -> list[str]:
    """The onnxruntime backends this install offers (whether their GPU libraries load is known only on use)."""
    try:
        available = onnxruntime_module().get_available_providers()
    except BackendError:
        return []
    return [name for name, provider in PROVIDERS.items() if provider in available]


def session_options(ort: Any, threads: int | None = None, *, precision: str = "fp32") -> Any:
    """The session options every m2f-deploy session uses (the runtime and the export's validation gate).

    Denormals are flushed to zero: Swin's shifted-window mask adds -100 before the softmax, whose e^-100 (a
    float32 denormal) makes the next MatMul and the softmax itself several times slower on x86 (measured on
    Swin-T at 384x384, onnxruntime CPU: one block of the third stage went from 30 ms to 14 ms). A denormal is below
    1.2e-38; flushing it changes no output beyond float32 rounding.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: a provider that cannot start is reported by us
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if precision == "fp16":
        # onnxruntime 1.32's NCHWc layout transformer (level ALL) gave wrong logits on an fp16 graph with folded
        # static sizes, at batch 1 only: max error 0.69 on the shipped demo checkpoint, 0.005 without it. fp16 on
        # CPU is a check, not a speed target.
        options.add_session_config_entry("optimization.disable_specified_optimizers", "NchwcTransformer")
    if threads:
        options.intra_op_num_threads = threads
    return options


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "m2f_deploy" / "ort-tensorrt"


class OnnxRuntimeRunner(BaseRunner):
    """An onnxruntime session over one artifact. ``backend``: ``auto`` or a key of :data:`PROVIDERS`."""

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        backend: str = "auto",
        *,
        threads: int | None = None,
        device_id: int = 0,
    ):
        ort = onnxruntime_module()
        self.path = path
        self.input_spec = InputSpec.from_metadata(meta)
        self.precision = meta["precision"]
        available = ort.get_available_providers()
        plugin = meta["msda"] == "trt_plugin"
        if backend == "auto":
            candidates = [b for b in PROVIDERS if PROVIDERS[b] in available]
            if plugin:  # only TensorRT has the plugin; on CPU a numpy stand-in can check such a graph
                candidates = [b for b in candidates if b in ("ort-tensorrt", "cpu")]
        else:
            if PROVIDERS[backend] not in available:
                have = ", ".join(present()) or "none"
                hint = "pip install onnxruntime-gpu" if backend != "cpu" else "reinstall onnxruntime"
                raise BackendError(
                    f"backend {backend!r} needs onnxruntime's {PROVIDERS[backend]}, which this onnxruntime "
                    f"({ort.__version__}) does not have (it has: {have}); {hint}"
                )
            if plugin and backend == "cuda":
                raise BackendError(
                    f"{path}: holds TensorRT's MSDA plugin (exported with --msda trt_plugin), which only TensorRT "
                    "runs; use backend 'ort-tensorrt' or 'tensorrt', or export with --msda grid_sample"
                )
            candidates = [backend]
        self.session, self.backend = None, None
        failures = []
        for name in candidates:
            try:
                self.session = self._session(ort, name, plugin, threads, device_id)
            except BackendError as e:
                if backend != "auto":
                    raise
                failures.append(str(e))
                continue
            self.backend = name
            break
        if self.session is None:
            raise BackendError(f"{path}: no onnxruntime backend could run it:\n  " + "\n  ".join(failures))
        self.description = f"onnxruntime {ort.__version__} {PROVIDERS[self.backend]}"
        if plugin and self.backend == "cpu":
            self.description += " (TensorRT MSDA plugin through the numpy stand-in: for checks, slow)"
        self.output_names = [o.name for o in self.session.get_outputs()]
        inputs = [i.name for i in self.session.get_inputs()]
        self.input_name = meta["input"].get("name", INPUT_NAME)  # "images" for a uint8 graph, then its pixel_mask
        mask = [meta["input"]["mask"]] if meta["input"].get("mask") else []
        expected = [self.input_name, *mask, *(meta.get("heads") or {}).get("inputs", {})]  # then a head's thresholds
        if inputs != expected:
            raise InputError(f"{path}: inputs are {inputs}, expected {expected}")
        check_graph_matches_metadata(
            path, meta, self.session.get_inputs()[0].shape,
            {o.name: o.shape for o in self.session.get_outputs()},
        )  # fmt: skip

    def _session(self, ort: Any, backend: str, plugin: bool, threads: int | None, device_id: int) -> Any:
        options = session_options(ort, threads, precision=self.precision)
        provider = PROVIDERS[backend]
        provider_options: dict[str, Any] = {}
        if backend == "cuda":
            provider_options = {"device_id": device_id}
        elif backend == "ort-tensorrt":
            cache = _cache_dir()
            cache.mkdir(parents=True, exist_ok=True)
            provider_options = {
                "device_id": device_id, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
            }  # fmt: skip
        providers: list[Any] = [(provider, provider_options)]
        if backend != "cpu":
            providers.append("CPUExecutionProvider")  # for the few nodes a GPU provider may not take
        try:
            if plugin and backend == "cpu":
                from m2f_deploy.runtime.plugin_standin import standin_session  # needs onnx, onnxruntime-extensions

                session = standin_session(self.path, sess_options=options)
            else:
                session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except ImportError as e:
            raise BackendError(
                f"{self.path}: holds TensorRT's MSDA plugin; running it on CPU needs the stand-in "
                f"(pip install 'm2f-deploy[standin]' onnx): {e}"
            ) from None
        except BackendError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types for unreadable or invalid graphs
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if backend != "cpu" and provider in message:
                raise BackendError(f"{provider} could not start: {message}") from None
            raise InputError(f"{self.path}: onnxruntime cannot load it: {message}") from None
        if session.get_providers()[0] != provider:
            raise BackendError(
                f"{provider} is installed but could not start (missing CUDA/TensorRT libraries or no GPU); "
                f"onnxruntime would fall back to {session.get_providers()[0]}"
            )
        return session

    def infer_impl(self, pixel_values: np.ndarray, extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Raw outputs by name. ``InputError`` when onnxruntime rejects ``pixel_values`` (its type or shape against
        the graph's input); any other failure while running is the backend's or the graph's: ``BackendError``."""
        try:
            outputs = self.session.run(None, {self.input_name: pixel_values, **(extra or {})})
        except M2FError:
            raise  # the plugin stand-in's own typed errors
        except Exception as e:  # onnxruntime's exception types live in a private module: told apart by name
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            given = f"{self.input_name} {pixel_values.dtype} {list(pixel_values.shape)}"
            if type(e).__name__ == "InvalidArgument" or "INVALID_ARGUMENT" in message:
                raise InputError(f"{self.path}: onnxruntime rejects {given}: {message}") from None
            raise BackendError(
                f"{self.path}: onnxruntime ({self.backend}) failed running on {given}: {message}"
            ) from None
        return {
            name: np.asarray(value, dtype=np.float32) if np.asarray(value).dtype.kind == "f" else np.asarray(value)
            for name, value in zip(self.output_names, outputs, strict=True)
        }

    def close(self) -> None:
        self.session = None


def check_graph_matches_metadata(path: Path, meta: dict[str, Any], input_shape: list, outputs: dict[str, list]) -> None:
    """The graph's own static input axes and class count against what its metadata says: metadata that lies (an
    edited or mixed-up artifact) is one error before any image, not a failure per image or results labelled from
    the wrong list (an ``id2label`` shorter than the model's classes writes COCO with unknown category ids)."""
    inp = meta["input"]
    said = {"batch": "dynamic" if inp["dynamic_batch"] else inp["batch"]}
    said.update({axis: "dynamic" if inp["dynamic_hw"] else inp[axis] for axis in ("height", "width")})
    nhwc = inp.get("dtype") == "uint8"  # a uint8 graph takes NHWC images
    axes = dict(zip(("batch", "height", "width", "channels") if nhwc else ("batch", "channels", "height", "width"),
                    input_shape))  # fmt: skip
    for axis, value in said.items():
        real = axes.get(axis)
        if isinstance(real, int) and real > 0 and real != value:  # a named (str) or unknown axis is dynamic
            raise InputError(f"{path}: its metadata says input {axis} {value}, the graph takes {real} only (metadata "
                             "that does not match the graph: re-export it)")  # fmt: skip
    classes = (outputs.get("class_queries_logits") or [None])[-1]
    if isinstance(classes, int) and classes != len(meta["id2label"]) + 1:
        raise InputError(f"{path}: the graph scores {classes - 1} classes, its metadata's id2label names "
                         f"{len(meta['id2label'])} (re-export it)")  # fmt: skip
