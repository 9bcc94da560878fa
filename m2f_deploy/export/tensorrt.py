"""ONNX -> TensorRT engine, through TensorRT's Python API (no torch, no onnx package: a Jetson can build here).

The engine is a plain serialized engine (``trtexec --loadEngine`` reads it); beside it, ``model.engine.json`` holds
the ONNX file's metadata plus the TensorRT version, the GPU and its compute capability, the optimization profile
and the build flags. Both are written to temporary names and renamed only after the build succeeded.

Written against TensorRT 10's API. It has not run on the machine this project is built on (no GPU, no TensorRT);
what can be checked without them (profiles, the fp32 layer choice, the sidecar, errors) is tested, and
tests/test_tensorrt.py builds and runs a tiny engine where TensorRT and a GPU are present.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m2f_deploy.artifact import INPUT_NAME, engine_sidecar_path, read_onnx_metadata
from m2f_deploy.errors import BackendError, InputError
from m2f_deploy.export.precision import tensorrt_fp32_layer
from m2f_deploy.export.trt_support import require_tensorrt_support
from m2f_deploy.utils import atomic_output, sha256_file

log = logging.getLogger("m2f_deploy.export")

Shape = tuple[int, int, int, int]
DEFAULT_MAX_BATCH = 8


def parse_shape(text: str) -> Shape:
    """``"4x3x384x384"`` -> (4, 3, 384, 384)."""
    parts = text.lower().split("x")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise InputError(f"shape {text!r}: expected BxCxHxW with positive integers, e.g. 1x3x384x384")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def profile_shapes(meta: dict[str, Any], shapes: Sequence[str] | None = None) -> tuple[Shape, Shape, Shape]:
    """The optimization profile (min, opt, max) of ``pixel_values``, checked against the graph's axes.

    Without ``shapes``: static axes as exported; a dynamic batch 1 .. max(8, export batch), optimised for the
    export batch; dynamic height and width from half to twice the export size (multiples of 32, at least 64),
    optimised for the export size.
    """
    inp = meta["input"]
    b, h, w = inp["batch"], inp["height"], inp["width"]
    multiple = inp.get("hw_multiple", 32)
    if shapes is None:
        batches = (1, b, max(DEFAULT_MAX_BATCH, b)) if inp["dynamic_batch"] else (b, b, b)
        if inp["dynamic_hw"]:

            def span(n: int) -> tuple[int, int, int]:
                return max(64, n // 2 // multiple * multiple), n, 2 * n

            hs, ws = span(h), span(w)
        else:
            hs, ws = (h, h, h), (w, w, w)
        return tuple((batches[i], 3, hs[i], ws[i]) for i in range(3))  # type: ignore[return-value]
    if len(shapes) != 3:
        raise InputError(f"--shapes takes 3 shapes (min opt max), got {len(shapes)}")
    low, opt, high = (parse_shape(s) for s in shapes)
    for name, shape in (("min", low), ("opt", opt), ("max", high)):
        where = f"--shapes {name} {'x'.join(map(str, shape))}"
        if shape[1] != 3:
            raise InputError(f"{where}: pixel_values has 3 channels")
        if not inp["dynamic_batch"] and shape[0] != b:
            raise InputError(f"{where}: the graph's batch is fixed at {b} (exported with --static-batch)")
        if not inp["dynamic_hw"] and shape[2:] != (h, w):
            raise InputError(f"{where}: the graph's size is fixed at {h}x{w} (export with --dynamic-shape to vary it)")
        if shape[2] % multiple or shape[3] % multiple:
            raise InputError(f"{where}: height and width must be multiples of {multiple}")
    if not all(lo <= op <= hi for lo, op, hi in zip(low, opt, high)):
        raise InputError(f"--shapes: need min <= opt <= max on every axis, got {low} {opt} {high}")
    return low, opt, high


def _tensorrt() -> Any:
    from m2f_deploy.runtime.tensorrt import tensorrt_module

    return tensorrt_module()


def check_tensorrt() -> None:
    """Fail early (before a slow export) when TensorRT is not installed."""
    _tensorrt()


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike | None = None,
    *,
    fp16: bool = False,
    int8: bool = False,
    shapes: Sequence[str] | None = None,
    workspace_gib: float | None = None,
    timing_cache: str | os.PathLike | None = None,
    plugin_libraries: Sequence[str | os.PathLike] = (),
    fp32_layers: bool = True,
    verbose: bool = False,
) -> Path:
    """Build a TensorRT engine from an ``m2f-export`` ONNX file; returns the engine's path (default: ``.engine``).

    fp16: allow fp16 kernels (always on for an fp16 graph). int8: the graph must be explicitly quantized (QDQ
    nodes, ``m2f-export --int8``); TensorRT's implicit calibration is not used. shapes: ``[min, opt, max]`` as
    ``BxCxHxW`` (see :func:`profile_shapes`). fp32_layers: pin LayerNorm, the masked cross-attention softmax and
    the deformable sampling to float32 in reduced-precision builds (:func:`tensorrt_fp32_layer`).
    """
    require_tensorrt_support(onnx_path)  # static check against TensorRT's ONNX support, before TensorRT is looked for
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path else onnx_path.with_suffix(".engine")
    meta = read_onnx_metadata(onnx_path)
    low, opt, high = profile_shapes(meta, shapes)
    if workspace_gib is not None and workspace_gib <= 0:
        raise InputError(f"--workspace must be positive (GiB), got {workspace_gib}")
    fp16 = fp16 or meta["precision"] == "fp16"
    quantized_for = meta.get("exporter", {}).get("int8", {}).get("target", "tensorrt")
    if meta["precision"] == "int8" and quantized_for != "tensorrt":
        raise InputError(f"{onnx_path}: this INT8 graph was quantized for onnxruntime CPU (uint8 activations), "
                         "which TensorRT does not take; quantize for TensorRT: m2f-export ... --int8 --calib DIR "
                         "--int8-target tensorrt")  # fmt: skip
    trt = _tensorrt()
    from m2f_deploy.runtime.cuda import gpu_info
    from m2f_deploy.runtime.tensorrt import trt_logger

    gpu = gpu_info(0)
    logger = trt_logger(trt, verbose)
    for library in plugin_libraries:
        try:
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)  # plugins register themselves when loaded
        except OSError as e:
            raise InputError(f"--plugin-lib {library}: cannot load ({e})") from None

    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # TensorRT 8.x needs explicit batch asked for
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        hint = " (the MSDA plugin: load its library with --plugin-lib)" if meta["msda"] == "trt_plugin" else ""
        raise InputError(f"{onnx_path}: TensorRT's ONNX parser failed{hint}: {errors}")

    config = builder.create_builder_config()
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    kinds = [_kind(network.get_layer(i)) for i in range(network.num_layers)]
    if int8:
        if "quantize" not in kinds:
            raise InputError(
                f"{onnx_path}: --int8 needs an explicitly quantized graph (QuantizeLinear/DequantizeLinear nodes, "
                "from m2f-export --int8 --calib DIR); this one has none"
            )
        config.set_flag(trt.BuilderFlag.INT8)
    pinned = 0
    if fp32_layers and (fp16 or int8):
        pinned = _pin_fp32(trt, network, kinds)
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log.info("pinned %d layer(s) to float32 (LayerNorm, cross-attention softmax, sampling)", pinned)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, low, opt, high)
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("building the TensorRT %s engine on %s (profile min %s opt %s max %s) ...", trt.__version__, gpu.name,
             low, opt, high)  # fmt: skip
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    log.info("built in %.1f s", time.perf_counter() - start)

    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    sidecar = dict(meta)
    sidecar["precision"] = precision
    sidecar["input"] = {**meta["input"], "batch": opt[0], "height": opt[2], "width": opt[3]}
    sidecar["tensorrt"] = {
        "version": trt.__version__, "gpu": gpu.name, "compute_capability": gpu.compute_capability,
        "profile": {"min": list(low), "opt": list(opt), "max": list(high)},
        "flags": {"fp16": fp16, "int8": int8}, "fp32_layers": pinned,
        "plugin_libraries": [str(p) for p in plugin_libraries],
        "onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path), "precision": meta["precision"]},
    }  # fmt: skip
    sidecar_path = engine_sidecar_path(engine_path)
    with atomic_output(engine_path) as tmp_engine, atomic_output(sidecar_path) as tmp_sidecar:
        tmp_engine.write_bytes(memoryview(serialized))
        tmp_sidecar.write_text(json.dumps(sidecar, indent=1) + "\n", encoding="utf-8")
    if cache is not None:
        with atomic_output(timing_cache) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    log.info("wrote %s (%.1f MB) and %s", engine_path, engine_path.stat().st_size / 1e6, sidecar_path.name)
    return engine_path


def _kind(layer: Any) -> str:
    """``LayerType.NORMALIZATION`` -> ``normalization``."""
    return re.sub(r".*\.", "", str(layer.type)).lower()


def _pin_fp32(trt: Any, network: Any, kinds: list[str]) -> int:
    floats = (trt.float32, trt.float16)
    pinned = 0
    for i, kind in enumerate(kinds):
        layer = network.get_layer(i)
        if not tensorrt_fp32_layer(layer.name, kind):
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outputs or any(t.dtype not in floats for t in outputs):
            continue  # shape and index arithmetic: not a precision question
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned
