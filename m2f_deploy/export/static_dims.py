"""Fold the sizes a graph computes at run time from axes that are in fact static.

The exporters keep every size live (``Shape -> Gather``) so that one model code serves static and dynamic
exports. With a dynamic batch axis but a static height and width, ``Shape`` of any tensor is not a constant,
so nothing that hangs off the spatial sizes folds: onnxruntime recomputed Swin's shifted-window masks, the
sine position embeddings and the deformable sampling geometry on every run (on Swin-T at 384x384, ~25 ms
of an int8 run on 2 cores). This pass replaces each ``Shape`` / ``Shape -> Gather`` / ``Shape -> Slice``
whose selected axes ONNX shape inference knows to be static by a constant; the clean-up's constant folding
then folds everything downstream. Axes that are dynamic (batch, and height / width with ``dynamic_hw``) stay
live, so the graph accepts exactly the inputs it did before.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger("m2f_deploy.export")


def _known_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    dims: dict[str, list[int | None]] = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            dims[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return dims


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64}
    out = {name: numpy_helper.to_array(t) for name, t in values.items() if np.prod(t.dims) <= 8}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            array = numpy_helper.to_array(node.attribute[0].t)
            if array.dtype == np.int64 and array.size <= 8:
                out[node.output[0]] = array
    return out


def _shape_of(node: onnx.NodeProto, dims: list[int | None]) -> list[int | None]:
    attrs = {a.name: a.i for a in node.attribute}
    rank = len(dims)
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    return dims[slice(start + rank if start < 0 else start, end + rank if end < 0 else end)]


def _folded(node: onnx.NodeProto, shapes: dict[str, list], constants: dict[str, np.ndarray]) -> np.ndarray | None:
    """The constant value of a Gather / Slice ``node``'s output, when it only reads static axes of a Shape."""
    source = shapes.get(node.input[0]) if node.input else None
    if source is None:
        return None
    if node.op_type == "Gather" and node.input[1] in constants:
        index = constants[node.input[1]]
        picked = np.asarray(source, dtype=object)[index]
    elif node.op_type == "Slice" and all(i in constants for i in node.input[1:3]) and len(node.input) <= 5:
        starts, ends = constants[node.input[1]], constants[node.input[2]]
        axes = constants.get(node.input[3]) if len(node.input) > 3 and node.input[3] else np.array([0])
        steps = constants.get(node.input[4]) if len(node.input) > 4 and node.input[4] else np.array([1])
        if axes is None or steps is None or list(axes) not in ([0], [-1]):
            return None
        picked = np.asarray(source, dtype=object)[int(starts[0]) : int(min(ends[0], 2**31)) : int(steps[0])]
    else:
        return None
    picked = np.asarray(picked, dtype=object)
    return None if any(v is None for v in picked.reshape(-1)) else picked.astype(np.int64)


def fold_static_dims(model: onnx.ModelProto) -> int:
    """Replace, in place, the run-time sizes of static axes by constants; returns how many values were folded."""
    dims = _known_dims(model)
    constants = _constants(model)
    shapes = {node.output[0]: _shape_of(node, dims[node.input[0]])
              for node in model.graph.node if node.op_type == "Shape" and node.input[0] in dims}  # fmt: skip
    kept, folded = [], 0
    for node in model.graph.node:
        value = None
        if node.op_type == "Shape" and node.output[0] in shapes and None not in shapes[node.output[0]]:
            value = np.asarray(shapes[node.output[0]], dtype=np.int64)
        elif node.op_type in ("Gather", "Slice"):
            value = _folded(node, shapes, constants)
        if value is None:
            kept.append(node)
            continue
        kept.append(helper.make_node("Constant", [], [node.output[0]], name=node.name + "/static",
                                     value=numpy_helper.from_array(value)))  # fmt: skip
        folded += 1
    del model.graph.node[:]
    model.graph.node.extend(kept)
    log.info("static sizes: %d run-time size computations folded", folded)
    return folded
