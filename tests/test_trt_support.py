"""The static TensorRT check: every rule on small planted graphs (each with a passing twin, so that a rule broken
or inverted fails a test), the error before any engine build, and m2f-export --check-tensorrt end to end.

The checks of the graphs we export live beside their exports (tests/test_export.py, test_cpu_graph.py,
test_int8.py): nothing is exported twice for them.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from m2f_deploy.artifact import DEFAULT_PREPROCESSING, METADATA_KEY, build_metadata
from m2f_deploy.cli.export import main as export_main
from m2f_deploy.errors import BackendError, InputError
from m2f_deploy.export.trt_support import (
    DEFAULT_TARGETS,
    TensorRTSupportError,
    check_tensorrt_support,
    parse_trt_version,
    require_tensorrt_support,
)

F, F16, I64, I32, U8, I8, B = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.INT32,
                               TensorProto.UINT8, TensorProto.INT8, TensorProto.BOOL)  # fmt: skip


def _model(nodes, inputs, outputs, inits=(), opset=19, extra_opsets=()):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in inits],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets)


def _findings(model, versions=None):
    """{(node, rule start): versions} of the errors."""
    report = check_tensorrt_support(model, versions)
    return {(f.node, f.rule.split(",")[0].split(" (")[0]): f.versions for f in report.errors}


def _one(model, versions=None):
    report = check_tensorrt_support(model, versions)
    assert len(report.errors) == 1, report.format()
    return report.errors[0]


def _unary(op, in_type=F, out_type=None, **attrs):
    return _model([helper.make_node(op, ["x"], ["y"], name="n", **attrs)], [("x", in_type, [2, 3])],
                  [("y", out_type or in_type, None)])  # fmt: skip


# -- ops: supported, unsupported, unknown, from which release -----------------------------------------------------


def test_supported_unsupported_and_unknown_ops():
    assert check_tensorrt_support(_unary("Relu")).ok
    assert "not supported" in _one(_unary("Unique")).rule  # an "N" row of the matrix
    unknown = _one(_unary("NotAnOp"))
    assert unknown.node == "n" and "unknown op" in unknown.rule and unknown.versions == tuple(DEFAULT_TARGETS)
    foreign = _model([helper.make_node("Foo", ["x"], ["y"], name="n", domain="com.example")], [("x", F, [2])],
                     [("y", F, None)], extra_opsets=["com.example"])  # fmt: skip
    assert "neither an ONNX op" in _one(foreign).rule


def test_ops_are_checked_from_their_first_release():
    window = _model([helper.make_node("HannWindow", ["n"], ["y"], name="w")], [("n", I64, [])], [("y", F, None)])
    assert _findings(window, ["10.3", "10.4"]) == {("w", "imported from TensorRT 10.4"): ("10.3",)}


# -- types ----------------------------------------------------------------------------------------------------------


def test_data_types_come_from_type_inference():
    assert check_tensorrt_support(_unary("NonZero", F, I64)).ok
    bad = _one(_unary("NonZero", B, I64))
    assert "type BOOL" in bad.rule
    # inferred, not declared: the Relu between input and NonZero has no value_info of its own
    chain = _model([helper.make_node("Not", ["x"], ["m"], name="not"), helper.make_node("NonZero", ["m"], ["y"], name="nz")],
                   [("x", B, [4])], [("y", I64, None)])  # fmt: skip
    assert _one(chain).node == "nz"
    # a stale declared type (the fp16 converter leaves some) neither hides the finding nor breaks inference
    chain.graph.value_info.append(helper.make_tensor_value_info("m", F, [4]))
    assert _one(chain).node == "nz"


def test_uint8_only_at_the_graph_boundary_and_unknown_types():
    cast_io = _model([helper.make_node("Cast", ["x"], ["y"], name="c", to=F)], [("x", U8, [4])], [("y", F, None)])
    assert check_tensorrt_support(cast_io).ok
    inside = _model([helper.make_node("Cast", ["x"], ["u"], name="c", to=U8),
                     helper.make_node("Cast", ["u"], ["y"], name="d", to=F)], [("x", F, [4])], [("y", F, None)])  # fmt: skip
    rules = [f.rule for f in check_tensorrt_support(inside).errors]
    assert any("UINT8 tensor 'u'" in r and "--int8-target tensorrt" in r for r in rules)
    int16 = _model([helper.make_node("Cast", ["x"], ["y"], name="c", to=TensorProto.INT16)], [("x", F, [4])],
                   [("y", TensorProto.INT16, None)])  # fmt: skip
    assert any("not a TensorRT type" in f.rule for f in check_tensorrt_support(int16).errors)


# -- documented restrictions ---------------------------------------------------------------------------------------


def _deform_conv(pads, maps_type=F, weight_type=F):
    return _model(
        [helper.make_node("DeformConv", ["x", "w", "off", "b", "mask"], ["y"], name="dc", kernel_shape=[1, 2],
                          pads=pads, group=4, offset_group=2)],
        [("x", maps_type, [1, 4, 5, 6]), ("off", maps_type, [1, 8, 5, 6]), ("mask", maps_type, [1, 4, 5, 6])],
        [("y", maps_type, None)],
        [("w", np.ones((4, 1, 1, 2), np.float32 if weight_type == F else np.float16)), ("b", np.zeros(4, np.float32 if weight_type == F else np.float16))],
    )  # fmt: skip


def test_deform_conv_pads_types_and_release():
    assert check_tensorrt_support(_deform_conv([0, 1, 0, 1])).ok
    unequal = _one(_deform_conv([0, 1, 0, 2]))
    assert unequal.node == "dc" and "begin and end pads must be equal" in unequal.rule
    assert "non-negative" in check_tensorrt_support(_deform_conv([-1, 1, -1, 1])).errors[0].rule
    assert "all FP32 or all FP16" in _one(_deform_conv([0, 1, 0, 1], weight_type=F16)).rule
    assert check_tensorrt_support(_deform_conv([0, 1, 0, 1], F16, F16)).ok
    assert _findings(_deform_conv([0, 1, 0, 1]), ["10.0", "10.1"]) == {("dc", "imported from TensorRT 10.1"): ("10.0",)}


def _qdq(zero_point, dtype=np.int8):
    return _model(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")],
        [("x", F, [4])], [("y", F, None)], [("s", np.float32(0.1)), ("z", dtype(zero_point))],
    )  # fmt: skip


def test_quantization_needs_zero_points_of_zero_and_int8():
    assert check_tensorrt_support(_qdq(0)).ok
    assert _findings(_qdq(3)) == {("q", "y_zero_point must be zero"): tuple(DEFAULT_TARGETS),
                                  ("dq", "x_zero_point must be zero"): tuple(DEFAULT_TARGETS)}  # fmt: skip
    rules = {f.rule for f in check_tensorrt_support(_qdq(0, np.uint8)).errors}
    assert any("type UINT8 of 'q' is not supported" in r for r in rules)  # DequantizeLinear takes INT8/FP8/INT4


def _resize(**attrs):
    return _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="r", **attrs)],
                  [("x", F, [1, 1, 4, 4])], [("y", F, None)], [("scales", np.array([1, 1, 2, 2], np.float32))])  # fmt: skip


def test_resize_modes():
    assert check_tensorrt_support(_resize(mode="linear", coordinate_transformation_mode="pytorch_half_pixel")).ok
    assert check_tensorrt_support(_resize(mode="nearest", nearest_mode="floor", coordinate_transformation_mode="asymmetric")).ok
    assert "mode 'cubic'" in _one(_resize(mode="cubic")).rule
    assert "coordinate_transformation_mode 'tf_crop_and_resize'" in _one(
        _resize(mode="linear", coordinate_transformation_mode="tf_crop_and_resize")).rule
    assert "antialias" in _one(_resize(mode="linear", antialias=1)).rule


def test_grid_sample_rank():
    def graph(rank):
        shape = [1, 2] + [4] * (rank - 2)
        return _model([helper.make_node("GridSample", ["x", "g"], ["y"], name="gs")],
                      [("x", F, shape), ("g", F, [1] + [3] * (rank - 2) + [rank - 2])], [("y", F, None)])  # fmt: skip

    assert check_tensorrt_support(graph(4)).ok
    assert _findings(graph(5), ["10.16", "11.2", "11.3"]) == {("gs", "input must be 4-D"): ("10.16", "11.2")}
    assert "5-D from TensorRT 11.2.1: checked as 11.3" in _one(graph(5), ["11.2"]).rule


def _with_axes(op, axes_from_shape: bool, rank_in=3):
    """op(x, axes) with axes constant, or computed from Shape (a tensor)."""
    nodes, inits = [], []
    if axes_from_shape:
        nodes += [helper.make_node("Shape", ["x"], ["s"], name="shape", start=0, end=1),
                  helper.make_node("Sub", ["s", "two"], ["axes"], name="sub")]  # fmt: skip
        inits.append(("two", np.array([2], np.int64)))  # axes = [x.shape[0] - 2] = [0]
    else:
        inits.append(("axes", np.array([0], np.int64)))
    if op == "Slice":
        inits += [("st", np.array([0], np.int64)), ("en", np.array([1], np.int64))]
        nodes.append(helper.make_node("Slice", ["x", "st", "en", "axes"], ["y"], name="op"))
    elif op == "Pad":
        inits += [("p", np.array([0, 1], np.int64))]
        nodes.append(helper.make_node("Pad", ["x", "p", "", "axes"], ["y"], name="op"))
    elif op == "ReduceSum":
        nodes.append(helper.make_node(op, ["x", "axes"], ["y"], name="op"))
    else:
        nodes.append(helper.make_node(op, ["x", "axes"], ["y"], name="op"))
    shape = [2, 1, 3] if op == "Squeeze" else [2, 3, 4][:rank_in]
    return _model(nodes, [("x", F, shape)], [("y", F, None)], inits)


@pytest.mark.parametrize("op, first_ok", [("Slice", "10.3"), ("Pad", "10.4"), ("Squeeze", "10.7"),
                                          ("Unsqueeze", "10.7"), ("ReduceSum", None)])  # fmt: skip
def test_constant_axes_until_the_release_that_lifts_it(op, first_ok):
    assert check_tensorrt_support(_with_axes(op, False), ["10.0"]).ok
    versions = ["10.0", "10.2", "10.3", "10.4", "10.7", "10.16", "11.x"]
    found = _findings(_with_axes(op, True), versions)
    assert list(found) == [("op", "axes must be a constant")]
    failing = next(iter(found.values()))
    expected = versions if first_ok is None else versions[: versions.index(first_ok)]
    assert list(failing) == expected


def test_topk_scatter_layernorm_pool_constant_rules():
    topk = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="t", sorted=0)], [("x", F, [8])],
                  [("v", F, None), ("i", I64, None)], [("k", np.array([2], np.int64))])  # fmt: skip
    assert "sorted must be 1" in _one(topk).rule
    big_k = _model([helper.make_node("TopK", ["x", "k"], ["v", "i"], name="t")], [("x", F, [5000])],
                   [("v", F, None), ("i", I64, None)], [("k", np.array([3840], np.int64))])  # fmt: skip
    assert "less than 3840" in _one(big_k).rule
    ln = _model([helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean"], name="ln")], [("x", F, [2, 4])],
                [("y", F, None), ("mean", F, None)], [("g", np.ones(4, np.float32))])  # fmt: skip
    assert "only the first output" in _one(ln).rule
    pool = _unary("MaxPool", kernel_shape=[2], dilations=[1])
    assert "2-D or 3-D pooling only" in check_tensorrt_support(pool).errors[0].rule
    assert check_tensorrt_support(_model([helper.make_node("MaxPool", ["x"], ["y"], name="n", kernel_shape=[2, 2])],
                                         [("x", F, [1, 1, 4, 4])], [("y", F, None)])).ok  # fmt: skip
    scatter = _model([helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="s", reduction="add")],
                     [("x", F, [4]), ("u", F, [1])], [("y", F, None)], [("i", np.array([[0]], np.int64))])  # fmt: skip
    assert "reduction" in _one(scatter).rule
    text = _model([helper.make_node("Constant", [], ["y"], name="c", value_string="a")], [], [("y", TensorProto.STRING, None)])
    assert any("value_string" in f.rule for f in check_tensorrt_support(text).errors)


def test_einsum_and_pow_until_10_12():
    einsum = _model([helper.make_node("Einsum", ["a", "b"], ["y"], name="e", equation="...ij,...jk->...ik")],
                    [("a", F, [2, 3, 4]), ("b", F, [2, 4, 5])], [("y", F, None)])  # fmt: skip
    assert _findings(einsum, ["10.3", "10.12"]) == {("e", "ellipsis is not supported"): ("10.3",)}
    plain = _model([helper.make_node("Einsum", ["a", "b"], ["y"], name="e", equation="bij,bjk->bik")],
                   [("a", F, [2, 3, 4]), ("b", F, [2, 4, 5])], [("y", F, None)])  # fmt: skip
    assert check_tensorrt_support(plain, ["10.3"]).ok
    powi = _model([helper.make_node("Pow", ["a", "b"], ["y"], name="p")], [("a", I64, [3]), ("b", I64, [3])],
                  [("y", I64, None)])  # fmt: skip
    assert ("p", "integer base") in {(n, r[:12]) for n, r in _findings(powi, ["10.3", "10.12"])}
    assert not _findings(powi, ["10.12"])


@pytest.mark.parametrize("opset, failing", [(17, []), (21, ["10.3"]), (25, ["10.3", "10.16", "11.x"]), (8, "all")])
def test_opset_range(opset, failing):
    report = check_tensorrt_support(_model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, [2])],
                                           [("y", F, None)], opset=opset))  # fmt: skip
    versions = [v for f in report.errors if f.op == "opset" for v in f.versions]
    assert versions == (list(DEFAULT_TARGETS) if failing == "all" else failing)
    assert check_tensorrt_support(_unary("Relu"), ["11.5"]).ok
    if opset == 25:
        assert check_tensorrt_support(_model([helper.make_node("Relu", ["x"], ["y"])], [("x", F, [2])],
                                             [("y", F, None)], opset=25), ["11.5"]).ok  # fmt: skip


# -- the MSDA plugin ------------------------------------------------------------------------------------------------


def _plugin(version="1", shapes_type=np.int32, namespace="", version_as_int=False, value=F):
    attrs = {"plugin_version": int(version) if version_as_int else version, "plugin_namespace": namespace}
    return _model(
        [helper.make_node("MultiscaleDeformableAttnPlugin_TRT", ["v", "ss", "ls", "loc", "w"], ["y"], name="msda",
                          domain="trt.plugins", **attrs)],
        [("v", value, [1, 20, 2, 4]), ("loc", value, [1, 5, 2, 2, 3, 2]), ("w", value, [1, 5, 2, 2, 3])],
        [("y", value, None)],
        [("ss", np.array([[4, 4], [2, 2]], shapes_type)), ("ls", np.array([0, 16], shapes_type))],
        extra_opsets=["trt.plugins"],
    )  # fmt: skip


def test_plugin_versions_by_release():
    v1 = check_tensorrt_support(_plugin("1"))
    assert v1.ok and [(f.severity, f.versions) for f in v1.findings] == [("deprecated", ("10.16", "11.x"))]
    assert check_tensorrt_support(_plugin("1"), ["10.3"]).findings == []
    assert _findings(_plugin("2")) == {("msda", "plugin_version 2 exists from TensorRT 10.11"): ("10.3",)}
    assert check_tensorrt_support(_plugin("2"), ["10.11", "10.16", "11.x"]).findings == []
    assert "does not exist" in _one(_plugin("3")).rule


def test_plugin_types_attributes_and_namespace():
    assert check_tensorrt_support(_plugin(value=F16), ["10.3"]).ok
    int64 = _findings(_plugin(shapes_type=np.int64), ["10.3"])
    assert set(int64) == {("msda", "spatial_shapes must be INT32"), ("msda", "level_start_index must be INT32")}
    assert "must be a string" in _one(_plugin(version_as_int=True), ["10.3"]).rule
    assert "plugin_namespace must be ''" in _one(_plugin(namespace="mine"), ["10.3"]).rule


# -- versions, the report, the error --------------------------------------------------------------------------------


def test_versions_are_parsed_and_checked():
    assert parse_trt_version("10.3") == ("10.3", (10, 3))
    assert parse_trt_version("11") == ("11.x", (11, 0)) == parse_trt_version("11.x")
    for bad in ("8.6", "12.0", "ten", "10.3.1"):
        with pytest.raises(InputError, match="--trt-version"):
            parse_trt_version(bad)


def test_report_and_error_name_the_node_and_the_rule(tmp_path):
    bad = _deform_conv([0, 1, 0, 2])
    report = check_tensorrt_support(bad)
    assert not report.ok and "node 'dc' (DeformConv): begin and end pads" in report.format()
    assert check_tensorrt_support(_unary("Relu")).format().endswith("passes for TensorRT 10.3, 10.16, 11.x")
    with pytest.raises(TensorRTSupportError, match=r"node 'dc' \(DeformConv\): begin and end pads must be equal"):
        require_tensorrt_support(bad)
    assert require_tensorrt_support(_unary("Relu")).ok
    with pytest.raises(InputError, match="no such ONNX file"):
        check_tensorrt_support(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    with pytest.raises(InputError, match="not an ONNX model"):
        check_tensorrt_support(tmp_path / "junk.onnx")


# -- before any engine build, and the CLI ---------------------------------------------------------------------------


@pytest.fixture
def planted(tmp_path):
    """A graph with one unsupported node and unequal DeformConv pads, saved."""
    model = _deform_conv([0, 1, 0, 2])
    model.graph.node.append(helper.make_node("Unique", ["y"], ["u"], name="unique"))
    model.graph.output.append(helper.make_tensor_value_info("u", F, None))
    # metadata as m2f-export writes it, so that an engine build gets past its argument checks to the static check
    meta = build_metadata(
        id2label={0: "a"}, num_queries=4, preprocessing=dict(DEFAULT_PREPROCESSING), height=64, width=64, batch=1,
        dynamic_batch=True, dynamic_hw=False, msda="deform_conv", precision="fp32", source={}, exporter={},
    )
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
    path = tmp_path / "planted.onnx"
    onnx.save(model, str(path))
    return path


def test_engine_build_refuses_the_graph_before_tensorrt_is_needed(planted, tmp_path):
    from m2f_deploy.export.tensorrt import build_engine

    with pytest.raises(TensorRTSupportError, match="node 'dc' \\(DeformConv\\)") as info:
        build_engine(planted, tmp_path / "m.engine")
    assert "and 1 more" in str(info.value)  # the Unique node
    with pytest.raises(TensorRTSupportError, match="node 'dc'"):
        export_main([str(planted), "-o", str(tmp_path / "m.engine")])  # the CLI's engine path, too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["planted.onnx"]


def test_ops_without_importer_are_notes_when_plugin_libraries_are_loaded(planted):
    """Only ops TensorRT has no importer for are left to plugins; a rule broken on a known op stays an error."""
    model = onnx.load(str(planted))
    model.graph.node.append(helper.make_node("MyOp", ["u"], ["m"], name="mine", domain="my.plugins"))
    report = check_tensorrt_support(model, ["10.3"], plugins=True)
    assert {(f.node, f.severity) for f in report.findings} == {("dc", "error"), ("unique", "plugin"), ("mine", "plugin")}
    assert "node 'unique' (Unique): not supported by TensorRT's ONNX parser (left to the plugin libraries)" in \
        report.format()
    assert {f.node for f in check_tensorrt_support(model, ["10.3"]).errors} == {"dc", "unique", "mine"}
    del model.graph.node[0]  # the DeformConv: what is left passes, with notes
    assert require_tensorrt_support(model, ["10.3"], plugins=True).ok
    with pytest.raises(TensorRTSupportError, match="node 'unique'"):
        require_tensorrt_support(model, ["10.3"])


def test_cli_check_tensorrt(planted, tmp_path, capsys):
    assert export_main([str(planted), "--check-tensorrt"]) == 1
    out = capsys.readouterr().out
    assert "node 'dc' (DeformConv): begin and end pads must be equal" in out and "node 'unique' (Unique)" in out
    good = tmp_path / "good.onnx"
    onnx.save(_plugin("2"), str(good))
    assert export_main([str(good), "--check-tensorrt", "--trt-version", "10.16", "--trt-version", "11"]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: passes for TensorRT 10.16, 11.x"
    assert export_main([str(good), "--check-tensorrt", "--trt-version", "10.3"]) == 1
    assert "plugin_version 2 exists from TensorRT 10.11 [TensorRT 10.3]" in capsys.readouterr().out
    assert not (tmp_path / "good.engine").exists()  # a check builds nothing
    with pytest.raises(InputError, match="--trt-version 9.0"):
        export_main([str(good), "--check-tensorrt", "--trt-version", "9.0"])
    with pytest.raises(InputError, match="--trt-version is for --check-tensorrt"):
        export_main([str(good), "--trt-version", "10.3"])
    with pytest.raises(InputError, match="--trt-plugin-version is for --msda trt_plugin"):
        export_main(["--preset", "swin-tiny-coco-panoptic", "--trt-plugin-version", "2"])


def test_cli_checks_the_graph_it_would_build_and_builds_only_with_engine(planted, tmp_path, capsys, monkeypatch):
    """--check-tensorrt checks the final graph (the quantized one with --calib; an --int8 build's too) and builds
    nothing unless --engine is given; engine options without a build are one error, not silently dropped."""
    import m2f_deploy.cli.export as cli

    good = tmp_path / "good.onnx"
    onnx.save(_plugin("2"), str(good))
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "a.png").write_bytes(b"")

    def quantize(fp32, output, images, args):  # stands in for the calibration: its output is the planted graph
        output.write_bytes(planted.read_bytes())

    monkeypatch.setattr(cli, "_quantize", quantize)
    q = tmp_path / "q.onnx"
    assert export_main([str(good), "--int8", "--calib", str(tmp_path / "calib"), "-o", str(q), "--check-tensorrt"]) == 1
    assert "node 'dc' (DeformConv): begin and end pads must be equal" in capsys.readouterr().out
    # a quantized graph with --int8: checked (exit 1 on its refusal), not built
    assert export_main([str(planted), "--int8", "--engine", "--check-tensorrt"]) == 1
    assert f"{planted}: 2 finding(s)" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.engine"))
    for extra in (["--fp16"], ["--int8"], ["-o", str(tmp_path / "g.engine")], ["--shapes", "1x3x64x64", "1x3x64x64",
                  "1x3x64x64"], ["--tf32"], ["--workspace", "1"], ["--no-fp32-layers"],
                  ["--plugin-lib", "libx.so"], ["--timing-cache", "t.cache"]):  # fmt: skip
        with pytest.raises(InputError, match=f"{extra[0]}: engine option\\(s\\) without an engine build "
                                             "\\(--check-tensorrt only checks the graph\\): add --engine"):
            export_main([str(good), "--check-tensorrt", "--trt-version", "11", *extra])
    for extra in (["--tf32"], ["--workspace", "1"], ["--no-fp32-layers"], ["--plugin-lib", "libx.so"],
                  ["--timing-cache", "t.cache"], ["--shapes", "1x3x384x384", "1x3x384x384", "1x3x384x384"]):
        with pytest.raises(InputError, match=f"{extra[0]}: engine option\\(s\\) without an engine build "
                                             "\\(no engine is built\\)"):
            export_main(["--preset", "swin-tiny-coco-panoptic", *extra])  # before the export, which is slow
    with pytest.raises(InputError, match="--fp16: engine option"):  # quantizing only: --fp16 has no engine to go to
        export_main([str(good), "--int8", "--calib", str(tmp_path / "calib"), "--fp16"])


@pytest.mark.parametrize("value", ["0", "3", "-1"])
def test_cli_plugin_version_is_1_or_2(value):
    from m2f_deploy.errors import M2FError

    with pytest.raises(M2FError, match="--trt-plugin-version: invalid choice"):
        export_main(["--preset", "swin-tiny-coco-panoptic", "--msda", "trt_plugin", "--trt-plugin-version", value,
                     "--no-validate"])  # fmt: skip


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_cli_engine_options_are_checked_before_the_export(value, planted, tmp_path):
    """--workspace and --shapes of a checkpoint export are refused before the (slow) export and TensorRT lookup."""
    with pytest.raises(InputError, match=f"--workspace must be a positive number of GiB, got {float(value)}"):
        export_main(["--preset", "swin-tiny-coco-panoptic", "--engine", "--workspace", value])
    with pytest.raises(InputError, match="fixed at 384x384"):
        export_main(["--preset", "swin-tiny-coco-panoptic", "--engine", "--shapes", "1x3x64x64", "1x3x64x64",
                     "1x3x64x64"])  # fmt: skip
    with pytest.raises(InputError, match="batch is fixed at 2"):
        export_main(["--preset", "swin-tiny-coco-panoptic", "--engine", "--static-batch", "--batch", "2",
                     "--shapes", "1x3x384x384", "2x3x384x384", "2x3x384x384"])  # fmt: skip
    from m2f_deploy.export.tensorrt import build_engine

    with pytest.raises(InputError, match="--workspace must be a positive number"):
        build_engine(planted, tmp_path / "m.engine", workspace_gib=float(value))


def test_cli_check_tensorrt_one_line_exit_1(planted):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "m2f_deploy.cli.export", str(planted), "--check-tensorrt", "-q"],
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "begin and end pads must be equal" in run.stdout


def test_missing_onnx_package_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(BackendError, match="needs the onnx package"):
        check_tensorrt_support("model.onnx")
