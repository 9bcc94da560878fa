"""The CPU-speed work on the exported graph: the DeformConv MSDA flavour, static-size folding, attention-size
masks, gathered Swin windows and fused query/key/value, the additive attention mask, Linear layers as Gemm for
INT8, denormals flushed in the sessions. Each keeps the numbers of the reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from factory import decisive_model, tiny_config
from onnx import TensorProto, helper

from m2f_deploy.config import SwinConfig
from m2f_deploy.errors import InputError
from m2f_deploy.export import export_onnx
from m2f_deploy.export.gemm import linears_as_gemm
from m2f_deploy.export.msda import flavour, msda_deform_conv, msda_gather, sampling_canvas
from m2f_deploy.export.onnx_export import inference_graph
from m2f_deploy.export.static_dims import fold_static_dims
from m2f_deploy.export.trt_support import check_tensorrt_support
from m2f_deploy.export.validate import session
from m2f_deploy.modeling import Mask2Former, msda_grid_sample
from m2f_deploy.modeling.swin import SwinLayer, window_tables
from m2f_deploy.runtime.onnxrt import session_options

SHAPES = [(3, 5), (6, 10), (12, 20)]  # non-square levels, as a 96 x 160 input gives


def _msda_inputs(batch=2, heads=4, dim=8, points=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, s, heads, dim, generator=g)
    # locations well outside [0, 1] too: zeros padding must hold at every border
    locations = torch.rand(batch, s, heads, len(SHAPES), points, 2, generator=g) * 1.6 - 0.3
    weights = torch.rand(batch, s, heads, len(SHAPES), points, generator=g)
    return value, locations, weights


def test_deform_conv_flavour_equals_the_reference_eagerly():
    value, locations, weights = _msda_inputs()
    reference = msda_grid_sample(value, SHAPES, locations, weights)
    with flavour("deform_conv", 19):
        out = msda_deform_conv(value, SHAPES, locations, weights)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    # and the gather flavour, which the deform_conv one must not be confused with, agrees as well
    torch.testing.assert_close(msda_gather(value, SHAPES, locations, weights), reference, atol=1e-5, rtol=0)


def test_onnxruntime_deform_conv_kernel_equals_the_reference(tmp_path):
    """The exported DeformConv nodes, run by onnxruntime's own kernel, at a batch other than the traced one."""
    value, locations, weights = _msda_inputs()

    class MSDA(torch.nn.Module):
        def forward(self, v, loc, w):
            return msda_deform_conv(v, SHAPES, loc, w)

    path = tmp_path / "msda.onnx"
    axes = {name: {0: "batch"} for name in ("v", "loc", "w")}
    with flavour("deform_conv", 19), torch.no_grad():
        torch.onnx.export(MSDA(), (value, locations, weights), str(path), dynamo=False, opset_version=19,
                          input_names=list(axes), dynamic_axes=axes)  # fmt: skip
    graph = onnx.load(str(path))
    nodes = [n for n in graph.graph.node if n.op_type == "DeformConv"]
    assert len(nodes) == len(SHAPES) and not any(n.domain for n in nodes)  # standard ONNX, one per level
    # TensorRT takes equal begin/end pads only; these levels have odd margins, met by one more zero row/column
    pads = [list(helper.get_attribute_value(a)) for n in nodes for a in n.attribute if a.name == "pads"]
    assert all(p[:2] == p[2:] for p in pads), pads
    assert sum(n.op_type == "Pad" for n in graph.graph.node) > 0
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (2, 3):
        v, loc, w = _msda_inputs(batch=batch, seed=batch)
        (got,) = sess.run(None, {"v": v.numpy(), "loc": loc.numpy(), "w": w.numpy()})
        np.testing.assert_allclose(got, msda_grid_sample(v, SHAPES, loc, w).numpy(), atol=1e-5, rtol=0)


def test_a_zero_row_and_column_for_equal_pads_give_the_same_numbers():
    """onnxruntime's DeformConv: an (h, w) map with unequal pads against the map with one zero row and column more
    and equal pads (the begin pads unchanged): bit for bit the same, taps outside the map included."""
    h, w, oh, ow, points = 3, 5, 8, 9, 4  # margins 5 (rows) and 7 (columns): odd
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((1, 4, h, w)).astype(np.float32)
    offsets = (rng.standard_normal((1, 2 * points * 2, oh, ow)) * 4).astype(np.float32)  # well outside, too
    mask = rng.random((1, 2 * points, oh, ow)).astype(np.float32)
    top, left = (oh - h) // 2, (ow - w + points - 1) // 2
    unequal = [top, left, oh - h - top, ow - w + points - 1 - left]

    def run(x, pads):
        node = helper.make_node("DeformConv", ["x", "w", "off", "b", "m"], ["y"], kernel_shape=[1, points], pads=pads,
                                group=4, offset_group=2)  # fmt: skip
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "off", "m")],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [onnx.numpy_helper.from_array(np.ones((4, 1, 1, points), np.float32), "w"),
             onnx.numpy_helper.from_array(np.zeros(4, np.float32), "b")],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
        sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x, "off": offsets, "m": mask})[0]

    padded = np.pad(maps, ((0, 0), (0, 0), (0, 1), (0, 1)))
    np.testing.assert_array_equal(run(padded, [top, left, top, left]), run(maps, unequal))
    assert run(maps, unequal).shape == (1, 4, oh, ow) and np.abs(run(maps, unequal)).max() > 0


def test_sampling_canvas_holds_every_query_and_level():
    for queries, shapes in [(3024, [(12, 12), (24, 24), (48, 48)]), (10752, [(16, 32), (32, 64), (64, 128)]),
                            (1, [(1, 1)]), (280, SHAPES)]:  # fmt: skip
        oh, ow = sampling_canvas(queries, shapes)
        assert oh * ow >= queries
        assert oh >= max(h for h, _ in shapes) and ow >= max(w for _, w in shapes)
        assert max(oh, ow) <= max(2 * int(np.sqrt(queries)) + 1, *[max(s) for s in shapes])  # near square
    assert sampling_canvas(3024, [(12, 12), (24, 24), (48, 48)]) == (54, 56)  # filled exactly: no pad, no slice
    assert sampling_canvas(3025, [(12, 12), (24, 24), (48, 48)]) == (55, 55)
    assert sampling_canvas(3023, [(12, 12), (24, 24), (48, 48)]) == (55, 55)  # a prime: padded


def test_deform_conv_export_matches_torch_and_needs_static_size(tmp_path):
    model = decisive_model()
    path = export_onnx(model, tmp_path / "m.onnx", height=64, width=96, msda="deform_conv")
    graph = onnx.load(str(path))
    assert sum(n.op_type == "DeformConv" for n in graph.graph.node) == 3 * model.config.encoder_layers
    assert not any(n.op_type == "GridSample" for n in graph.graph.node)
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 19
    # TensorRT: equal DeformConv pads (10.1+ imports DeformConv); so does its fp16 graph (the same conversion)
    assert check_tensorrt_support(path).findings == []
    from m2f_deploy.export.fp16 import to_fp16

    assert check_tensorrt_support(to_fp16(onnx.load(str(path)))).findings == []
    assert [f.versions for f in check_tensorrt_support(path, ["10.0", "10.3"]).errors] == [("10.0",)] * len(
        [n for n in graph.graph.node if n.op_type == "DeformConv"])  # fmt: skip
    sess = session(path, "deform_conv")
    x = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(1))  # batch 3: the batch stays dynamic
    got = sess.run(None, {"pixel_values": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    # the other flavours' 1e-4: measured 6e-7 (class) and 2e-5 (mask logits of magnitude ~35, the decisive model's),
    # as grid_sample's on the same model and input
    np.testing.assert_allclose(got[0], ref.class_queries_logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[1], ref.masks_queries_logits.numpy(), atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="needs a static size"):
        export_onnx(model, tmp_path / "d.onnx", height=64, width=64, msda="deform_conv", dynamic_hw=True)
    with pytest.raises(InputError, match="needs opset 19"):
        export_onnx(model, tmp_path / "d.onnx", height=64, width=64, msda="deform_conv", opset=17)
    assert not (tmp_path / "d.onnx").exists()


def _shape_graph(batch_dim):
    """x [batch, 3, 8, 12] -> y = Reshape(x, Concat(Shape(x)[0], prod(Shape(x)[1:4]))), the sizes taken twice."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, 8, 12])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)

    def const(name, values):
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                                 [len(values)], values))  # fmt: skip

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        const("i0", [0]), const("i123", [1, 2, 3]), const("start", [1]), const("end", [4]),
        helper.make_node("Gather", ["s", "i0"], ["b"]),
        helper.make_node("Slice", ["s", "start", "end"], ["chw"]),  # one way to take C, H, W
        helper.make_node("Gather", ["s", "i123"], ["chw2"]),  # the other
        helper.make_node("ReduceProd", ["chw"], ["n"], keepdims=1),
        helper.make_node("ReduceProd", ["chw2"], ["n2"], keepdims=1),
        helper.make_node("Concat", ["b", "n"], ["shape"], axis=0),
        helper.make_node("Concat", ["b", "n2"], ["shape2"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Reshape", ["r", "shape2"], ["y"]),
    ]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])


def test_fold_static_dims_folds_static_axes_only():
    model = _shape_graph("batch")
    folded = fold_static_dims(model)
    # C*H*W, taken either way, is a constant now and so is its product; Shape (dynamic batch) and the batch Gather stay
    assert [n.op_type for n in folded.graph.node] == ["Shape", "Gather", "Concat", "Concat", "Reshape", "Reshape"]
    constants = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in folded.graph.initializer}
    assert constants["n"] == constants["n2"] == [3 * 8 * 12]
    sess = onnxruntime.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 4):  # still any batch
        x = np.random.default_rng(0).standard_normal((batch, 3, 8, 12), dtype=np.float32)
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], x.reshape(batch, -1))
    static = fold_static_dims(_shape_graph(2))
    assert [n.op_type for n in static.graph.node] == ["Reshape", "Reshape"]  # everything is known: the batch too


def test_fold_static_dims_reads_the_range_of_a_shape():
    """Shape(x, start, end) (opset 15; the dynamo exporter writes it) selects axes from start: onnx-graphsurgeon
    alone folds it as the whole shape. A range that reads a dynamic axis stays one Shape node."""
    node = helper.make_node
    nodes = [node("Shape", ["x"], ["hw"], start=2), node("Gather", ["hw", "i0"], ["h"]),
             node("Gather", ["hw", "i1"], ["w"]), node("Unsqueeze", ["h", "ax"], ["h1"]),
             node("Unsqueeze", ["w", "ax"], ["w1"]),
             node("Shape", ["x"], ["b"], start=0, end=1), node("Concat", ["h1", "w1", "b"], ["y"], axis=0)]  # fmt: skip
    inits = [onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("i0", 0), ("i1", 1), ("ax", [0]))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 12])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    folded = fold_static_dims(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [(n.op_type, {a.name: a.i for a in n.attribute}) for n in folded.graph.node] == [
        ("Shape", {"start": 0, "end": 1}), ("Concat", {"axis": 0})]  # fmt: skip
    sess = onnxruntime.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        assert sess.run(None, {"x": np.zeros((batch, 3, 8, 12), np.float32)})[0].tolist() == [8, 12, batch]


def test_exported_graph_has_no_run_time_position_embeddings(tmp_path):
    """Static size, dynamic batch: the sine embeddings and shifted-window masks are constants of the graph."""
    path = export_onnx(decisive_model(), tmp_path / "m.onnx", height=64, width=64)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"Sin", "Cos", "Range"}
    dynamic = export_onnx(decisive_model(), tmp_path / "d.onnx", height=64, width=64, dynamic_hw=True)
    assert {"Sin", "Cos"} <= {n.op_type for n in onnx.load(str(dynamic)).graph.node}  # sizes live: computed


def test_attention_size_masks_equal_full_size_masks():
    """The exporter's order (resize the features, then the product) gives transformers' logits and masks."""
    model = Mask2Former.random(tiny_config(), seed=3)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
        with inference_graph(model, static_size=True):
            assert model.model.transformer_module.low_res_attention_masks
            fast = model(x)
            aux = model(x, output_auxiliary_logits=True)  # auxiliary logits keep every full-size mask
    assert not model.model.transformer_module.low_res_attention_masks  # restored
    assert not any(getattr(m, "fused_qkv", False) or getattr(m, "static_windows", False) for m in model.modules())
    torch.testing.assert_close(fast.class_queries_logits, reference.class_queries_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast.masks_queries_logits, reference.masks_queries_logits, atol=1e-4, rtol=0)
    assert len(aux.auxiliary_logits) == model.config.decoder_layers - 1


@pytest.mark.parametrize("hw", [(12, 12), (24, 24), (14, 21), (9, 30), (7, 7), (3, 5)])
def test_gathered_windows_and_fused_qkv_equal_the_reference_block(hw):
    """Padding + cyclic shift + window partition as one constant gather (and back), query/key/value as one
    product: the same numbers as the reference Swin block, shifted or not, for sizes that need padding or not."""
    h, w = hw
    for shift in (False, True):
        layer = SwinLayer(SwinConfig(window_size=7), 32, 4, shift).eval()
        x = torch.randn(2, h * w, 32, generator=torch.Generator().manual_seed(h * w))
        with torch.no_grad():
            reference = layer(x, (h, w))
            layer.static_windows, layer.attention.self.fused_qkv = True, True
            torch.testing.assert_close(layer(x, (h, w)), reference, atol=1e-6, rtol=0)
    gather, scatter = window_tables(h, w, 7, 3)
    assert sorted(gather[scatter].tolist()) == list(range(h * w))  # every token read once and put back
    assert (gather == h * w).sum() == gather.numel() - h * w  # the rest is padding


def test_cross_attention_mask_is_additive_in_the_graph(tmp_path):
    """No Where broadcast over the heads axis (onnxruntime's is ~15x slower than its Add)."""
    path = export_onnx(decisive_model(), tmp_path / "m.onnx", height=64, width=64)
    graph = onnx.load(str(path))
    shapes = {v.name: v for v in onnx.shape_inference.infer_shapes(graph).graph.value_info}
    for node in graph.graph.node:
        if node.op_type == "Where" and "/cross_attn/" in node.name:
            out = shapes.get(node.output[0])
            assert out is None or len(out.type.tensor_type.shape.dim) != 4 or \
                out.type.tensor_type.shape.dim[1].dim_value in (0, 1), node.name  # fmt: skip


def test_session_options():
    options = session_options(onnxruntime, threads=2)
    assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"
    assert options.intra_op_num_threads == 2
    fp16 = session_options(onnxruntime, precision="fp16")  # its NCHWc bug: see session_options
    assert fp16.get_session_config_entry("optimization.disable_specified_optimizers") == "NchwcTransformer"


def _linear(name: str, x: str, k: int, m: int, out: str, g: np.random.Generator, bias_first: bool = False):
    """A Linear layer as the exporters write it: MatMul + bias Add (nodes, initializers)."""
    w = onnx.numpy_helper.from_array(g.standard_normal((k, m), np.float32), f"{name}.w")
    b = onnx.numpy_helper.from_array(g.standard_normal(m, np.float32), f"{name}.b")
    add = helper.make_node("Add", [b.name, f"{name}.mm"] if bias_first else [f"{name}.mm", b.name], [out])
    return [helper.make_node("MatMul", [x, w.name], [f"{name}.mm"], name=name), add], [w, b]


def _graph(pieces, inputs, outputs, scalars=()):
    """A shape-inferred model of ``pieces`` in order: Linear layers from :func:`_linear`, or single nodes."""
    pieces = [p if isinstance(p, tuple) else ([p], []) for p in pieces]
    inits = [t for p in pieces for t in p[1]] + [onnx.numpy_helper.from_array(np.array(v, np.float32), n)
                                                  for n, v in scalars]  # fmt: skip
    values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    results = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
    graph = helper.make_graph([n for p in pieces for n in p[0]], "g", values, results, inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _run(model, feed):
    return onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_linears_as_gemm_keep_the_numbers_and_share_the_flattened_input():
    """MatMul + bias Add -> Reshape, Gemm, Reshape (onnxruntime then fuses the quantized layer with its bias):
    same outputs, a 4-D input whose inner sizes are known and a 3-D one whose are not, two layers on one input."""
    g = np.random.default_rng(0)
    parts = [_linear("l1", "x", 8, 5, "y1", g), _linear("l2", "x", 8, 3, "y2", g, bias_first=True),
             _linear("l3", "z", 8, 4, "y3", g)]  # fmt: skip
    model = _graph(parts, [("x", ["n", 2, 6, 8]), ("z", ["n", "s", 8])], ["y1", "y2", "y3"])
    feed = {"x": g.standard_normal((3, 2, 6, 8), np.float32), "z": g.standard_normal((2, 7, 8), np.float32)}
    before = _run(model, feed)
    assert linears_as_gemm(model, {"l1", "l2", "l3"}) == 3
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Gemm") == 3 and "MatMul" not in ops and "Add" not in ops
    assert [n.input[0] for n in model.graph.node if n.name in ("l1", "l2")] == ["l1/as_gemm/x2d"] * 2  # shared
    for a, b in zip(_run(model, feed), before):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_feed_forward_blocks_stay_2d_between_their_linears():
    """Linear -> ReLU -> Linear and Linear -> GELU (as exported: Div, Erf, Add, Mul, Mul) -> Linear: no Reshape
    between the two Gemms (so the quantizer sees Gemm -> Relu -> Gemm); a tensor read by anything else stays 3-D."""
    g = np.random.default_rng(1)
    node = helper.make_node
    pieces = [_linear("fc1", "x", 8, 16, "h1", g), node("Relu", ["h1"], ["r1"]), _linear("fc2", "r1", 16, 8, "y1", g),
              _linear("fc3", "y1", 8, 16, "h3", g), node("Div", ["h3", "sqrt2"], ["d"]), node("Erf", ["d"], ["e"]),
              node("Add", ["e", "one"], ["e1"]), node("Mul", ["h3", "e1"], ["p"]), node("Mul", ["p", "half"], ["gelu"]),
              _linear("fc4", "gelu", 16, 8, "y2", g), node("Add", ["y1", "y2"], ["y"])]  # fmt: skip  y1: fc3 + residual
    model = _graph(pieces, [("x", ["n", 6, 8])], ["y"], [("sqrt2", 2**0.5), ("one", 1.0), ("half", 0.5)])
    feed = {"x": g.standard_normal((3, 6, 8), np.float32)}
    (before,) = _run(model, feed)
    assert linears_as_gemm(model, {"fc1", "fc2", "fc3", "fc4"}) == 4
    onnx.checker.check_model(model)
    two_d = ["Gemm", "Relu", "Gemm", "Reshape", "Gemm", "Div", "Erf", "Add", "Mul", "Mul", "Gemm"]
    assert [n.op_type for n in model.graph.node] == ["Reshape", *two_d, "Reshape", "Add"]
    read = {i for n in model.graph.node for i in n.input}
    assert all(t.name in read for t in model.graph.initializer)  # no constant left behind
    np.testing.assert_allclose(_run(model, feed)[0], before, atol=1e-4, rtol=0)
