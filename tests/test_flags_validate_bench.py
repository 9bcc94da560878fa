"""m2f-validate's and m2f-bench's flags: each reaches what it is for, with its value.

m2f-validate's numbers are checked against m2f_deploy.evaluation run directly on the Segmenter's predictions (another
route to the same results), and its agreement against a deliberately different reference must drop. The artifact
is test_gates' hand-written graph, with the synthetic dataset's seven classes; the PyTorch reference is a torch
module doing the graph's arithmetic (its checkpoint folder is a stand-in: load_model is replaced).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_gates import write_graph

import m2f_deploy
import m2f_deploy.errors
from m2f_deploy import evaluation
from m2f_deploy.cli.validate import main
from m2f_deploy.data import CLASSES, load_dataset, write_dataset
from m2f_deploy.runtime import Segmenter

LABELS = len(CLASSES)
STUFF = {c["id"] for c in CLASSES if not c["isthing"]}
# two queries of "sky" (stuff) on complementary regions, one "circle", one "no object"
CLS = np.full((4, LABELS + 1), -3.0, np.float32)
CLS[0, 0] = CLS[1, 0] = 3.0
CLS[2, 3] = 2.0
CLS[3, LABELS] = 3.0
W = np.random.default_rng(1).standard_normal((4, 3, 4, 4)).astype(np.float32)
W[0] = np.array([-4.0, 0.0, 4.0], np.float32)[:, None, None] / 16  # blue minus red: the synthetic sky (and water)
W[1] = -W[0]
B = np.array([0.5, 0.5, -0.5, 0.0], np.float32)
PRE = {"do_resize": True, "size": {"shortest_edge": 64, "longest_edge": 64}}


class Standin(torch.nn.Module):
    """The graph's arithmetic in torch (what load_model returns for the reference checkpoint)."""

    def __init__(self, cls=CLS):
        super().__init__()
        self.cls = torch.from_numpy(np.asarray(cls, np.float32))

    def forward(self, x):
        masks = torch.nn.functional.conv2d(x, torch.from_numpy(W), torch.from_numpy(B), stride=4)
        cls = self.cls.expand(x.shape[0], *self.cls.shape)
        return SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate-flags")
    write_dataset(root / "data", 3, seed=4, size=(64, 80))
    artifact = write_graph(root / "m.onnx", dynamic_hw=False, class_logits=CLS, preprocessing=PRE, conv_weight=W,
                           conv_bias=B, id2label={c["id"]: c["name"] for c in CLASSES})  # fmt: skip
    for name in ("same", "other"):
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
    return root, artifact


@pytest.fixture
def references(monkeypatch, setup):
    root, _ = setup
    other = CLS.copy()
    other[0, 0], other[0, 1] = -3.0, 3.0  # the sky query says "ground"
    models = {root / "same": Standin(), root / "other": Standin(other)}
    monkeypatch.setattr(m2f_deploy, "load_model", lambda path: models[path])


def direct(artifact, data, *, threshold=0.5, limit=None, fuse=STUFF):
    """The metrics from m2f_deploy.evaluation on the Segmenter's predictions."""
    dataset = load_dataset(data)
    records = list(dataset)[:limit] if limit else list(dataset)
    panoptic = evaluation.PanopticEvaluator(dataset.categories)
    semantic = evaluation.SemanticEvaluator(LABELS)
    instance = evaluation.InstanceEvaluator(dataset.instances_json)
    with Segmenter(artifact, "cpu") as seg:
        for r in records:
            image = r.image()
            result = seg.predict(image, "panoptic", threshold=threshold, label_ids_to_fuse=fuse)[0]
            panoptic.update(result, r.ground_truth())
            semantic.update(seg.predict(image, "semantic")[0], r.semantic())
            instance.update(r.image_id, seg.predict(image, "instance", threshold=threshold)[0])
    pq, sem, ap = panoptic.compute(), semantic.compute(), instance.compute()
    return {"PQ": pq.all.pq, "SQ": pq.all.sq, "RQ": pq.all.rq, "PQ_things": pq.things.pq, "PQ_stuff": pq.stuff.pq,
            "mIoU": sem.mean_iou, "pixel_accuracy": sem.pixel_accuracy, "AP": ap.ap, "AP50": ap.ap50, "AP75": ap.ap75}


def _validate(setup, tmp_path, *flags):
    root, artifact = setup
    out = tmp_path / "r.json"
    assert main([str(artifact), "--data", str(root / "data"), "--json", str(out), "-q", *flags]) == 0
    return json.loads(out.read_text())


def _same(report, expected):
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, abs=1e-9, nan_ok=True), key


def test_metrics_equal_the_evaluation_run_directly(setup, tmp_path, monkeypatch):
    from m2f_deploy.processing import ImageProcessor

    root, artifact = setup
    fused = []
    real = ImageProcessor.post_process_panoptic_segmentation
    def recording(self, *args, **kwargs):
        fused.append(kwargs.get("label_ids_to_fuse"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ImageProcessor, "post_process_panoptic_segmentation", recording)
    report = _validate(setup, tmp_path, "--backend", "cpu")
    assert fused == [STUFF] * 3  # the stuff labels are fused, as the dataset's categories say
    expected = direct(artifact, root / "data")
    _same(report, expected)
    assert report["images"] == 3 and "CPUExecutionProvider" in report["model"]["backend"]
    assert "agreement" not in report  # no reference given, none in the metadata
    assert expected["PQ"] > 0 and expected["mIoU"] > 0  # numbers that can differ


def test_threshold_limit_and_task(setup, tmp_path):
    root, artifact = setup
    report = _validate(setup, tmp_path, "--threshold", "0.97", "--limit", "2")
    expected = direct(artifact, root / "data", threshold=0.97, limit=2)
    _same(report, expected)
    assert report["images"] == 2
    assert expected["PQ"] != pytest.approx(direct(artifact, root / "data", limit=2)["PQ"])  # the threshold matters
    semantic = _validate(setup, tmp_path, "--task", "semantic")
    assert {"mIoU", "pixel_accuracy", "per_class_IoU"} <= set(semantic) and not {"PQ", "AP"} & set(semantic)
    instance = _validate(setup, tmp_path, "--task", "instance")
    assert {"AP", "AP50", "AP75"} <= set(instance) and not {"PQ", "mIoU"} & set(instance)
    panoptic = _validate(setup, tmp_path, "--task", "panoptic")
    assert "PQ_stuff" in panoptic and not {"mIoU", "AP"} & set(panoptic)


def test_agreement_with_the_same_and_a_different_reference(setup, references, tmp_path):
    root, _ = setup
    same = _validate(setup, tmp_path, "--reference", str(root / "same"))["agreement"]
    assert same["semantic_pixels"] == 100.0
    matched, total = same["panoptic_segments_matched"]
    assert matched == total > 0
    other = _validate(setup, tmp_path, "--reference", str(root / "other"))["agreement"]
    assert other["semantic_pixels"] < 99.0
    matched, total = other["panoptic_segments_matched"]
    assert matched < total


# -- m2f-bench: the flags reach benchmark() ------------------------------------------------------------------------
@pytest.fixture
def bench_calls(monkeypatch):
    import m2f_deploy.bench as bench

    calls = []
    report = {"machine": {"cpu": "cpu", "cores": 2}, "gflop": 1.0, "settings": {"source": "s", "height": 1, "width": 1},
              "matmul_gflops": 1.0, "matmul_gflops_by_library": {"numpy": 1.0}, "date": "today"}  # fmt: skip
    monkeypatch.setattr(bench, "benchmark", lambda target, **kw: calls.append((target, kw)) or report)
    monkeypatch.setattr(bench, "format_table", lambda r: "TABLE")
    monkeypatch.setattr(bench, "plot", lambda r, path: calls.append(("plot", path)) or path)
    return calls


def test_bench_defaults_and_flags(bench_calls, tmp_path, capsys):
    from m2f_deploy.bench import DEFAULT_BACKENDS
    from m2f_deploy.cli.bench import main as bench_main

    assert bench_main(["model.onnx", "-q"]) == 0
    (target, kw), = bench_calls
    kw.pop("progress")
    assert target == "model.onnx" and kw == {
        "preset": None, "backends": list(DEFAULT_BACKENDS), "batches": [1], "height": 384, "width": 384, "runs": 20,
        "warmup": 3, "rounds": 1, "threads": None, "fp16": False, "int8": False, "calibration": [],
        "msda": "deform_conv", "end_to_end": False, "tasks": ["panoptic"],
    }  # fmt: skip
    assert "TABLE" in capsys.readouterr().out
    bench_calls.clear()
    write_dataset(tmp_path / "calib", 2, seed=1, size=(40, 48))
    images = sorted((tmp_path / "calib" / "images").glob("*.png"))
    argv = ["--preset", "swin-tiny-coco-panoptic", "--backends", "ort-cpu, torch", "--batch", "1", "4", "--size", "64",
            "96", "--runs", "5", "--warmup", "1", "--rounds", "2", "--threads", "2", "--fp16", "--int8", "--calib",
            str(tmp_path / "calib" / "images"), "--msda", "gather", "--end-to-end", "--task", "semantic", "instance",
            "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png"), "-q"]  # fmt: skip
    assert bench_main(argv) == 0
    (target, kw), plot = bench_calls
    kw.pop("progress")
    assert target is None and kw == {
        "preset": "swin-tiny-coco-panoptic", "backends": ["ort-cpu", "torch"], "batches": [1, 4], "height": 64,
        "width": 96, "runs": 5, "warmup": 1, "rounds": 2, "threads": 2, "fp16": True, "int8": True,
        "calibration": images, "msda": "gather", "end_to_end": True, "tasks": ["semantic", "instance"],
    }  # fmt: skip
    assert plot == ("plot", tmp_path / "p.png")
    assert json.loads((tmp_path / "r.json").read_text())["date"] == "today"
    with pytest.raises(m2f_deploy.errors.M2FError, match="--calib is for --int8"):
        bench_main(["model.onnx", "--calib", str(tmp_path / "calib" / "images")])
