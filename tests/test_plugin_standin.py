"""The CPU stand-in for MultiscaleDeformableAttnPlugin_TRT: numpy math against the torch
reference, and hand-built ONNX graphs with plugin nodes run through onnxruntime."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from m2f_deploy.errors import InputError, M2FError
from m2f_deploy.modeling.ms_deform_attn import msda_grid_sample
from m2f_deploy.runtime.plugin_standin import (
    PLUGIN_OP_TYPE,
    count_plugin_nodes,
    msda_numpy,
    standin_session,
)

TOL = 1e-5
LEVEL_SETS = {
    "non-square": [(4, 6), (3, 3), (1, 5)],
    "square": [(12, 12), (6, 6)],
    "one-level": [(7, 2)],
}


def _inputs(shapes, n=2, lq=9, m=3, d=5, p=4, dtype=np.float32, seed=0):
    """Plugin inputs with locations spread over [-0.3, 1.3], some on borders, centres and far out."""
    rng = np.random.default_rng(seed)
    s, levels = sum(h * w for h, w in shapes), len(shapes)
    # multiples of 1/64: value + 0.25 is exact in float16, whatever precision onnxruntime's CPU Add uses
    value = (np.round(rng.standard_normal((n, s, m, d)) * 64) / 64).astype(dtype)
    locations = rng.uniform(-0.3, 1.3, (n, lq, m, levels, p, 2))
    locations[:, 0, :, :, 0] = 0.0  # borders
    locations[:, 0, :, :, 1] = 1.0
    locations[:, 1, :, :, 0] = (-5.0, 7.0)  # far outside
    for level, (h, w) in enumerate(shapes):  # pixel centres, exactly on the sampling grid
        locations[:, 1, :, level, 1] = (0.5 / w, (h - 0.5) / h)
    weights = rng.random((n, lq, m, levels, p))
    weights /= weights.sum((-1, -2), keepdims=True)
    spatial_shapes = np.array(shapes, np.int32)
    level_start_index = np.cumsum([0] + [h * w for h, w in shapes[:-1]]).astype(np.int32)
    return value, spatial_shapes, level_start_index, locations.astype(dtype), weights.astype(dtype)


def _reference(value, spatial_shapes, level_start_index, locations, weights):
    """msda_grid_sample in float32, as [N, Lq, M, D]."""
    n, _, m, d = value.shape
    out = msda_grid_sample(
        torch.from_numpy(value.astype(np.float32)),
        [tuple(hw) for hw in spatial_shapes.tolist()],
        torch.from_numpy(locations.astype(np.float32)),
        torch.from_numpy(weights.astype(np.float32)),
    )
    return out.numpy().reshape(n, locations.shape[1], m, d)


@pytest.mark.parametrize("levels", LEVEL_SETS.values(), ids=LEVEL_SETS.keys())
def test_numpy_matches_torch_float32(levels):
    inputs = _inputs(levels)
    out, ref = msda_numpy(*inputs), _reference(*inputs)
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.abs(out - ref).max() <= TOL
    assert np.abs(ref).max() > 0.1  # not degenerate


@pytest.mark.parametrize("levels", LEVEL_SETS.values(), ids=LEVEL_SETS.keys())
def test_numpy_float16_is_float32_math_rounded_once(levels):
    inputs = _inputs(levels, dtype=np.float16)
    out = msda_numpy(*inputs)
    assert out.dtype == np.float16
    ref = _reference(*inputs).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(out.astype(np.float32), ref, rtol=1e-3, atol=1e-3)


def test_numpy_samples_pixel_centres_and_borders():
    """Independent of torch: a pixel centre returns the pixel; a border point half of it."""
    h, w = 3, 4
    value = np.arange(h * w, dtype=np.float32).reshape(1, h * w, 1, 1) + 1
    locations = np.array([[(2.5 / w, 1.5 / h)], [(0.0, 0.5 / h)], [(1.0, 1.0)]], np.float32).reshape(1, 3, 1, 1, 1, 2)
    weights = np.ones((1, 3, 1, 1, 1), np.float32)
    out = msda_numpy(value, np.array([[h, w]], np.int32), np.array([0], np.int32), locations, weights)
    # pixel (row 1, col 2); half of pixel (0, 0); a quarter of the last pixel
    np.testing.assert_allclose(out.ravel(), [value[0, 1 * w + 2, 0, 0], value[0, 0, 0, 0] / 2, value[0, -1, 0, 0] / 4])


def test_numpy_rejects_levels_that_do_not_fit_value():
    value, spatial_shapes, level_start_index, locations, weights = _inputs(LEVEL_SETS["square"])
    with pytest.raises(InputError, match="does not fit"):
        msda_numpy(value[:, :-1], spatial_shapes, level_start_index, locations, weights)


# ---------------------------------------------------------------- ONNX graphs


def _plugin_node(inputs, output, name):
    return helper.make_node(
        PLUGIN_OP_TYPE, inputs, [output], name=name, domain="trt.plugins", plugin_version="1", plugin_namespace=""
    )


def _plugin_model(shapes, n, lq, m, d, p, elem_type=TensorProto.FLOAT, chained=False):
    """value_in + bias -> plugin -> Reshape [N, Lq, M*D]; with ``chained`` a second plugin takes
    the first one's output as its value (needs Lq == S)."""
    s, levels = sum(h * w for h, w in shapes), len(shapes)
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    initializers = [
        numpy_helper.from_array(np.full((1, 1, m, d), 0.25, np_type), "bias"),
        numpy_helper.from_array(np.array(shapes, np.int32), "spatial_shapes"),
        numpy_helper.from_array(np.cumsum([0] + [h * w for h, w in shapes[:-1]]).astype(np.int32), "level_start_index"),
        numpy_helper.from_array(np.array([n, lq, m * d], np.int64), "out_shape"),
    ]
    tables = ["spatial_shapes", "level_start_index"]
    nodes = [
        helper.make_node("Add", ["value_in", "bias"], ["value"], name="add"),
        _plugin_node(["value", *tables, "locations", "weights"], "attn", "msda_0"),
    ]
    if chained:
        nodes.append(_plugin_node(["attn", *tables, "locations", "weights"], "attn_1", "msda_1"))
    nodes.append(helper.make_node("Reshape", [nodes[-1].output[0], "out_shape"], ["out"], name="reshape"))
    graph = helper.make_graph(
        nodes,
        "msda",
        [
            helper.make_tensor_value_info("value_in", elem_type, [n, s, m, d]),
            helper.make_tensor_value_info("locations", elem_type, [n, lq, m, levels, p, 2]),
            helper.make_tensor_value_info("weights", elem_type, [n, lq, m, levels, p]),
        ],
        [helper.make_tensor_value_info("out", elem_type, [n, lq, m * d])],
        initializers,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("trt.plugins", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _feed(inputs):
    value, _, _, locations, weights = inputs
    return {"value_in": value, "locations": locations, "weights": weights}


def _expected(inputs, chained=False):
    value, spatial_shapes, level_start_index, locations, weights = inputs
    value = value + np.asarray(0.25, value.dtype)
    out = msda_numpy(value, spatial_shapes, level_start_index, locations, weights)
    if chained:
        out = msda_numpy(out, spatial_shapes, level_start_index, locations, weights)
    return out.reshape(out.shape[0], out.shape[1], -1)


def test_count_plugin_nodes(tmp_path):
    model = _plugin_model([(3, 4)], n=1, lq=12, m=2, d=3, p=2, chained=True)
    assert count_plugin_nodes(model) == 2
    onnx.save(model, tmp_path / "m.onnx")
    assert count_plugin_nodes(tmp_path / "m.onnx") == 2


def test_session_one_plugin_node_matches_torch():
    pytest.importorskip("onnxruntime_extensions")
    shapes, (n, lq, m, d, p) = LEVEL_SETS["non-square"], (2, 9, 3, 5, 4)
    model = _plugin_model(shapes, n, lq, m, d, p)
    before = model.SerializeToString()
    inputs = _inputs(shapes, n, lq, m, d, p)
    (out,) = standin_session(model).run(None, _feed(inputs))
    assert model.SerializeToString() == before  # the caller's model is untouched
    value, *rest = inputs
    ref = _reference(value + np.float32(0.25), *rest).reshape(n, lq, m * d)
    assert out.dtype == np.float32 and out.shape == (n, lq, m * d)
    assert np.abs(out - ref).max() <= TOL
    np.testing.assert_array_equal(out, _expected(inputs))


@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16], ids=["float32", "float16"])
def test_session_two_chained_plugin_nodes(elem_type, tmp_path):
    pytest.importorskip("onnxruntime_extensions")
    shapes = [(3, 4), (2, 2)]
    n, lq, m, d, p = 1, 16, 2, 4, 3  # Lq == S: the second node's value is the first's output
    model = _plugin_model(shapes, n, lq, m, d, p, elem_type, chained=True)
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    saved = (tmp_path / "m.onnx").read_bytes()
    inputs = _inputs(shapes, n, lq, m, d, p, dtype=helper.tensor_dtype_to_np_dtype(elem_type))
    (out,) = standin_session(tmp_path / "m.onnx").run(None, _feed(inputs))
    assert (tmp_path / "m.onnx").read_bytes() == saved
    # float16: casts around a float32 kernel are exactly msda_numpy's float32 math rounded once
    assert out.dtype == inputs[0].dtype
    np.testing.assert_array_equal(out, _expected(inputs, chained=True))


def _nest(model, where):
    """``model`` with its plugin node moved into both branches of an If, or into a local function."""
    nested = onnx.ModelProto()
    nested.CopyFrom(model)
    plugin = nested.graph.node[1]
    if where == "if":
        branches = {
            key: helper.make_graph([plugin], key, [], [helper.make_tensor_value_info("attn", TensorProto.FLOAT, None)])
            for key in ("then_branch", "else_branch")
        }
        wrapper = helper.make_node("If", ["cond"], ["attn"], **branches)
        nested.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    else:
        opsets = list(nested.opset_import)
        function = helper.make_function("local", "Msda", list(plugin.input), ["attn"], [plugin], opsets)
        wrapper = helper.make_node("Msda", list(plugin.input), ["attn"], domain="local")
        nested.functions.append(function)
        nested.opset_import.append(helper.make_opsetid("local", 1))
    nested.graph.node[1].CopyFrom(wrapper)
    return nested


@pytest.mark.parametrize("where, count", [("if", 2), ("function", 1)])
def test_session_plugin_nodes_in_subgraphs_and_functions(where, count):
    pytest.importorskip("onnxruntime_extensions")
    shapes, (n, lq, m, d, p) = [(3, 4)], (1, 5, 2, 3, 2)
    model = _nest(_plugin_model(shapes, n, lq, m, d, p), where)
    assert count_plugin_nodes(model) == count
    inputs = _inputs(shapes, n, lq, m, d, p)
    (out,) = standin_session(model).run(None, _feed(inputs))
    np.testing.assert_array_equal(out, _expected(inputs))


def test_session_reuses_sess_options():
    pytest.importorskip("onnxruntime_extensions")
    model, options = _plugin_model([(2, 3)], n=1, lq=4, m=1, d=2, p=2), onnxruntime.SessionOptions()
    inputs = _inputs([(2, 3)], n=1, lq=4, m=1, d=2, p=2)
    for _ in range(2):
        (out,) = standin_session(model, sess_options=options).run(None, _feed(inputs))
        np.testing.assert_array_equal(out, _expected(inputs))


def test_session_raises_kernel_failure_instead_of_aborting():
    """A Python exception inside an onnxruntime-extensions op would abort the process."""
    pytest.importorskip("onnxruntime_extensions")
    shapes = [(3, 4)]
    model = _plugin_model(shapes, n=1, lq=5, m=2, d=3, p=2)
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.array([[4, 4]], np.int32), "spatial_shapes"))
    session = standin_session(model)
    with pytest.raises(InputError, match="node 'msda_0': level 4x4 starting at 0 does not fit"):
        session.run(None, _feed(_inputs(shapes, n=1, lq=5, m=2, d=3, p=2)))


def test_session_needs_opset_15_for_castlike():
    pytest.importorskip("onnxruntime_extensions")
    model = _plugin_model([(2, 3)], n=1, lq=4, m=1, d=2, p=1)
    model.opset_import[0].version = 14
    with pytest.raises(InputError, match="opset >= 15"):
        standin_session(model)


def test_missing_onnxruntime_extensions_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)  # import fails
    monkeypatch.delitem(sys.modules, "m2f_deploy.runtime.plugin_standin")
    module = importlib.import_module("m2f_deploy.runtime.plugin_standin")  # importing still works
    with pytest.raises(M2FError, match="pip install onnxruntime-extensions"):
        module.standin_session(_plugin_model([(2, 3)], n=1, lq=4, m=1, d=2, p=1))
