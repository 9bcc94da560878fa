"""ONNX -> TensorRT engine on Polygraphy's loaders (no torch; onnx only to make an fp16 graph on strongly typed
TensorRT: a Jetson can build here).

``NetworkFromOnnxPath`` parses, ``CreateConfig`` sets the profile, the precision flags (TF32 off unless asked),
precision constraints and memory limits, ``EngineBytesFromNetwork`` builds, ``LoadPlugins`` loads ``--plugin-lib``
libraries. Ours on top, what Polygraphy does not do: the float32 pinning of TensorRT 10's weakly typed builds
(:func:`_pin_fp32`), the choice between weak and strong typing per TensorRT version
(:mod:`m2f_deploy.runtime.trt_api`), a timing cache whose rejection (another GPU or TensorRT) is seen and which is
saved only after the engine is written, and the sidecar.

The engine is a plain serialized engine (``trtexec --loadEngine`` reads it); beside it, ``model.engine.json`` holds
the ONNX file's metadata plus the TensorRT version, the GPU and its compute capability, the optimization profile,
every precision flag and the pinned layers. Both are written to temporary names and renamed only after the build
succeeded.

It has not run on the machine this project is built on (no GPU, no TensorRT): tests/test_tensorrt.py runs it on a
fake TensorRT (10.3, 10.12, 11) under the real Polygraphy there, and builds and runs a tiny engine where TensorRT
and a GPU are present.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m2f_deploy.artifact import HW_MULTIPLE, INPUT_NAME, engine_sidecar_path, read_onnx_metadata
from m2f_deploy.errors import BackendError, InputError
from m2f_deploy.export.precision import tensorrt_fp32_layer
from m2f_deploy.export.trt_support import require_tensorrt_support
from m2f_deploy.runtime import trt_api
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
    multiple = inp.get("hw_multiple", HW_MULTIPLE)
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
    """Fail early (before a slow export) when TensorRT or Polygraphy is not installed."""
    from m2f_deploy.runtime.tensorrt import polygraphy_trt

    _tensorrt()
    polygraphy_trt()


# Layer kinds never pinned: casts (the fp16 converter's Cast nodes inside the fp32 scopes must keep producing
# float16), quantization, and shape arithmetic.
NOT_PINNED = frozenset({"cast", "identity", "quantize", "dequantize", "shape", "constant"})


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike | None = None,
    *,
    fp16: bool = False,
    int8: bool = False,
    tf32: bool = False,
    shapes: Sequence[str] | None = None,
    workspace_gib: float | None = None,
    timing_cache: str | os.PathLike | None = None,
    plugin_libraries: Sequence[str | os.PathLike] = (),
    fp32_layers: bool = True,
    verbose: bool = False,
) -> Path:
    """Build a TensorRT engine from an ``m2f-export`` ONNX file; returns the engine's path (default: ``.engine``).

    fp16: an fp16 engine (always, for an fp16 graph). TensorRT 10.0-10.11 (weakly typed): the FP16 builder flag.
    TensorRT 10.12+ and 11 (strongly typed): the graph's own types, so an fp32 graph is first converted to the fp16
    graph with fp32 islands that ``m2f-export --fp16`` writes. int8: the graph must be explicitly quantized for
    TensorRT (QDQ, ``m2f-export --int8 --int8-target tensorrt``); no implicit calibration. tf32: allow TF32 kernels
    for float32 (off by default, so an fp32 engine computes in fp32). shapes: ``[min, opt, max]`` as ``BxCxHxW``
    (see :func:`profile_shapes`). fp32_layers: on weakly typed builds, pin LayerNorm, the masked cross-attention
    softmax and the deformable sampling to float32 (:func:`tensorrt_fp32_layer`).
    """
    onnx_path = Path(onnx_path)
    engine_path = Path(engine_path) if engine_path else onnx_path.with_suffix(".engine")
    meta = read_onnx_metadata(onnx_path)
    low, opt, high = profile_shapes(meta, shapes)
    if workspace_gib is not None and not (math.isfinite(workspace_gib) and workspace_gib > 0):  # nan passes "<= 0"
        raise InputError(f"--workspace must be a positive number of GiB, got {workspace_gib}")
    quantized_for = meta.get("exporter", {}).get("int8", {}).get("target", "tensorrt")
    if meta["precision"] == "int8" and quantized_for != "tensorrt":
        raise InputError(f"{onnx_path}: this INT8 graph was quantized for onnxruntime CPU (uint8 activations), "
                         "which TensorRT does not take; quantize for TensorRT: m2f-export ... --int8 --calib DIR "
                         "--int8-target tensorrt")  # fmt: skip
    if int8 and meta["precision"] != "int8":
        raise InputError(
            f"{onnx_path}: --int8 needs an explicitly quantized graph (QuantizeLinear/DequantizeLinear nodes, from "
            f"m2f-export --int8 --calib DIR --int8-target tensorrt); this one is {meta['precision']}"
        )
    int8 = int8 or meta["precision"] == "int8"
    fp16 = fp16 or meta["precision"] == "fp16"
    # the static check against TensorRT's documented ONNX support: a node TensorRT would refuse is named here, after
    # the cheap checks of the arguments and before TensorRT is loaded
    plugins = bool(plugin_libraries)
    _check_support(onnx_path, plugins)

    trt = _tensorrt()
    from m2f_deploy.runtime.cuda import gpu_info
    from m2f_deploy.runtime.tensorrt import load_plugins, polygraphy_quiet, polygraphy_trt

    backend = polygraphy_trt()
    polygraphy_quiet(verbose)
    gpu = gpu_info(0)
    load_plugins(plugin_libraries, "--plugin-lib")
    strong = trt_api.strongly_typed(trt)
    if strong and int8 and fp16 and meta["precision"] == "int8":
        log.warning("strongly typed TensorRT %s takes the QDQ graph's own types: --fp16 does not apply to it",
                    trt.__version__)  # fmt: skip
        fp16 = False
    with tempfile.TemporaryDirectory(prefix=".m2f-trt-", dir=engine_path.parent) as scratch:
        source = onnx_path
        if strong and fp16 and meta["precision"] == "fp32":
            source = _fp16_graph(onnx_path, Path(scratch), plugins)
        pinned: list[str] = []
        network = backend.NetworkFromOnnxPath(str(source), strongly_typed=trt_api.strongly_typed_network_flag(trt))
        if fp32_layers and not strong and (fp16 or int8) and trt_api.can_pin_layers(trt):

            def pin(network: Any) -> None:
                pinned.extend(_pin_fp32(trt, network))
                log.info("pinned %d layer(s) to float32 (LayerNorm, cross-attention softmax, sampling)", len(pinned))

            network = backend.PostprocessNetwork(network, func=pin, name="pin fp32 layers")
        config = _Config(backend, trt, strong=strong, fp16=fp16, int8=int8, tf32=tf32, pinned=pinned,
                         profile=(low, opt, high), workspace_gib=workspace_gib,
                         timing_cache=Path(timing_cache) if timing_cache is not None else None)  # fmt: skip
        log.info("building the TensorRT %s engine on %s (%s typed; profile min %s opt %s max %s) ...",
                 trt.__version__, gpu.name, "strongly" if strong else "weakly", low, opt, high)  # fmt: skip
        start = time.perf_counter()
        serialized = _build(backend, network, config, onnx_path, meta)
        log.info("built in %.1f s", time.perf_counter() - start)

    precision = "int8" if int8 else "fp16" if fp16 else "fp32"
    sidecar = dict(meta)
    sidecar["precision"] = precision
    sidecar["input"] = {**meta["input"], "batch": opt[0], "height": opt[2], "width": opt[3]}
    sidecar["tensorrt"] = {
        "version": trt.__version__, "gpu": gpu.name, "compute_capability": gpu.compute_capability,
        "profile": {"min": list(low), "opt": list(opt), "max": list(high)},
        "flags": {"tf32": tf32, "fp16": fp16, "int8": int8, "strongly_typed": strong},
        "builder_flags": config.builder_flags, "pinned_fp32_layers": list(pinned),
        "plugin_libraries": [_plugin_path(p) for p in plugin_libraries],
        "onnx": {"file": onnx_path.name, "sha256": sha256_file(onnx_path), "precision": meta["precision"]},
    }  # fmt: skip
    if source_was_converted := (strong and fp16 and meta["precision"] == "fp32"):
        sidecar["tensorrt"]["onnx"]["converted_to"] = "fp16"
    sidecar_path = engine_sidecar_path(engine_path)
    with atomic_output(engine_path) as tmp_engine, atomic_output(sidecar_path) as tmp_sidecar:
        tmp_engine.write_bytes(memoryview(serialized))
        tmp_sidecar.write_text(json.dumps(sidecar, indent=1) + "\n", encoding="utf-8")
    log.info("wrote %s (%.1f MB) and %s%s", engine_path, engine_path.stat().st_size / 1e6, sidecar_path.name,
             " (from the fp16 graph made from the fp32 one)" if source_was_converted else "")  # fmt: skip
    if config.timing_cache is not None:
        _save_timing_cache(config)
    return engine_path


def _plugin_path(library: str | os.PathLike) -> str:
    """A plugin library as the runner will load it: a path (with a separator) made absolute, since the runner may
    run in another folder; a bare name stays a name for the loader's search path."""
    text = os.fspath(library)
    if os.sep in text or (os.altsep and os.altsep in text):
        return str(Path(text).resolve())
    return text


def _build(backend: Any, network: Any, config: Any, onnx_path: Path, meta: dict[str, Any]) -> Any:
    from polygraphy.exception import PolygraphyException

    def parsed() -> Any:
        try:
            return network()
        except PolygraphyException:
            hint = (
                " (TensorRT's MSDA plugin MultiscaleDeformableAttnPlugin_TRT ships in libnvinfer_plugin, loaded "
                "with TensorRT; no --plugin-lib is needed: check that this TensorRT has the plugin version the "
                "graph asks for)"
                if meta.get("msda") == "trt_plugin"
                else ""
            )
            raise InputError(f"{onnx_path}: TensorRT's ONNX parser failed{hint}; its errors are above") from None

    try:
        return backend.EngineBytesFromNetwork(parsed, config=config)()
    except PolygraphyException as e:
        raise BackendError(f"{onnx_path}: TensorRT could not build an engine ({e}; see its log above)") from None


class _Config:
    """Polygraphy's ``CreateConfig`` with our settings, plus the timing cache checked on load.

    Called by ``EngineBytesFromNetwork`` after the network is parsed (and pinned), so precision constraints are
    asked for only when layers were pinned. Keeps the config: the flags set go into the sidecar, the timing cache
    is saved from it after the engine is written.
    """

    def __init__(self, backend: Any, trt: Any, *, strong: bool, fp16: bool, int8: bool, tf32: bool,
                 pinned: list[str], profile: tuple[Shape, Shape, Shape], workspace_gib: float | None,
                 timing_cache: Path | None):  # fmt: skip
        self.backend, self.trt, self.strong = backend, trt, strong
        self.fp16, self.int8, self.tf32, self.pinned = fp16, int8, tf32, pinned
        self.profile, self.workspace_gib, self.timing_cache = profile, workspace_gib, timing_cache
        self.config: Any = None
        self.cache_rejected = False
        self.builder_flags: list[str] = []

    def kwargs(self) -> dict[str, Any]:
        """The arguments given to Polygraphy's ``CreateConfig``."""
        low, opt, high = self.profile
        kwargs: dict[str, Any] = {
            "profiles": [self.backend.Profile().add(INPUT_NAME, min=low, opt=opt, max=high)],
            "tf32": self.tf32,
        }
        if not self.strong:  # TensorRT 11 has no precision flags; 10.12+ deprecates them: strongly typed there
            kwargs.update(fp16=self.fp16, int8=self.int8)
            if self.pinned:
                kwargs["precision_constraints"] = "obey"
        if self.workspace_gib is not None:
            kwargs["memory_pool_limits"] = {self.trt.MemoryPoolType.WORKSPACE: int(self.workspace_gib * (1 << 30))}
        return kwargs

    def __call__(self, builder: Any, network: Any) -> Any:
        config = self.backend.CreateConfig(**self.kwargs())(builder, network)
        if self.timing_cache is not None:
            self.cache_rejected = _load_timing_cache(config, self.timing_cache)
        flags = getattr(self.trt, "BuilderFlag", None)
        members = getattr(flags, "__members__", {})
        self.builder_flags = sorted(name for name, flag in members.items() if config.get_flag(flag))
        self.config = config
        return config


def _load_timing_cache(config: Any, path: Path) -> bool:
    """Attach the timing cache in ``path`` (read under Polygraphy's file lock); True when TensorRT rejected it.

    TensorRT refuses (``set_timing_cache`` returns False) a cache written by another GPU or TensorRT version, or a
    damaged one; Polygraphy ignores that return. Then the build runs with a new, empty cache, which replaces the
    file afterwards (keeping the other GPU's entries is of no use here).
    """
    from polygraphy import util

    data = b""
    if path.is_file():
        with util.LockFile(str(path)):
            data = path.read_bytes()
    try:
        cache = config.create_timing_cache(data)
        accepted = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False) is not False
    except Exception as e:  # a damaged file: TensorRT raises from create_timing_cache
        log.debug("timing cache %s: %s", path, e)
        accepted = False
    if accepted:
        return False
    log.warning("timing cache %s was written by another GPU or TensorRT version (or is damaged): building without "
                "it; it will be replaced", path)  # fmt: skip
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return True


def _save_timing_cache(config: _Config) -> None:
    """Merge this build's timings into the cache file under Polygraphy's lock, as Polygraphy's
    ``EngineBytesFromNetwork(save_timing_cache=...)`` does, but after the engine is written: a cache that cannot be
    saved costs a warning, never the engine."""
    from polygraphy import util

    path = config.timing_cache
    assert path is not None
    try:
        cache = config.config.get_timing_cache()
        if not cache:
            log.warning("TensorRT returned no timing cache: %s not updated", path)
            return
        with util.LockFile(str(path)):
            if path.is_file() and not config.cache_rejected:  # another build may have added to it meanwhile
                try:
                    previous = config.config.create_timing_cache(path.read_bytes())
                except Exception:
                    previous = None
                if previous is not None and not cache.combine(previous, ignore_mismatch=False):
                    log.warning("could not merge %s into this build's timing cache; it is replaced", path)
            with atomic_output(path) as tmp:
                tmp.write_bytes(memoryview(cache.serialize()))
        log.info("timing cache %s updated", path)
    except Exception as e:  # what get_timing_cache() gives after a rejected cache is not documented
        log.warning("the engine is written, but the timing cache %s was not updated: %s", path, e)


def _check_support(model: Any, plugins: bool) -> None:
    """:func:`require_tensorrt_support` for the installed TensorRT; its notes (deprecations, ops left to the
    plugin libraries) as warnings."""
    for finding in require_tensorrt_support(model, plugins=plugins).findings:
        log.warning("TensorRT support: %s", finding)


def _fp16_graph(onnx_path: Path, scratch: Path, plugins: bool = False) -> Path:
    """The fp16 graph (fp32 islands, fp32 inputs and outputs) of an fp32 ``m2f-export`` graph, as ``--fp16`` makes
    it: what a strongly typed TensorRT needs to build an fp16 engine."""
    log.info("strongly typed TensorRT: converting %s to the fp16 graph first (as m2f-export --fp16 does)", onnx_path)
    try:  # the conversion too: it imports onnxruntime's float16 converter only when it runs
        import onnx

        from m2f_deploy.export.fp16 import to_fp16

        model = to_fp16(onnx.load(str(onnx_path)))
    except ImportError as e:
        raise BackendError(
            f"{onnx_path} is an fp32 graph and this TensorRT builds strongly typed networks: --fp16 first converts "
            f"it to fp16, which needs the onnx and onnxruntime packages (pip install 'm2f-deploy[export]'), or "
            f"export with m2f-export CHECKPOINT --fp16 ({e})"
        ) from None
    _check_support(model, plugins)  # what TensorRT will parse is this graph: checked like the one given
    out = scratch / f"{onnx_path.stem}-fp16.onnx"
    onnx.save(model, str(out), save_as_external_data=model.ByteSize() > (1 << 31) - (1 << 26))
    return out


def _kind(layer: Any) -> str:
    """``LayerType.NORMALIZATION`` -> ``normalization``."""
    name = getattr(layer.type, "name", None)  # pybind11 enums have .name, as Python's do
    return (name if isinstance(name, str) else re.sub(r".*\.", "", str(layer.type))).lower()


def _pin_fp32(trt: Any, network: Any) -> list[str]:
    """Pin the float32 layers of a weakly typed reduced-precision build; returns their names."""
    floats = (trt.float32, trt.float16)
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = _kind(layer)
        if kind in NOT_PINNED or not tensorrt_fp32_layer(layer.name, kind):
            continue
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outputs or any(t.dtype not in floats for t in outputs):
            continue  # shape and index arithmetic: not a precision question
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    return pinned
