"""Linear layers as 2-D ``Gemm``, for onnxruntime's quantized kernels (the INT8 ``cpu`` target).

The exporters write a Linear layer on ``[..., K]`` tokens as ``MatMul`` + bias ``Add``. Quantized, onnxruntime
runs that as ``MatMulIntegerToFloat`` and a separate float ``Add`` (one more pass over the output). A 2-D
``Gemm`` has the bias inside: the quantizer quantizes it (int32) and onnxruntime fuses the whole layer into one
``QGemm``. Between two Linear layers (a feed-forward block: Linear, activation, Linear) the tokens stay 2-D, so
that the quantizer sees ``Gemm -> Relu -> Gemm`` and onnxruntime runs it as two QGemms, the first one writing
uint8 (the ReLU is its clamp).
"""

from __future__ import annotations

from collections.abc import Collection
from functools import cache

import numpy as np
import onnx
from onnx import helper, numpy_helper

ELEMENTWISE = frozenset({"Relu", "Gelu", "Erf", "Sigmoid", "Tanh", "Add", "Sub", "Mul", "Div"})
"""Ops that may run on the 2-D view of tokens between two Linear layers (their other inputs: scalars)."""


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Value name -> its shape from shape inference (a symbolic dimension by its name, None if unknown)."""
    shapes = {}
    for info in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
    return shapes


def _scalars(model: onnx.ModelProto) -> set[str]:
    """Names of one-element constants (initializers and Constant outputs)."""
    names = {t.name for t in model.graph.initializer if int(np.prod(t.dims)) == 1}
    for node in model.graph.node:
        tensor = node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR
        if tensor and int(np.prod(node.attribute[0].t.dims)) == 1:
            names.add(node.output[0])
    return names


def linears_as_gemm(model: onnx.ModelProto, names: Collection[str]) -> int:
    """Rewrite each Linear layer ``Add(MatMul(X, W), b)`` whose MatMul is in ``names`` (W ``[K, M]`` and b ``[M]``
    initializers, X of rank >= 3) as ``Reshape(Gemm(Reshape(X, [-1, K]), W, b), [..., M])``, in place; the Gemm
    keeps the MatMul's name. Returns how many layers were rewritten.

    Layers reading one tensor share its 2-D view (so one QuantizeLinear); elementwise ops between layers run on
    the 2-D views when everything they feed is rewritten too. The output's leading dimensions are constants
    where shape inference knows all but the first, else taken from the first 3-D input at run time.
    """
    graph = model.graph
    weights = {t.name: list(t.dims) for t in graph.initializer}
    shapes, scalars = _shapes(model), _scalars(model)
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node

    def layer(node: onnx.NodeProto) -> tuple[onnx.NodeProto, str, int, int] | None:
        """The Linear at MatMul ``node`` if it is rewritten: its bias Add, the bias, K and M."""
        if node.op_type != "MatMul" or node.name not in names or len(weights.get(node.input[1], ())) != 2:
            return None
        after = consumers.get(node.output[0], [])
        if node.output[0] in outputs or len(after) != 1 or after[0].op_type != "Add":
            return None
        k, m = weights[node.input[1]]
        bias = [i for i in after[0].input if i != node.output[0]]
        if len(bias) != 1 or weights.get(bias[0]) != [m]:
            return None
        if len(shapes.get(node.input[0], ())) < 2 and not flat_source(node.input[0]):
            return None  # rank unknown
        return after[0], bias[0], k, m

    @cache
    def flat_source(name: str) -> bool:
        """``name`` can have a 2-D view: a rewritten layer's output, or elementwise on such views and scalars."""
        node = producer.get(name)
        if node is None:
            return False
        if node.op_type == "Add" and any(producer.get(i) and layer(producer[i]) for i in node.input):
            return True
        tensors = [i for i in node.input if i not in scalars]
        if node.op_type not in ELEMENTWISE or not tensors or not all(flat_source(i) for i in tensors):
            return False
        return len(tensors) == 1 or _same_shape([shapes.get(i) for i in tensors])  # else it may broadcast

    @cache
    def stays_flat(name: str) -> bool:
        """Everything reading ``name`` can read a 2-D view instead (so its 3-D form is not needed)."""
        readers = consumers.get(name, [])
        if name in outputs or not readers:
            return False
        return all((layer(r) and r.input[0] == name) or on_flat(r) for r in readers)

    def on_flat(node: onnx.NodeProto) -> bool:
        """``node`` is elementwise on 2-D views, and only such nodes and layers read it."""
        return node.op_type in ELEMENTWISE and flat_source(node.output[0]) and stays_flat(node.output[0])

    constants: list[onnx.TensorProto] = []
    flat: dict[str, tuple[str, str]] = {}  # tensor -> (its 2-D view, the 3-D tensor whose leading shape it has)
    rewritten: list[onnx.NodeProto] = []
    folded: set[int] = set()
    count = 0

    def constant(value: np.ndarray, name: str) -> str:
        constants.append(numpy_helper.from_array(value, name))
        return name

    for node in graph.node:
        if id(node) in folded:
            continue  # a bias Add, inside its Gemm
        found = layer(node)
        if found:
            add, bias, k, m = found
            folded.add(id(add))
            x, base = node.input[0], f"{node.name}/as_gemm"
            if x not in flat:
                shape = constant(np.array([-1, k], np.int64), f"{base}/flat_shape")
                rewritten.append(helper.make_node("Reshape", [x, shape], [f"{base}/x2d"], name=f"{base}/flatten"))
                flat[x] = (f"{base}/x2d", x)
            x2d, origin = flat[x]
            rewritten.append(helper.make_node("Gemm", [x2d, node.input[1], bias], [f"{base}/y2d"], name=node.name))
            flat[add.output[0]] = (f"{base}/y2d", origin)
            lead = shapes.get(origin, [None, None])[1:-1]
            if all(isinstance(d, int) and d > 0 for d in lead):
                target = constant(np.array([-1, *lead, m], np.int64), f"{base}/out_shape")
            else:
                width = constant(np.array([m], np.int64), f"{base}/width")
                rewritten.append(helper.make_node("Shape", [origin], [f"{base}/lead"], name=f"{base}/lead", end=-1))
                rewritten.append(helper.make_node("Concat", [f"{base}/lead", width], [f"{base}/out_shape"],
                                                  name=f"{base}/out_shape", axis=0))  # fmt: skip
                target = f"{base}/out_shape"
            # the 3-D output, for whatever else reads it (dropped below when nothing does)
            rewritten.append(helper.make_node("Reshape", [f"{base}/y2d", target], [add.output[0]],
                                              name=f"{base}/unflatten"))  # fmt: skip
            count += 1
            continue
        rewritten.append(node)
        if on_flat(node) and all(i in flat for i in node.input if i not in scalars):
            inputs = [i if i in scalars else flat[i][0] for i in node.input]
            out = f"{node.output[0]}/2d"
            rewritten.append(helper.make_node(node.op_type, inputs, [out], name=f"{node.name or node.output[0]}/2d",
                                              domain=node.domain, **_attributes(node)))  # fmt: skip
            flat[node.output[0]] = (out, next(flat[i][1] for i in node.input if i in flat))
    if not count:
        return 0
    live = _live(rewritten, outputs)
    read = {i for n in live for i in n.input}
    del graph.node[:]
    graph.node.extend(live)
    graph.initializer.extend(t for t in constants if t.name in read)
    return count


def _same_shape(shapes: list) -> bool:
    return shapes[0] is not None and None not in shapes[0] and all(s == shapes[0] for s in shapes)


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing reads (repeatedly), in order."""
    while True:
        read = set(outputs).union(*(n.input for n in nodes))
        live = [n for n in nodes if any(o in read for o in n.output)]
        if len(live) == len(nodes):
            return live
        nodes = live
