"""fp32 ONNX -> INT8 QDQ ONNX with onnxruntime's static quantization, calibrated on real images.

The result is an explicitly quantized graph (QuantizeLinear / DequantizeLinear pairs, symmetric per-channel int8
weights), in one of two layouts, by ``target``:

- ``cpu``: uint8 (asymmetric) activations. onnxruntime's x86 kernels take uint8 activations with int8 weights
  (U8S8); with int8 activations they leave most MatMuls in float over dequantized weights, and the graph ran
  slower than fp32 (measured: Swin-T at 384x384, 2 cores). Linear layers are first rewritten as 2-D ``Gemm``
  (:mod:`m2f_deploy.export.gemm`), so that onnxruntime runs each as one ``QGemm`` with its bias inside.
- ``tensorrt``: int8 symmetric activations (zero point 0), the only kind TensorRT's explicit quantization takes
  (``m2f-export model-int8.onnx --int8`` builds the engine).

In both, only the inputs of the MatMuls are quantized, not their outputs: a quantized output would only be
dequantized again for the bias Add that follows, costing time and accuracy; Conv outputs are quantized, which
onnxruntime needs to fuse ``QLinearConv``.

Quantized: the weight-bearing MatMul / Gemm / Conv nodes, where the time goes. Kept in float: Softmax, LayerNorm,
GroupNorm and every other op (only the listed op types are quantized), and everything in the float32 scopes of
:mod:`m2f_deploy.export.precision` (the deformable sampling, position embeddings). Activation-by-activation
MatMuls (attention scores, attention-weighted values) are kept in float too: their ranges change per image.

The gate: the int8 graph against the fp32 graph it came from, on calibration images, in the post-processed
semantic maps (share of identical pixels); a miss writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from m2f_deploy.artifact import INPUT_NAME, METADATA_KEY, read_onnx_metadata
from m2f_deploy.errors import InputError, M2FError
from m2f_deploy.export.agreement import semantic_agreement
from m2f_deploy.export.gemm import linears_as_gemm
from m2f_deploy.export.precision import SCOPE_BLOCK_LIST
from m2f_deploy.utils import atomic_output

log = logging.getLogger("m2f_deploy.export")

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
MIN_INT8_AGREEMENT = 0.95
"""Share of identical semantic pixels, int8 against fp32 on calibration images, below which nothing is written."""
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
TARGETS = {"cpu": "uint8 asymmetric", "tensorrt": "int8 symmetric"}
"""Where an INT8 graph is meant to run -> how its activations are quantized."""


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over preprocessed images, with a progress callback."""

    def __init__(self, batches: list[np.ndarray], progress: Callable[[int, int], None] | None):
        self.batches, self.index, self.progress = batches, 0, progress

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.batches):
            return None
        self.index += 1
        if self.progress:
            self.progress(self.index, len(self.batches))
        return {INPUT_NAME: self.batches[self.index - 1]}

    def rewind(self) -> None:
        self.index = 0


def _weight_matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """Names of the MatMul/Gemm/Conv nodes with a weight (an initializer input), and of all others of those types."""
    initializers = {t.name for t in model.graph.initializer}
    constants = {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    weighted, others = [], []
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        has_weight = any(i in initializers or i in constants for i in node.input[1:2])
        in_float_scope = any(scope in node.name for scope in SCOPE_BLOCK_LIST)
        (weighted if has_weight and not in_float_scope else others).append(node.name)
    return weighted, others


def calibration_inputs(images: Sequence[Path], meta: dict[str, Any]) -> list[np.ndarray]:
    """Each image preprocessed as the runtime would, on the export size's canvas: ``[1, 3, H, W]`` each."""
    from m2f_deploy.processing import ImageProcessor
    from m2f_deploy.runtime.images import load_image

    processor = ImageProcessor(**{**meta["preprocessing"], "canvas": (meta["input"]["height"], meta["input"]["width"])})
    return [processor.preprocess(load_image(path))[INPUT_NAME] for path in images]


def quantize_int8(
    fp32_path: str | os.PathLike,
    path: str | os.PathLike,
    calibration_images: Sequence[str | os.PathLike],
    *,
    method: str = "minmax",
    min_agreement: float = MIN_INT8_AGREEMENT,
    target: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Quantize the fp32 graph at ``fp32_path`` into ``path`` (QDQ), calibrated on ``calibration_images``.

    target: ``cpu`` (onnxruntime, uint8 activations) or ``tensorrt`` (int8 symmetric activations).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, path = Path(fp32_path), Path(path)
    meta = read_onnx_metadata(fp32_path)
    if meta["precision"] != "fp32":
        raise InputError(f"{fp32_path}: INT8 quantization starts from an fp32 graph, this one is {meta['precision']}")
    if meta["msda"] == "trt_plugin":
        raise InputError(f"{fp32_path}: INT8 calibration runs the graph in onnxruntime, which has no TensorRT plugin; "
                         "export with --msda grid_sample or gather")  # fmt: skip
    if target not in TARGETS:
        from m2f_deploy.utils import did_you_mean

        raise InputError(f"unknown INT8 target {target!r}{did_you_mean(target, TARGETS)}; choose one of "
                         f"{', '.join(TARGETS)}")  # fmt: skip
    if method not in CALIBRATION_METHODS:
        raise InputError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if not calibration_images:
        raise InputError("INT8 calibration needs images (--calib DIR)")
    batches = calibration_inputs([Path(p) for p in calibration_images], meta)
    with tempfile.TemporaryDirectory(prefix=".m2f-int8-", dir=path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        except Exception as e:  # noqa: BLE001  optional: quantization works without it, a little less well
            log.warning(
                "quantization pre-processing skipped (%s)", str(e).splitlines()[0] if str(e) else type(e).__name__
            )
            prepared = fp32_path
        model = onnx.load(str(prepared), load_external_data=False)
        weighted, others = _weight_matmuls(model)
        log.info("quantizing %d weight MatMul/Gemm/Conv nodes; %d such nodes stay in float", len(weighted), len(others))
        if target == "cpu" and linears_as_gemm(model, set(weighted)):
            prepared = Path(tmp) / "gemm.onnx"
            onnx.save(model, str(prepared))
        raw = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared), str(raw), _Reader(batches, progress), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_quantize=weighted, per_channel=True,
            activation_type=QuantType.QUInt8 if target == "cpu" else QuantType.QInt8, weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, {"minmax": "MinMax"}.get(method, method.title())),
            # TensorRT dequantizes INT8/FP8/INT4 only: Conv biases stay float for it (the int32 ones onnxruntime
            # quantizes by default failed the static TensorRT check)
            extra_options={"ActivationSymmetric": target == "tensorrt", "WeightSymmetric": True,
                           "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"], "QuantizeBias": target == "cpu"},
        )  # fmt: skip
        graph = onnx.load(str(raw))
        meta["precision"] = "int8"
        meta["exporter"] = {**meta["exporter"], "int8": {
            "tool": "onnxruntime.quantization (QDQ, symmetric per-channel weights)", "target": target,
            "activations": TARGETS[target], "calibration": method,
            "calibration_images": len(batches), "quantized_nodes": len(weighted), "source_fp32": fp32_path.name,
        }}  # fmt: skip
        del graph.metadata_props[:]
        graph.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
        final = Path(tmp) / path.name
        onnx.save(graph, str(final))
        agreement = graphs_semantic_agreement(fp32_path, final, batches[: min(len(batches), 8)])
        log.info("int8 against fp32 on %d calibration image(s): %.2f%% identical semantic pixels",
                 min(len(batches), 8), 100 * agreement)  # fmt: skip
        if agreement < min_agreement:
            raise M2FError(
                f"{path}: the int8 graph agrees with fp32 on only {agreement:.1%} of semantic pixels (< "
                f"{min_agreement:.0%}); nothing was written. More or more varied calibration images may help."
            )
        with atomic_output(path) as out:
            os.replace(final, out)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def graphs_semantic_agreement(reference: Path, candidate: Path, batches: Sequence[np.ndarray]) -> float:
    """Mean share of identical semantic-map pixels of two graphs on the same inputs (onnxruntime CPU)."""
    from m2f_deploy.processing import ImageProcessor
    from m2f_deploy.runtime.onnxrt import OnnxRuntimeRunner

    with ExitStack() as stack:  # both sessions closed, also when one fails to start or to run
        runners = [
            stack.enter_context(OnnxRuntimeRunner(p, read_onnx_metadata(p), "cpu")) for p in (reference, candidate)
        ]
        processor = ImageProcessor()
        maps = [[m for x in batches for m in processor.post_process_semantic_segmentation(r.infer(x))] for r in runners]
    return semantic_agreement(*maps)
