"""m2f-predict's flags and the Segmenter's options, one by one: each reaches what it is for, with its value.

The artifact is the hand-written graph of test_gates (a strided Conv for the masks, fixed class logits): fast, and
its class scores are known. Recorders wrap the real Segmenter, so every run is a real one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_gates import CONV_W, write_graph

import m2f_deploy.runtime as runtime
from m2f_deploy import viz
from m2f_deploy.cli.predict import main
from m2f_deploy.demo import demo_image
from m2f_deploy.runtime import Segmenter

# query 0: label 0 (p ~0.84), query 1: label 1 (p ~0.88), query 2: "no object"
CLASS = np.array([[2.0, 0.0, -2.0], [0.0, 2.5, -2.0], [-2.0, -2.0, 3.0]], np.float32)
PRE = {"do_resize": True, "size": {"shortest_edge": 64, "longest_edge": 64}}
WEIGHT = CONV_W.copy()
WEIGHT[1] = -CONV_W[0]  # queries 0 and 1 show complementary regions


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-flags")
    dynamic = write_graph(root / "m.onnx", dynamic_hw=False, class_logits=CLASS, preprocessing=PRE,
                          conv_weight=WEIGHT)
    static = write_graph(root / "s.onnx", dynamic_hw=False, dynamic_batch=False, batch=2, class_logits=CLASS,
                         preprocessing=PRE, conv_weight=WEIGHT)  # fmt: skip
    images = root / "images"
    images.mkdir()
    for i, size in enumerate([(100, 80), (90, 70), (64, 96)]):
        demo_image().resize(size).rotate(90 * i).save(images / f"im{i}.png")
    return dynamic, static, images


class Recorded(Segmenter):
    made: list = []

    def __init__(self, *args, **kwargs):
        Recorded.made.append((args, kwargs))
        super().__init__(*args, **kwargs)
        self.calls = []

    def predict(self, images, task="panoptic", **kwargs):
        self.calls.append((len(images), task, {k: v for k, v in kwargs.items() if k != "timings"}))
        self.intra_op_threads = self._runner.session.get_session_options().intra_op_num_threads
        return super().predict(images, task, **kwargs)


@pytest.fixture
def record(monkeypatch):
    Recorded.made = []
    made = []
    original = Recorded.__init__

    def init(self, *a, **kw):
        original(self, *a, **kw)
        made.append(self)

    monkeypatch.setattr(Recorded, "__init__", init)
    monkeypatch.setattr(runtime, "Segmenter", Recorded)
    return made


def _run(artifact, inputs, out, *flags):
    return main([str(artifact), *map(str, inputs), "-o", str(out), "-q", *flags])


def test_defaults_reach_the_segmenter(artifacts, record, tmp_path):
    dynamic, _, images = artifacts
    assert _run(dynamic, [images], tmp_path) == 0
    (args, kwargs), = Recorded.made
    assert args == (dynamic, "auto") and kwargs == {"threads": None, "batch_size": None, "postprocess": "fast"}
    seg, = record
    assert [(n, task) for n, task, _ in seg.calls] == [(1, "panoptic")] * 3  # the artifact's batch: 1
    assert seg.calls[0][2] == {"threshold": 0.5, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.8,
                               "label_ids_to_fuse": set()}  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["im0.png", "im1.png", "im2.png"]


def test_flags_reach_the_segmenter(artifacts, record, tmp_path):
    dynamic, _, images = artifacts
    flags = ["--threshold", "0.3", "--mask-threshold", "0.4", "--overlap-threshold", "0.6", "--batch", "2",
             "--threads", "1", "--backend", "cpu", "--exact", "--no-overlay"]  # fmt: skip
    assert _run(dynamic, [images], tmp_path, *flags) == 0
    (args, kwargs), = Recorded.made
    assert args == (dynamic, "cpu") and kwargs == {"threads": 1, "batch_size": 2, "postprocess": "reference"}
    seg, = record
    assert [n for n, _, _ in seg.calls] == [2, 1]
    assert seg.calls[0][2] == {"threshold": 0.3, "mask_threshold": 0.4, "overlap_mask_area_threshold": 0.6,
                               "label_ids_to_fuse": set()}  # fmt: skip
    assert seg.intra_op_threads == 1
    assert not (tmp_path / "overlays").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["panoptic", "panoptic.json"]


def test_instance_and_semantic_tasks(artifacts, record, tmp_path):
    dynamic, _, images = artifacts
    assert _run(dynamic, [images / "im0.png"], tmp_path / "i", "--task", "instance") == 0
    assert record[0].calls[0][1:] == ("instance", {"threshold": 0.5, "mask_threshold": 0.5,
                                                   "overlap_mask_area_threshold": 0.8, "return_binary_maps": True})
    data = json.loads((tmp_path / "i" / "instances.json").read_text())
    assert data["categories"] == [{"id": 0, "name": "a", "isthing": 1}, {"id": 1, "name": "b", "isthing": 1}]
    assert {a["category_id"] for a in data["annotations"]} == {0, 1}
    assert _run(dynamic, [images / "im0.png"], tmp_path / "s", "--task", "semantic") == 0
    png = np.asarray(Image.open(tmp_path / "s" / "semantic" / "im0.png"))
    with Segmenter(dynamic) as seg:
        np.testing.assert_array_equal(png, seg.predict(images / "im0.png", "semantic")[0])


def test_thresholds_change_what_is_written(artifacts, tmp_path):
    dynamic, _, images = artifacts

    def labels(threshold):
        out = tmp_path / threshold
        assert _run(dynamic, [images / "im0.png"], out, "--threshold", threshold) == 0
        annotation = json.loads((out / "panoptic.json").read_text())["annotations"][0]
        return sorted(s["category_id"] for s in annotation["segments_info"])

    probs = np.exp(CLASS) / np.exp(CLASS).sum(1, keepdims=True)
    assert probs[0, 0] < 0.9 < probs[1, 1] < 0.95
    assert labels("0.5") == [0, 1] and labels("0.9") == [1] and labels("0.95") == []


def test_fuse_marks_stuff_and_merges(artifacts, record, tmp_path):
    dynamic, _, images = artifacts
    assert _run(dynamic, [images / "im0.png"], tmp_path, "--fuse", "0") == 0
    assert record[0].calls[0][2]["label_ids_to_fuse"] == {0}
    data = json.loads((tmp_path / "panoptic.json").read_text())
    assert data["categories"] == [{"id": 0, "name": "a", "isthing": 0}, {"id": 1, "name": "b", "isthing": 1}]


def test_two_inputs_with_the_same_stem(artifacts, tmp_path):
    dynamic, _, images = artifacts
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.png").write_bytes((images / f"im{name == 'b':d}.png").read_bytes())
    out = tmp_path / "out"
    assert _run(dynamic, [tmp_path / "a", tmp_path / "b"], out) == 0
    assert sorted(p.name for p in (out / "panoptic").iterdir()) == ["x-1.png", "x.png"]
    data = json.loads((out / "panoptic.json").read_text())
    assert [i["file_name"] for i in data["images"]] == [str(tmp_path / "a" / "x.png"), str(tmp_path / "b" / "x.png")]
    assert [(a["image_id"], a["file_name"]) for a in data["annotations"]] == [(1, "x.png"), (2, "x-1.png")]
    assert [(i["width"], i["height"]) for i in data["images"]] == [(100, 80), (90, 70)]


# -- the Segmenter's options -----------------------------------------------------------------------------------------
def test_threads_reach_onnxruntime_and_the_post_processing(artifacts):
    dynamic, _, _ = artifacts
    with Segmenter(dynamic, "cpu", threads=2) as seg:
        assert seg._runner.session.get_session_options().intra_op_num_threads == 2
        assert seg.processor.workers.threads == 2
    with Segmenter(dynamic, "cpu") as seg:
        assert seg._runner.session.get_session_options().intra_op_num_threads == 0  # onnxruntime's own choice
        assert seg.processor.workers.threads in (None, 1)


def test_static_batch_pads_the_last_run(artifacts, monkeypatch):
    dynamic, static, images = artifacts
    paths = sorted(images.glob("*.png"))
    with Segmenter(dynamic) as seg:
        expected = [seg.predict(p, "panoptic", threshold=0.3)[0] for p in paths]
    with Segmenter(static, batch_size=5) as seg:
        assert seg.batch_size == 2  # a static batch runs its own batch, whatever is asked
        shapes = []
        infer = seg.infer
        monkeypatch.setattr(seg, "infer", lambda x: shapes.append(x.shape) or infer(x))
        got = seg.predict(paths, "panoptic", threshold=0.3)
    assert shapes == [(2, 3, 64, 64), (2, 3, 64, 64)]  # the third image ran with one padded
    assert len(got) == 3
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a["segmentation"], b["segmentation"])
        assert a["segments_info"] == b["segments_info"]


def test_batch_size_of_a_dynamic_artifact(artifacts, monkeypatch):
    dynamic, _, images = artifacts
    with Segmenter(dynamic, batch_size=2) as seg:
        assert seg.batch_size == 2
        shapes = []
        infer = seg.infer
        monkeypatch.setattr(seg, "infer", lambda x: shapes.append(x.shape[0]) or infer(x))
        seg.predict(sorted(images.glob("*.png")), "semantic")
    assert shapes == [2, 1]


def _decode_runs(runs: list[int], shape) -> np.ndarray:
    """transformers' run-length encoding: (1-based start, length) pairs over the row-major flattened mask."""
    flat = np.zeros(shape[0] * shape[1], bool)
    for start, length in zip(runs[::2], runs[1::2], strict=True):
        flat[start - 1 : start - 1 + length] = True
    return flat.reshape(shape)


def test_fuse_and_coco_annotations_through_predict(artifacts):
    dynamic, _, images = artifacts
    with Segmenter(dynamic) as seg:
        plain = seg.predict(images / "im0.png", "panoptic")[0]
        fused = seg.predict(images / "im0.png", "panoptic", label_ids_to_fuse={0})[0]
        assert {s["label_id"]: s["was_fused"] for s in plain["segments_info"]} == {0: False, 1: False}
        assert {s["label_id"]: s["was_fused"] for s in fused["segments_info"]} == {0: True, 1: False}
        ids = seg.predict(images / "im0.png", "instance")[0]
        rles = seg.predict(images / "im0.png", "instance", return_coco_annotation=True)[0]
    assert rles["segments_info"] == ids["segments_info"] and len(ids["segments_info"]) == 2
    assert isinstance(rles["segmentation"], list) and len(rles["segmentation"]) == 2
    for runs, info in zip(rles["segmentation"], ids["segments_info"], strict=True):
        np.testing.assert_array_equal(_decode_runs(runs, ids["segmentation"].shape), ids["segmentation"] == info["id"])


def test_draw_instance_paints_later_instances_over_earlier_ones():
    image = Image.new("RGB", (4, 3), (255, 255, 255))
    binary = np.zeros((2, 3, 4), np.uint8)
    binary[0, :, :3] = 1
    binary[1, :, 2:] = 1  # column 2 is both instances'
    infos = [{"id": 0, "label_id": 0, "score": 0.9}, {"id": 1, "label_id": 1, "score": 0.8}]
    ids = np.array([[0, 0, 1, 1]] * 3)
    drawn = np.asarray(viz.draw_instance(image, {"segmentation": binary, "segments_info": infos}, {0: "a", 1: "b"}))
    as_ids = np.asarray(viz.draw_instance(image, {"segmentation": ids, "segments_info": infos}, {0: "a", 1: "b"}))
    np.testing.assert_array_equal(drawn, as_ids)
    first = np.asarray(viz.draw_instance(image, {"segmentation": np.array([[0, 0, 0, 1]] * 3), "segments_info": infos},
                                         {0: "a", 1: "b"}))  # fmt: skip
    assert not np.array_equal(drawn, first)  # column 2 differs: it is the later instance's


def test_batch_size_outside_what_the_artifact_runs(artifacts, monkeypatch):
    """A bounded batch range (as a TensorRT profile gives): a batch_size outside it is one clear error; inside it and
    by default (the export batch, at least the lowest) it is taken."""
    import dataclasses

    from m2f_deploy.errors import InputError
    from m2f_deploy.runtime.base import InputSpec

    dynamic, _, _ = artifacts
    real = InputSpec.from_metadata
    bounded = classmethod(lambda cls, meta: dataclasses.replace(real(meta), batch=(2, 4)))
    monkeypatch.setattr(InputSpec, "from_metadata", bounded)
    with pytest.raises(InputError) as e:
        Segmenter(dynamic, batch_size=5)
    assert str(e.value) == "batch_size=5 is outside what m.onnx runs (2..4)"
    with Segmenter(dynamic, batch_size=4) as seg:
        assert seg.batch_size == 4
    with Segmenter(dynamic) as seg:
        assert seg.batch_size == 2  # the export batch (1) raised to the lowest the artifact runs
