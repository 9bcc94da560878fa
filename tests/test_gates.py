"""The export validation gate, check by check: a case where only that check fails (and nothing else does).

The exported model's stand-in is a hand-written ONNX graph (one strided Conv for the mask logits, a constant for the
class logits) and a torch module doing the same arithmetic plus a chosen perturbation: each check is isolated by
construction, not by hoping that a random model disagrees in the right way. Fast: no export, no Swin.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from m2f_deploy.artifact import METADATA_KEY, build_metadata
from m2f_deploy.export import validate
from m2f_deploy.export.validate import (
    DEFAULT_TOLERANCES,
    MIN_SEMANTIC_AGREEMENT,
    CaseReport,
    OutputCheck,
    ValidationError,
    ValidationReport,
    validate_onnx,
)

Q, LABELS = 3, 2  # queries; labels (+1 "no object" column)
# query 0 says label 0, query 1 label 1, almost a tie: their masks are the same, so the semantic map is label 1
# wherever a 0.01 shift does not flip it to label 0 (everywhere)
CLASS = np.array([[1.0, 0.0, -3.0], [0.0, 1.005, -3.0], [-2.0, -2.0, 2.0]], np.float32)
rng = np.random.default_rng(0)
CONV_W = rng.standard_normal((Q, 3, 4, 4)).astype(np.float32)
CONV_W[1] = CONV_W[0]
CONV_B = np.array([0.5, 0.5, 0.0], np.float32)


def write_graph(path, *, precision="fp32", dynamic_batch=True, dynamic_hw=True, output_names=None, batch=1,
                class_logits=CLASS, preprocessing=None, conv_weight=CONV_W, conv_bias=CONV_B, id2label=None):
    """An ONNX graph with the artifact's input, outputs and metadata: masks = Conv(x), class = ``class_logits`` per
    image (also the artifact of the runtime's and CLIs' flag tests: fast, and its class scores are known)."""
    names = output_names or ["class_queries_logits", "masks_queries_logits"]
    dims = ["N" if dynamic_batch else batch, 3, "H" if dynamic_hw else 64, "W" if dynamic_hw else 64]
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, dims)
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    queries, columns = np.shape(class_logits)
    inits = [
        numpy_helper.from_array(np.asarray(conv_weight, np.float32), "w"),
        numpy_helper.from_array(np.asarray(conv_bias, np.float32), "b"),
        numpy_helper.from_array(np.zeros((3, queries * columns), np.float32), "zero"),
        numpy_helper.from_array(np.asarray(class_logits, np.float32).reshape(-1), "cls"),
        numpy_helper.from_array(np.array([-1, queries, columns], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["pixel_values", "w", "b"], [names[1]], strides=[4, 4], kernel_shape=[4, 4]),
        helper.make_node("GlobalAveragePool", ["pixel_values"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "zero", "cls"], ["gemm"]),
        helper.make_node("Reshape", ["gemm", "shape"], [names[0]]),
    ]
    graph = helper.make_graph(nodes, "g", [x], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = build_metadata(
        id2label=id2label or {0: "a", 1: "b"}, num_queries=queries, preprocessing=preprocessing or {}, height=64,
        width=64, batch=batch, dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw, msda="gather", precision=precision,
        source={}, exporter={},
    )  # fmt: skip
    import json

    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    onnx.save(model, str(path))
    return path


class Reference(torch.nn.Module):
    """The graph's arithmetic in torch, plus ``class_delta`` / ``mask_delta`` added to its outputs."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, class_delta=0.0, mask_delta=0.0, queries=Q):
        super().__init__()
        self.class_delta, self.mask_delta, self.queries, self.inputs = class_delta, mask_delta, queries, []

    def forward(self, x):
        self.inputs.append(x.clone())
        x = x.float()
        masks = torch.nn.functional.conv2d(x, torch.from_numpy(CONV_W), torch.from_numpy(CONV_B), stride=4)
        cls = torch.from_numpy(CLASS).expand(x.shape[0], Q, LABELS + 1).clone()
        cls, masks = cls + self.class_delta, masks + self.mask_delta
        q = self.queries
        return SimpleNamespace(class_queries_logits=cls[:, :q], masks_queries_logits=masks[:, :q])


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    return write_graph(tmp_path_factory.mktemp("gate") / "m.onnx")


def _checks(case: CaseReport) -> dict[str, OutputCheck]:
    return {o.name: o for o in case.outputs}


def test_the_gates_defaults():
    assert MIN_SEMANTIC_AGREEMENT == 0.99
    assert DEFAULT_TOLERANCES["fp32"] == {"class_queries_logits": 2e-2, "masks_queries_logits": 5e-2}
    assert DEFAULT_TOLERANCES["fp16"] == {"class_queries_logits": 0.25, "masks_queries_logits": 1.0}
    assert DEFAULT_TOLERANCES["int8"] == {"class_queries_logits": float("inf"), "masks_queries_logits": float("inf")}


def test_a_faithful_graph_passes_at_both_shapes(graph):
    report = validate_onnx(Reference(), graph)
    assert report.ok, report.format()
    # dynamic batch and size: the export shape, then one more image and another size
    assert [c.shape for c in report.cases] == [(1, 3, 64, 64), (2, 3, 96, 32)]
    for case in report.cases:
        assert case.problem is None and case.semantic_agreement == 1.0
        checks = _checks(case)
        assert set(checks) == {"class_queries_logits", "masks_queries_logits"}
        assert checks["class_queries_logits"].max_abs == 0.0
        assert checks["masks_queries_logits"].max_abs < 1e-5
        assert checks["masks_queries_logits"].tolerance == 5e-2 and checks["class_queries_logits"].tolerance == 2e-2
        matched, total = case.panoptic_matched
        assert matched == total > 0
    report.raise_if_failed(graph)  # no error


def test_logits_beyond_tolerance_fail_while_the_segmentation_agrees(graph):
    # every logit of a query shifted alike: softmax, hence every segmentation, does not change
    delta = torch.zeros(Q, LABELS + 1)
    delta[2] = 0.03
    report = validate_onnx(Reference(class_delta=delta), graph)
    assert not report.ok
    for case in report.cases:
        checks = _checks(case)
        assert checks["class_queries_logits"].max_abs == pytest.approx(0.03, abs=1e-6)
        assert not checks["class_queries_logits"].ok and checks["masks_queries_logits"].ok
        assert case.semantic_agreement == 1.0 and case.panoptic_matched[0] == case.panoptic_matched[1]
        assert not case.ok
    with pytest.raises(ValidationError) as e:
        report.raise_if_failed("m.onnx")
    assert str(e.value).startswith("m.onnx: the exported graph does not match the PyTorch model (nothing was "
                                   "written; --no-validate skips this gate):\n| input |")  # fmt: skip
    assert "| 1x3x64x64 | class_queries_logits | 0.03 |" in str(e.value) and "FAIL" in str(e.value)
    # the same shift, allowed by a per-output tolerance, passes; a tolerance for the other output does not help
    assert validate_onnx(Reference(class_delta=delta), graph, tolerances={"class_queries_logits": 0.031}).ok
    assert not validate_onnx(Reference(class_delta=delta), graph, tolerances={"masks_queries_logits": 1.0}).ok


def test_mask_logits_beyond_tolerance_fail_while_the_segmentation_agrees(graph):
    delta = torch.zeros(1, Q, 1, 1)
    delta[0, 2] = 0.06  # query 2 is "no object": its mask changes nothing that is shown
    report = validate_onnx(Reference(mask_delta=delta), graph)
    assert not report.ok
    for case in report.cases:
        checks = _checks(case)
        assert checks["masks_queries_logits"].max_abs == pytest.approx(0.06, abs=1e-4)
        assert 0 < checks["masks_queries_logits"].mean_abs < 0.06
        assert checks["class_queries_logits"].ok and not checks["masks_queries_logits"].ok
        assert case.semantic_agreement >= MIN_SEMANTIC_AGREEMENT
    assert validate_onnx(Reference(mask_delta=delta), graph, tolerances={"masks_queries_logits": 0.07}).ok


def test_a_flipped_segmentation_fails_while_the_logits_are_within_tolerance(graph):
    delta = torch.zeros(Q, LABELS + 1)
    delta[1, 1] = -0.01  # label 1's near-tie lead over label 0 becomes a loss, at every pixel
    report = validate_onnx(Reference(class_delta=delta), graph)
    assert not report.ok
    for case in report.cases:
        assert all(o.ok for o in case.outputs), report.format()
        assert case.semantic_agreement < 0.01
        assert not case.ok
    assert f"| {report.cases[1].semantic_agreement:.2%} | 0/" in report.format()


def test_agreement_at_the_threshold_passes(monkeypatch):
    case = CaseReport((1, 3, 32, 32), [OutputCheck("x", 1.0, 0.5, 1.0)], semantic_agreement=MIN_SEMANTIC_AGREEMENT)
    assert case.ok  # max abs == tolerance and agreement == minimum: both inclusive
    assert not CaseReport((1, 3, 32, 32), [OutputCheck("x", 1.0001, 0.5, 1.0)], semantic_agreement=1.0).ok
    assert not CaseReport((1, 3, 32, 32), [], semantic_agreement=0.9899).ok
    assert not CaseReport((1, 3, 32, 32), [], semantic_agreement=1.0, problem="names").ok
    assert not CaseReport((1, 3, 32, 32)).ok  # no numbers: not a pass
    assert ValidationReport([]).ok and not ValidationReport([case, CaseReport((1, 3, 32, 32))]).ok


def test_wrong_output_names_and_shapes_are_problems(tmp_path):
    renamed = write_graph(tmp_path / "r.onnx", output_names=["class_logits", "masks_queries_logits"])
    report = validate_onnx(Reference(), renamed)
    assert not report.ok
    assert report.cases[0].problem == ("outputs are ['class_logits', 'masks_queries_logits'], expected "
                                       "['class_queries_logits', 'masks_queries_logits']")  # fmt: skip
    assert [c.shape for c in report.cases] == [(1, 3, 64, 64), (2, 3, 96, 32)]  # a problem does not end the check
    assert all(c.problem and c.problem.startswith("outputs are") for c in report.cases)
    assert "| 1x3x64x64 | outputs are" in report.format() and report.format().endswith("| FAIL |")
    graph = write_graph(tmp_path / "m.onnx")
    report = validate_onnx(Reference(queries=2), graph)
    assert [c.problem for c in report.cases] == [
        "shape mismatch: class_queries_logits (1, 3, 3) != (1, 2, 3); masks_queries_logits (1, 3, 16, 16) != "
        "(1, 2, 16, 16)",
        "shape mismatch: class_queries_logits (2, 3, 3) != (2, 2, 3); masks_queries_logits (2, 3, 24, 8) != "
        "(2, 2, 24, 8)",
    ]
    assert not report.ok


@pytest.mark.parametrize(
    "dynamic_batch,dynamic_hw,batch,shapes",
    [
        (False, False, 1, [(1, 3, 64, 64)]),
        (True, False, 2, [(2, 3, 64, 64), (3, 3, 64, 64)]),
        (False, True, 1, [(1, 3, 64, 64), (1, 3, 96, 32)]),
    ],
)
def test_cases_follow_the_dynamic_axes(tmp_path, dynamic_batch, dynamic_hw, batch, shapes):
    path = write_graph(tmp_path / "m.onnx", dynamic_batch=dynamic_batch, dynamic_hw=dynamic_hw, batch=batch)
    model = Reference()
    report = validate_onnx(model, path)
    assert report.ok and [c.shape for c in report.cases] == shapes
    assert [tuple(x.shape) for x in model.inputs] == shapes


def test_the_other_size_stays_a_positive_multiple():
    meta = {"input": {"batch": 1, "height": 32, "width": 32, "dynamic_batch": False, "dynamic_hw": True}}
    assert validate._cases(meta) == [(1, 3, 32, 32), (1, 3, 64, 32)]  # hw_multiple defaults to 32
    meta["input"]["hw_multiple"] = 16
    assert validate._cases(meta) == [(1, 3, 32, 32), (1, 3, 48, 16)]


def test_the_seed_chooses_the_inputs(graph):
    model = Reference()
    validate_onnx(model, graph, seed=5)
    generator = torch.Generator().manual_seed(5)
    expected = [torch.randn(1, 3, 64, 64, generator=generator), torch.randn(2, 3, 96, 32, generator=generator)]
    for got, want in zip(model.inputs, expected, strict=True):
        assert torch.equal(got, want)
    default = Reference()
    validate_onnx(default, graph)
    assert torch.equal(default.inputs[0], torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))


def test_the_tolerances_follow_the_precision(tmp_path):
    path = write_graph(tmp_path / "m16.onnx", precision="fp16")
    delta = torch.zeros(Q, LABELS + 1)
    delta[2] = 0.2  # beyond fp32's 2e-2, within fp16's 0.25
    report = validate_onnx(Reference(class_delta=delta), path)
    assert report.ok, report.format()
    assert _checks(report.cases[0])["class_queries_logits"].tolerance == 0.25


def test_report_format():
    ok = CaseReport((2, 3, 64, 96), [OutputCheck("class_queries_logits", 0.001, 0.0001, 0.02)], 0.995, (3, 4))
    bad = CaseReport((1, 3, 32, 32), [OutputCheck("masks_queries_logits", 0.5, 0.01, 0.05)], 1.0, (2, 2))
    report = ValidationReport([CaseReport((1, 3, 32, 32), problem="shape mismatch: x"), ok, bad])
    assert report.format() == "\n".join([
        "| input | output | max abs err | mean abs err | tolerance | semantic agreement | panoptic matched | ok |",
        "|---|---|---|---|---|---|---|---|",
        "| 1x3x32x32 | shape mismatch: x | | | | | | FAIL |",
        "| 2x3x64x96 | class_queries_logits | 0.001 | 0.0001 | 0.02 | 99.50% | 3/4 | ok |",
        "| 1x3x32x32 | masks_queries_logits | 0.5 | 0.01 | 0.05 | 100.00% | 2/2 | FAIL |",
    ])  # fmt: skip


def test_the_gate_runs_with_the_runtime_session_options(tmp_path):
    """Denormals flushed (speed), and for fp16 graphs the layout optimizer that gave wrong logits turned off."""
    fp16 = validate.session(write_graph(tmp_path / "h.onnx", precision="fp16"), "gather").get_session_options()
    fp32 = validate.session(write_graph(tmp_path / "f.onnx"), "gather").get_session_options()
    for options in (fp16, fp32):
        assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"
        assert options.log_severity_level == 3
    assert fp16.get_session_config_entry("optimization.disable_specified_optimizers") == "NchwcTransformer"
    with pytest.raises(RuntimeError, match="does not have configuration"):
        fp32.get_session_config_entry("optimization.disable_specified_optimizers")


# -- the agreement measures the gates use ----------------------------------------------------------------------------
def test_agreement_errors_name_the_measure():
    from m2f_deploy.errors import InputError
    from m2f_deploy.export.agreement import matched_segments, semantic_agreement

    one = [np.zeros((2, 2))]
    per_image = "results against {} others; give one per image"
    for call, message in (
        (lambda: semantic_agreement(one, one * 2), "semantic agreement: 1 reference " + per_image.format(2)),
        (lambda: semantic_agreement([], []), "semantic agreement: no images"),
        (lambda: semantic_agreement(one, [np.zeros((2, 3))]), "semantic agreement: maps of shapes (2, 2) and (2, 3)"),
        (lambda: matched_segments([], [{}]), "matched segments: 0 reference " + per_image.format(1)),
    ):
        with pytest.raises(InputError) as e:
            call()
        assert str(e.value) == message


def test_a_segment_of_another_label_listed_first_does_not_stop_the_search():
    from m2f_deploy.export.agreement import matched_segments

    seg = np.array([[1, 1], [2, 2]])
    reference = [{"segmentation": seg, "segments_info": [{"id": 1, "label_id": 5}]}]
    other = [{"segmentation": seg, "segments_info": [{"id": 2, "label_id": 6}, {"id": 1, "label_id": 5}]}]
    assert matched_segments(reference, other) == (1, 1)


def test_the_reference_runs_in_its_own_dtype(graph):
    """The model is fed in its dtype (an fp16 or fp64 model is not fed float32 noise)."""
    model = Reference()
    model.dtype = torch.float64
    assert validate_onnx(model, graph).ok
    assert {x.dtype for x in model.inputs} == {torch.float64}


# -- the fused-head gate's comparison (fast: synthetic results, no graphs; the real gate runs in test_heads.py) --------


def test_head_compare_semantic_plain_and_with_float_ties():
    from m2f_deploy.export.validate import MIN_HEAD_SEMANTIC_AGREEMENT, SEMANTIC_TIE, compare_head

    reference = [np.array([[0, 1], [1, 1]]), np.array([[2, 2], [2, 2]])]
    fused = [np.array([[0, 1], [0, 1]]), np.array([[2, 2], [2, 2]])]
    case = compare_head("semantic", reference, fused, (2, 3, 2, 2))
    assert case.shape == (2, 3, 2, 2) and case.task == "semantic"
    assert case.semantic_agreement == case.semantic_agreement_ties == 7 / 8 and not case.ok
    # with the class scores: a pixel whose fused class scores within SEMANTIC_TIE (relative) of the best agrees
    scores = np.zeros((3, 1, 2), np.float32)
    scores[:, 0, 0] = [0.2, 0.5, 0.3]  # best 1; 2 is far below
    scores[:, 0, 1] = [0.4, 0.4 * (1 - SEMANTIC_TIE / 2), 0.1]  # 0 best, 1 a float tie
    ref = [{"segmentation": np.array([[1, 0]]), "segmentation_scores": scores}]
    tie = compare_head("semantic", ref, [np.array([[1, 1]])])
    assert tie.semantic_agreement == 0.5 and tie.semantic_agreement_ties == 1.0 and tie.ok
    far = compare_head("semantic", ref, [np.array([[2, 0]])])
    assert far.semantic_agreement == 0.5 and far.semantic_agreement_ties == 0.5 and not far.ok
    # the tie is relative to the best score where that exceeds 1, absolute (1e-5) below it
    big = np.zeros((2, 1, 2), np.float32)
    big[:, 0, 0] = [1000.0, 1000.0 - 0.004]  # within 1e-5 of 1000: a tie
    big[:, 0, 1] = [0.5, 0.5 - 1.5 * SEMANTIC_TIE]  # beyond 1e-5 absolute: not a tie
    ties = compare_head("semantic", [{"segmentation": np.array([[0, 0]]), "segmentation_scores": big}],
                        [np.array([[1, 1]])])  # fmt: skip
    assert ties.semantic_agreement == 0.0 and ties.semantic_agreement_ties == 0.5
    with pytest.raises(ValueError):
        compare_head("semantic", ref * 2, [np.array([[1, 1]])])
    just = compare_head("semantic", [np.zeros((1, 1000), int)], [np.r_[np.ones(1), np.zeros(999)].astype(int)[None]])
    assert just.semantic_agreement == MIN_HEAD_SEMANTIC_AGREEMENT and just.ok  # the bound itself passes
    with pytest.raises(ValueError):
        compare_head("semantic", reference, fused[:1])


def _segments(ids, infos):
    return {"segmentation": np.array(ids), "segments_info": [{"id": i, "label_id": l, "score": s} for i, l, s in infos]}


def test_head_compare_segments_by_label_and_nearest_score():
    from m2f_deploy.export.validate import HEAD_SCORE_TOLERANCE, compare_head

    ref = _segments([[1, 1], [2, 0]], [(1, 5, 0.9), (2, 7, 0.8)])
    # the same segments under other ids, scores within the tolerance: all matched, every pixel's label equal
    same = _segments([[4, 4], [3, 0]], [(3, 7, 0.8 + HEAD_SCORE_TOLERANCE / 2), (4, 5, 0.9)])
    case = compare_head("panoptic", [ref], [same])
    assert (case.matched, case.segments, case.semantic_agreement) == ((2, 2), (2, 2), 1.0) and case.ok
    assert case.max_score_error == pytest.approx(HEAD_SCORE_TOLERANCE / 2)
    # a score off by more than the tolerance: counted, not matched, its error reported
    off = _segments([[4, 4], [3, 0]], [(3, 7, 0.8 + 3 * HEAD_SCORE_TOLERANCE), (4, 5, 0.9)])
    case = compare_head("panoptic", [ref], [off])
    assert case.matched == (1, 2) and not case.ok and case.max_score_error == pytest.approx(3 * HEAD_SCORE_TOLERANCE)
    # the nearest of two same-label candidates is taken, and a fused segment pairs once only
    two = _segments([[1, 1], [2, 0]], [(1, 5, 0.5), (2, 5, 0.9)])
    case = compare_head("instance", [_segments([[1, 1], [1, 0]], [(1, 5, 0.9), (2, 5, 0.9)])], [two])
    assert case.matched == (1, 2) and case.segments == (2, 2)
    # another label: unmatched; a missing segment: counts differ; pixels compared as labels
    case = compare_head("panoptic", [ref], [_segments([[1, 1], [0, 0]], [(1, 6, 0.9)])])
    assert case.matched == (0, 2) and case.segments == (2, 1) and case.semantic_agreement == 0.25 and not case.ok
    # a score exactly at the tolerance still pairs
    at = compare_head("panoptic", [_segments([[1]], [(1, 5, 0.0)])], [_segments([[1]], [(1, 5, HEAD_SCORE_TOLERANCE)])])
    assert at.matched == (1, 1)
    with pytest.raises(ValueError):
        compare_head("panoptic", [ref, ref], [same])
    # no images at all: nothing disagrees
    empty = compare_head("panoptic", [], [])
    assert empty.semantic_agreement == empty.semantic_agreement_ties == 1.0 and empty.ok


def test_head_case_ok_needs_every_count_equal():
    from m2f_deploy.export.validate import HeadCase

    good = dict(task="panoptic", semantic_agreement=1.0, matched=(2, 2), segments=(2, 2))
    assert HeadCase((1,), **good).ok
    assert not HeadCase((1,), **{**good, "matched": (1, 2)}).ok
    assert not HeadCase((1,), **{**good, "segments": (2, 3)}).ok
    assert not HeadCase((1,), **{**good, "semantic_agreement": 0.99}).ok
    assert HeadCase((1,), "semantic", semantic_agreement=0.0, semantic_agreement_ties=0.999).ok
    assert not HeadCase((1,), "semantic", semantic_agreement=1.0, semantic_agreement_ties=0.998).ok


def test_head_report_format_and_raise():
    from m2f_deploy.export.validate import HeadCase, HeadReport, ValidationError

    good = HeadCase((1, 3, 64, 64), "panoptic", 0.9995, 0.9995, (3, 3), (3, 3), 2.5e-4)
    bad = HeadCase((2, 3, 32, 48), "instance", 0.5, 0.75, (1, 2), (2, 3))
    assert HeadReport([good]).ok and not HeadReport([good, bad]).ok and HeadReport([]).ok
    HeadReport([good]).raise_if_failed("x.onnx")  # nothing raised
    lines = HeadReport([good, bad]).format().splitlines()
    assert lines[0].startswith("| input | head | pixel agreement (with float ties) |") and lines[1].startswith("|---|")
    assert lines[2] == "| 1x3x64x64 | panoptic | 99.950% (99.950%) | 3/3 | 3 / 3 | 0.00025 | ok |"
    assert lines[3] == "| 2x3x32x48 | instance | 50.000% (75.000%) | 1/2 | 2 / 3 | 0 | FAIL |"
    with pytest.raises(ValidationError) as e:
        HeadReport([good, bad]).raise_if_failed("x.onnx")
    message = str(e.value)
    assert message.startswith("x.onnx: the fused head does not match the numpy post-processing of the logits graph "
                              "(nothing was written; --no-validate skips this gate):\n| input |")  # fmt: skip
    assert message.endswith(lines[3])


def test_head_label_map_and_the_reference_post_processing():
    from m2f_deploy.export.validate import _label_map, head_results

    labels = _label_map(_segments([[1, 2], [9, 0]], [(1, 4, 0.5), (2, 6, 0.5)]))
    assert labels.dtype == np.int64 and labels.tolist() == [[4, 6], [-1, -1]]  # 9: no such segment
    calls = []

    class Processor:
        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append((name, args, kwargs)) or ["r"]

    out = {"class_queries_logits": 1}
    for task, options in (("semantic", {}), ("instance", {}), ("instance", {"threshold": 0.3}), ("panoptic", {}),
                          ("panoptic", {"threshold": 0.1, "mask_threshold": 0.2, "overlap_mask_area_threshold": 0.3,
                                        "label_ids_to_fuse": {1}})):  # fmt: skip
        assert head_results({"fused_heads": [task]}, Processor(), out, (5, 7), 2, **options) == ["r"]
    sizes = [(5, 7), (5, 7)]
    assert calls == [
        ("post_process_semantic_segmentation", (out,), {"target_sizes": sizes, "return_segmentation_scores": True}),
        ("post_process_instance_segmentation", (out,), {"threshold": 0.5, "target_sizes": sizes}),
        ("post_process_instance_segmentation", (out,), {"threshold": 0.3, "target_sizes": sizes}),
        ("post_process_panoptic_segmentation", (out, 0.5, 0.5, 0.8, None), {"target_sizes": sizes}),
        ("post_process_panoptic_segmentation", (out, 0.1, 0.2, 0.3, {1}), {"target_sizes": sizes}),
    ]
