"""Fold the sizes a graph computes at run time from axes that are in fact static, and what follows from them.

The exporters keep every size live (``Shape -> Gather``) so that one model code serves static and dynamic
exports. With a dynamic batch axis but a static height and width, ``Shape`` of any tensor is not a constant,
so nothing that hangs off the spatial sizes folds: onnxruntime recomputed Swin's shifted-window masks, the
sine position embeddings and the deformable sampling geometry on every run (on Swin-T at 384x384, ~25 ms
of an int8 run on 2 cores). One round here is onnx-graphsurgeon's ``fold_constants(fold_shapes=True)`` on
ONNX's shape inference: each ``Shape`` / ``Shape -> Gather`` / ``Shape -> Slice`` that reads only static
axes becomes a constant, and everything computed from constants alone is evaluated (by onnxruntime) and
becomes one too. Axes that are dynamic (batch, and height / width with ``dynamic_hw``) stay live, so the
graph accepts exactly the inputs it did before. The clean-up repeats rounds while something folds.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger("m2f_deploy.export")


def _ranged_shapes_as_gathers(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node, dict]]:
    """Write each ``Shape(x, start, end)`` as ``Gather(Shape(x), [start, ..., end - 1])``, in place; returns the
    (Shape, Gather, range attributes) written, for :func:`_restore_ranged_shapes`.

    onnx-graphsurgeon 0.6.1 folds a ``Shape`` as if it had no ``start`` / ``end`` (opset 15; the exporters write
    them): on x ``[2, 3, 8, 12]`` it folded ``Shape(x, start=2)[0]`` to 2, not 8, and with a dynamic batch
    ``Shape(x, start=2)[1]`` to 3, not 12 (tests/test_cpu_graph.py). A ``Gather`` of a ``Shape`` it folds right.
    """
    nodes, written = [], []
    for node in graph.nodes:
        nodes.append(node)
        if node.op != "Shape" or not {"start", "end"} & set(node.attrs):
            continue
        rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
        start, end = node.attrs.get("start", 0), node.attrs.get("end")
        if start == 0 and end is None:  # (the TorchScript exporter writes start=0: the whole shape)
            del node.attrs["start"]
            continue
        if rank is None:
            continue  # (not folded at all: the library folds only inputs of known shape)
        axes = range(rank)[slice(start, end)]
        out, full = node.outputs[0], gs.Variable(f"{node.outputs[0].name}/full", dtype=np.int64)
        ranged = {k: node.attrs.pop(k) for k in ("start", "end") if k in node.attrs}
        node.outputs = [full]
        picked = gs.Constant(f"{out.name}/axes", np.array(list(axes), np.int64))
        nodes.append(gs.Node("Gather", f"{out.name}/axes", inputs=[full, picked], outputs=[out]))
        written.append((node, nodes[-1], ranged))
    graph.nodes = nodes
    return written


def _restore_ranged_shapes(graph: gs.Graph, written: list[tuple[gs.Node, gs.Node, dict]]) -> None:
    """Put back, in place, each ``Shape(x, start, end)`` whose selection did not fold (it reads a dynamic axis)."""
    live = {id(n) for n in graph.nodes}
    for shape, gather, ranged in written:
        if id(shape) in live and id(gather) in live and gather.inputs[0] is shape.outputs[0]:
            out = gather.outputs[0]
            gather.inputs.clear(), gather.outputs.clear()
            shape.attrs.update(ranged)
            shape.outputs = [out]
    graph.cleanup()


def fold_static_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """One folding round: the graph with the sizes of static axes, and what only constants compute, folded.

    Not Polygraphy's ``fold_constants`` loader (the same graphsurgeon call in a loop): between passes it infers
    shapes without data propagation, or with onnxruntime's symbolic inference. Measured on the tiny test graph
    (grid_sample, dynamic batch; benchmarks/bench_cleanup.py's inputs): 1,463 nodes with the first, against 917
    here; the second (Polygraphy's default) gave 887, but in this loop it took 6x as long (80 s against 13 s on
    the dynamic-size graph) and assumes sizes equal that it cannot prove equal ("Unable to determine if ...,
    treat as equal"). Polygraphy is not in the ``export`` extra either. The shapes ONNX inference found stay
    in the graph for onnxruntime's pass that follows (12 nodes fewer on Swin-T, 28 on the dynamic-size graph).
    """
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    graph = gs.import_onnx(inferred)
    written = _ranged_shapes_as_gathers(graph)
    graph.fold_constants(fold_shapes=True).cleanup()
    _restore_ranged_shapes(graph, written)
    folded = gs.export_onnx(graph, do_type_check=False)
    folded.metadata_props.extend(model.metadata_props)
    log.info("folding: %d -> %d nodes", len(model.graph.node), len(folded.graph.node))
    return folded
