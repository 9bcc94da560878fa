"""Fused heads (m2f-export --heads): the graph's results equal our numpy post-processing of the logits graph's, for
each head, fp32 and fp16, on the tiny model made decisive and on the shipped demo checkpoint; the runtime returns the
same structures from a fused graph as from a logits graph; the gate fails on a wrong head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from factory import decisive_model
from PIL import Image

from m2f_deploy.artifact import INPUT_NAME, read_onnx_metadata
from m2f_deploy.demo import demo_image
from m2f_deploy.errors import InputError
from m2f_deploy.export import export_onnx
from m2f_deploy.export import heads as export_heads
from m2f_deploy.export.heads import PanopticHead, check_head_args, fuse_onnx, head_metadata
from m2f_deploy.export import uint8_input
from m2f_deploy.export.trt_support import check_tensorrt_support
from m2f_deploy.export.uint8_input import uint8_onnx
from m2f_deploy.export.validate import ValidationError, compare_head, head_results, validate_head
from m2f_deploy.processing import ImageProcessor
from m2f_deploy.runtime import Segmenter
from m2f_deploy.runtime.heads import decode, head_inputs, hf_segment_ids
from m2f_deploy.testing.logits import synthetic_outputs

SIZE = (64, 96)
TASKS = ("semantic", "instance", "panoptic")
# thresholds low enough that the decisive tiny model finds segments on noise inputs; fusion of two labels
OPTIONS = {"semantic": {}, "instance": {"threshold": 0.1},
           "panoptic": {"threshold": 0.3, "mask_threshold": 0.3, "overlap_mask_area_threshold": 0.5,
                        "label_ids_to_fuse": {2, 3}}}  # fmt: skip
DEMO = Path(__file__).resolve().parents[1] / "checkpoints" / "shapes-demo"
SAMPLES = Path(__file__).resolve().parents[1] / "checkpoints" / "samples"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The logits graphs of the decisive tiny model, fp32 and fp16, and their fused graphs (the gate runs in
    test_gate_fails_on_a_wrong_head; here the tests compare)."""
    folder = tmp_path_factory.mktemp("heads")
    model = decisive_model()
    out = {}
    for precision in ("fp32", "fp16"):
        raw = export_onnx(model, folder / f"raw-{precision}.onnx", height=SIZE[0], width=SIZE[1],
                          fp16=precision == "fp16", validate=False)  # fmt: skip
        out[precision, "raw"] = raw
        for task in TASKS:
            out[precision, task] = fuse_onnx(raw, folder / f"{task}-{precision}.onnx", task, validate=False)
    return out


def _run(path, x, **options):
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = read_onnx_metadata(path)
    feeds = {INPUT_NAME: x}
    if meta["fused_heads"]:
        feeds.update(head_inputs(meta, len(x), **options))
    return meta, dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def _fused_against_numpy(raw, fused, x, task):
    options = dict(OPTIONS[task])
    _, logits = _run(raw, x)
    meta, outputs = _run(fused, x, **options)
    size = tuple(meta["heads"]["output_size"])
    reference = head_results(meta, ImageProcessor(), logits, size, len(x), **options)
    got = decode(meta, outputs, label_ids_to_fuse=options.get("label_ids_to_fuse"))
    return compare_head(task, reference, got, x.shape)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("task", TASKS)
def test_tiny_fused_equals_numpy(tiny, task, precision):
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(3)).numpy()
    case = _fused_against_numpy(tiny[precision, "raw"], tiny[precision, task], x, task)
    assert case.ok, case
    if task == "semantic":
        assert case.semantic_agreement >= 0.999
    else:  # segments were found, all matched with the same labels and scores within 1e-3
        assert case.segments[0] >= 2 and case.matched == (case.segments[0], case.segments[0])
        assert case.max_score_error <= 1e-3


def test_fused_graphs_pass_the_static_tensorrt_check(tiny):
    for task in TASKS:
        report = check_tensorrt_support(tiny["fp32", task])
        assert report.ok, report.format()


def test_metadata_records_the_head(tiny):
    meta = read_onnx_metadata(tiny["fp32", "panoptic"])
    assert meta["fused_heads"] == ["panoptic"]
    assert meta["outputs"] == ["panoptic_map", "panoptic_segment_ids", "panoptic_labels", "panoptic_scores",
                               "panoptic_areas"]  # fmt: skip
    assert meta["heads"]["output_size"] == list(SIZE)
    assert meta["heads"]["inputs"]["overlap_threshold"]["default"] == 0.8
    sess = onnxruntime.InferenceSession(str(tiny["fp32", "panoptic"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [INPUT_NAME, *meta["heads"]["inputs"]]
    assert [o.name for o in sess.get_outputs()] == meta["outputs"]
    assert read_onnx_metadata(tiny["fp32", "raw"])["fused_heads"] == []


def test_head_size_and_thresholds_are_honoured(tiny, tmp_path):
    small = fuse_onnx(tiny["fp32", "raw"], tmp_path / "small.onnx", "instance", head_size=(32, 48))
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(3)).numpy()
    meta, out = _run(small, x, threshold=0.1)
    assert out["instance_map"].shape == (1, 32, 48) and out["instance_masks"].shape[2:] == (32, 48)
    case = _fused_against_numpy(tiny["fp32", "raw"], small, x, "instance")
    assert case.ok and case.segments[0] > 0
    # the threshold is a graph input: raising it leaves fewer valid instances
    _, high = _run(small, x, threshold=0.9)
    assert high["instance_valid"].sum() < out["instance_valid"].sum()


class _WrongSemantic(export_heads.SemanticHead):
    def forward(self, classes, masks):  # a planted bug: the second-best class
        return (super().forward(classes, masks) + 1) % (classes.shape[-1] - 1)


class _WrongInstance(export_heads.InstanceHead):
    def forward(self, classes, masks, threshold):  # a planted bug: scores off by 2e-3, everything else right
        scores, *rest = super().forward(classes, masks, threshold)
        return (scores + 2e-3, *rest)


def test_gate_fails_on_a_wrong_head(tiny, tmp_path, monkeypatch):
    raw = tiny["fp32", "raw"]
    monkeypatch.setitem(export_heads.MODULES, "semantic", _WrongSemantic)
    with pytest.raises(ValidationError, match="does not match the numpy post-processing"):
        fuse_onnx(raw, tmp_path / "bad.onnx", "semantic")
    assert not list(tmp_path.iterdir())  # nothing written, no temp folder left
    monkeypatch.setitem(export_heads.MODULES, "instance", _WrongInstance)
    bad = fuse_onnx(raw, tmp_path / "bad.onnx", "instance", validate=False)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(3)).numpy()
    case = _fused_against_numpy(raw, bad, x, "instance")
    assert not case.ok and case.max_score_error > 1e-3 and case.semantic_agreement == 1.0
    # the gate itself, on its own (default-threshold) inputs, on the right and the wrong graph
    assert validate_head(raw, tiny["fp32", "semantic"]).ok


def test_hf_panoptic_numbering_is_reproduced():
    """HF sets its counter back to a fused label's id when the label repeats, so the next new segment can take an
    earlier segment's id; the graph numbers segments apart and the runtime renumbers as HF does."""
    mapping, per_query = hf_segment_ids(np.array([1, 2, 0, 1, 3]), np.array([5, 6, 4, 5, 7]), {5})
    assert per_query == [1, 2, 1, 2] and mapping == {1: 1, 2: 2, 3: 2}
    # seed 23 of these synthetic logits has that repeat: labels 3,4 fused then a new segment
    out = synthetic_outputs(batch=1, num_queries=30, num_classes=6, mask_size=(24, 32), objects=12, seed=23)
    size, fuse = (96, 128), {0, 1, 2}
    meta = {"fused_heads": ["panoptic"], "id2label": {i: str(i) for i in range(6)},
            "heads": head_metadata("panoptic", 30, size, size)}  # fmt: skip
    inputs = head_inputs(meta, 1, threshold=0.3, label_ids_to_fuse=fuse)
    with torch.no_grad():
        graph = PanopticHead(size, 30)(*(torch.from_numpy(v) for v in (*out.values(), *inputs.values())))
    outputs = {name: t.numpy() for name, t in zip(meta["heads"]["outputs"], graph, strict=True)}
    got = decode(meta, outputs, label_ids_to_fuse=fuse)[0]
    ref = ImageProcessor().post_process_panoptic_segmentation(out, 0.3, label_ids_to_fuse=fuse, target_sizes=[size])[0]
    graph_ids = outputs["panoptic_segment_ids"][0]
    assert sorted(set(graph_ids[graph_ids > 0])) != sorted({s["id"] for s in ref["segments_info"]})  # the quirk is hit
    assert got["segments_info"] == ref["segments_info"]
    assert np.array_equal(got["segmentation"], ref["segmentation"])


def _canvas_images(size, count=3, seed=0):
    """The demo scene at ``size``, then noisier versions of it."""
    rng = np.random.default_rng(seed)
    scene = np.asarray(demo_image(tuple(size)), dtype=np.int16)
    return [np.clip(scene + rng.normal(0, 12 * i, scene.shape), 0, 255).astype(np.uint8) for i in range(count)]


@pytest.mark.parametrize("task", TASKS)
def test_segmenter_same_structures(tiny, task):
    images = _canvas_images(SIZE, 2) + [_canvas_images((50, 70), 1, seed=1)[0]]
    options = OPTIONS[task]
    with Segmenter(tiny["fp32", "raw"]) as raw, Segmenter(tiny["fp32", task]) as fused:
        assert fused.head == task and raw.head is None
        timings: dict[str, float] = {}
        a, b = raw.predict(images, task, **options), fused.predict(images, task, timings=timings, **options)
        assert set(timings) == {"preprocess", "inference", "postprocess"}
        with pytest.raises(InputError, match=f"returns {task} results"):
            fused.predict(images[:1], next(t for t in TASKS if t != task))
    for image, x, y in zip(images, a, b, strict=True):
        if task == "semantic":
            assert x.dtype == y.dtype == np.int64 and x.shape == y.shape == image.shape[:2]
        else:
            assert y["segmentation"].dtype == x["segmentation"].dtype and y["segmentation"].shape == image.shape[:2]
            assert all(set(s) == {"id", "label_id", "was_fused", "score"} for s in y["segments_info"])
    # images of the canvas size: the same results, up to pixels where two classes (queries) tie within float error
    # (the random model's scores over this flat scene differ by ~1e-8 there: 1 % of the pixels)
    if task == "semantic":
        with Segmenter(tiny["fp32", "raw"]) as raw:
            inputs = raw.processor.preprocess(images[:2])
            scores = raw.processor.post_process_semantic_segmentation(
                raw.infer(inputs[INPUT_NAME]), target_sizes=inputs["original_sizes"], return_segmentation_scores=True
            )  # fmt: skip
        case = compare_head(task, scores, b[:2])
        assert case.semantic_agreement_ties >= 0.999, case
    else:
        case = compare_head(task, a[:2], b[:2])
        assert case.matched == (case.segments[0], case.segments[0]) and case.segments[0] == case.segments[1] > 0, case
        assert case.semantic_agreement >= 0.98, case
    if task == "panoptic":
        assert any(s["was_fused"] for r in b for s in r["segments_info"])


def test_segmenter_instance_options(tiny):
    images = _canvas_images(SIZE, 1)
    with Segmenter(tiny["fp32", "raw"]) as raw, Segmenter(tiny["fp32", "instance"]) as fused:
        for flag in ("return_coco_annotation", "return_binary_maps"):
            a = raw.predict(images, "instance", threshold=0.1, **{flag: True})[0]
            b = fused.predict(images, "instance", threshold=0.1, **{flag: True})[0]
            if flag == "return_binary_maps":
                assert b["segmentation"].shape == a["segmentation"].shape and b["segmentation"].dtype == np.float32
                assert np.mean(a["segmentation"] == b["segmentation"]) > 0.999
            else:
                assert len(a["segmentation"]) == len(b["segmentation"]) and isinstance(b["segmentation"][0], list)
        assert len(fused.predict(images, "instance", threshold=0.9)[0]["segments_info"]) < len(b["segments_info"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo-heads")
    from m2f_deploy import load_model

    # at 96 x 96 (the checkpoint's 160 would be slower): the samples are resized onto that canvas
    raw = export_onnx(load_model(DEMO), folder / "raw.onnx", height=96, width=96, validate=False)
    return {"raw": raw, **{task: fuse_onnx(raw, folder / f"{task}.onnx", task, validate=False) for task in TASKS}}


@pytest.mark.parametrize("task", TASKS)
def test_demo_checkpoint_fused_equals_numpy(demo, task):
    processor = ImageProcessor.from_pretrained(DEMO, canvas=(96, 96))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(SAMPLES.glob("*.png"))[:2]]
    x = processor.preprocess(images)[INPUT_NAME]
    options = {"instance": {"threshold": 0.5}, "panoptic": {"label_ids_to_fuse": {0, 1, 2}}}.get(task, {})
    _, logits = _run(demo["raw"], x)
    meta, outputs = _run(demo[task], x, **options)
    reference = head_results(meta, ImageProcessor(), logits, (96, 96), len(x), **options)
    case = compare_head(task, reference, decode(meta, outputs, label_ids_to_fuse=options.get("label_ids_to_fuse")))
    assert case.ok, case
    if task != "semantic":
        assert case.segments[0] >= 4


def test_bad_head_arguments(tiny, tmp_path):
    with pytest.raises(InputError, match="static input size"):
        check_head_args("semantic", None, dynamic_hw=True)
    with pytest.raises(InputError, match="--head-size is for"):
        check_head_args("raw", (32, 32), dynamic_hw=False)
    with pytest.raises(InputError, match="unknown head"):
        check_head_args("panoptc", None, dynamic_hw=False)
    with pytest.raises(InputError, match="already has a fused head"):
        fuse_onnx(tiny["fp32", "semantic"], tmp_path / "x.onnx", "panoptic")
    with pytest.raises(InputError, match="not a label id"):
        head_inputs(read_onnx_metadata(tiny["fp32", "panoptic"]), 1, label_ids_to_fuse={99})


def test_cli(tiny, tmp_path, capsys):
    from m2f_deploy.cli.export import main as export_main
    from m2f_deploy.cli.predict import main as predict_main

    out = tmp_path / "sem.onnx"
    assert export_main([str(tiny["fp32", "raw"]), "--heads", "semantic", "--head-size", "32", "64", "-o", str(out),
                        "-q", "--check-tensorrt"]) == 0  # fmt: skip
    meta = read_onnx_metadata(out)
    assert meta["fused_heads"] == ["semantic"] and meta["heads"]["output_size"] == [32, 64]
    assert "passes for TensorRT" in capsys.readouterr().out
    u8 = tmp_path / "u8.onnx"
    assert export_main([str(tiny["fp32", "raw"]), "--input", "uint8", "-o", str(u8), "-q"]) == 0
    assert read_onnx_metadata(u8)["input"]["dtype"] == "uint8" and read_onnx_metadata(u8)["fused_heads"] == []
    for bad, message in ((["--heads", "raw", "--head-size", "32", "32"], "--head-size is for"),
                         (["--heads", "semantic", "--engine"], "rewritten .onnx only"),
                         (["--input", "uint8", "--engine"], "rewritten .onnx only")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            export_main([str(tiny["fp32", "raw"]), *bad, "-q"])
    for bad in (["--heads", "semantic"], ["--input", "uint8"]):  # from a checkpoint: refused before the export
        with pytest.raises(InputError, match="not built yet"):
            export_main(["--preset", "swin-tiny-coco-panoptic", *bad, "--engine", "-q"])
    with pytest.raises(InputError, match="static size"):
        export_main(["--preset", "swin-tiny-coco-panoptic", "--input", "uint8", "--dynamic-shape", "-q"])
    image = tmp_path / "img.png"
    Image.fromarray(_canvas_images(SIZE, 1)[0]).save(image)
    assert predict_main([str(tiny["fp32", "panoptic"]), str(image), "--out", str(tmp_path / "p"), "-q",
                         "--threshold", "0.3", "--no-overlay"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "p" / "panoptic.json").read_text())["annotations"]
    # no --task: the artifact's own; another task: one clear error
    assert predict_main([str(tiny["fp32", "semantic"]), str(image), "--out", str(tmp_path / "s"), "-q",
                         "--no-overlay"]) == 0  # fmt: skip
    assert not (tmp_path / "s" / "panoptic.json").exists() and any((tmp_path / "s").iterdir())
    with pytest.raises(InputError, match="returns semantic results"):
        predict_main([str(tiny["fp32", "semantic"]), str(image), "--task", "panoptic", "--out", str(tmp_path / "x"),
                      "-q"])  # fmt: skip


# -- uint8 input ---------------------------------------------------------------------------------------------------


class _NoMask(uint8_input.Uint8Input):
    def forward(self, images, pixel_mask):  # a planted bug: padding 1, not 0 (what the float path pads with)
        values = self.table[images.long() + self.offsets]
        values = torch.where(pixel_mask.to(torch.bool).unsqueeze(-1), values, torch.ones_like(values))
        return values.permute(0, 3, 1, 2)


def test_uint8_input_equals_float_path(tiny, tmp_path, monkeypatch):
    raw_u8 = uint8_onnx(tiny["fp32", "raw"], tmp_path / "raw-u8.onnx")
    pan_u8 = uint8_onnx(tiny["fp32", "panoptic"], tmp_path / "pan-u8.onnx")
    meta = read_onnx_metadata(pan_u8)
    assert meta["input"]["name"] == "images" and meta["input"]["dtype"] == "uint8" and meta["input"]["mask"]
    assert meta["fused_heads"] == ["panoptic"] and check_tensorrt_support(pan_u8).ok
    images = _canvas_images(SIZE, 2) + [_canvas_images((50, 70), 1, seed=1)[0]]  # the last one padded
    options = OPTIONS["panoptic"]
    for float_path, u8_path in ((tiny["fp32", "raw"], raw_u8), (tiny["fp32", "panoptic"], pan_u8)):
        with Segmenter(float_path) as a, Segmenter(u8_path) as b:
            assert b.uint8 and not a.uint8
            for x, y in zip(a.predict(images, "panoptic", **options), b.predict(images, "panoptic", **options),
                            strict=True):  # fmt: skip
                assert np.array_equal(x["segmentation"], y["segmentation"])
                assert x["segments_info"] == y["segments_info"]
            with pytest.raises(InputError, match="uint8"):
                b.infer(np.zeros((1, 3, *SIZE), np.float32))
    # the gate: a graph that normalises the padding too differs from the float graph
    monkeypatch.setattr(uint8_input, "Uint8Input", _NoMask)
    with pytest.raises(ValidationError, match="uint8-input graph differs"):
        uint8_onnx(tiny["fp32", "raw"], tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_validate_feeds_a_uint8_graph_its_bytes(tiny, tmp_path):
    # m2f-validate's predictor fed the float pixel_values to every graph: a uint8 graph refused each image
    from m2f_deploy.cli.validate import _artifact_predictor

    image = _canvas_images((50, 70), 1, seed=1)[0]  # padded into the canvas
    for source in (tiny["fp32", "raw"], tiny["fp32", "panoptic"]):
        u8 = uint8_onnx(source, tmp_path / f"{source.stem}-u8.onnx", validate=False)
        float_predict, *_ = _artifact_predictor(source, "auto")
        u8_predict, *_ = _artifact_predictor(u8, "auto")
        (a, a_in), (b, b_in) = float_predict(image), u8_predict(image)
        assert a.keys() == b.keys()
        for name in a:
            assert np.allclose(a[name], b[name], atol=1e-4), name
        if read_onnx_metadata(u8)["fused_heads"]:  # evaluate()'s second call, with the thresholds
            seg_a, seg_b = float_predict.segmenter, u8_predict.segmenter
            x = seg_a.infer(*a_in["feed"], threshold=0.3, label_ids_to_fuse={2})
            y = seg_b.infer(*b_in["feed"], threshold=0.3, label_ids_to_fuse={2})
            assert all(np.allclose(x[k], y[k], atol=1e-4) for k in x)
