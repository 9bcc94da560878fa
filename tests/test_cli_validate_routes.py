"""m2f-validate's other two routes, fast: a fused-head graph (m2f-export --heads) and a checkpoint folder (PyTorch).

The artifact is test_flags_validate_bench's hand-written graph (with its output shapes inferred, which fuse_onnx needs),
its fused heads appended by fuse_onnx; the checkpoint is a folder whose model is that graph's arithmetic in torch
(load_model is replaced). The fused route's numbers are checked against m2f_deploy.evaluation run directly on the
Segmenter's predictions from the same fused graph; the checkpoint route's against the artifact's (the same arithmetic).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import onnx
import pytest
from test_flags_validate_bench import B, CLS, PRE, STUFF, W, Standin
from test_gates import write_graph

import m2f_deploy
from m2f_deploy import evaluation
from m2f_deploy.cli.validate import main
from m2f_deploy.data import CLASSES, load_dataset, write_dataset
from m2f_deploy.errors import InputError
from m2f_deploy.export.agreement import matched_segments, semantic_agreement
from m2f_deploy.export.heads import fuse_onnx
from m2f_deploy.processing import ImageProcessor
from m2f_deploy.runtime import Segmenter

LABELS = {c["id"]: c["name"] for c in CLASSES}
HEADS = ("panoptic", "semantic", "instance")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate-routes")
    write_dataset(root / "data", 2, seed=4, size=(64, 64))  # the canvas: fused maps equal the raw ones
    write_dataset(root / "data80", 2, seed=4, size=(64, 80))  # not the canvas: cut and resized back
    raw = write_graph(root / "raw.onnx", dynamic_hw=False, class_logits=CLS, preprocessing=PRE, conv_weight=W,
                      conv_bias=B, id2label=LABELS)  # fmt: skip
    onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(raw))), str(raw))  # static mask size, for the heads
    fused = {head: fuse_onnx(raw, root / f"{head}.onnx", head, validate=False) for head in HEADS}
    return root, raw, fused


def _validate(path, data, out, *flags):
    assert main([str(path), "--data", str(data), "--json", str(out), "-q", *flags]) == 0
    return json.loads(out.read_text())


def _direct(path, data, head, *, threshold=0.5, fuse=STUFF):
    """The head's metrics from m2f_deploy.evaluation on the Segmenter's predictions of the same graph."""
    dataset = load_dataset(data)
    with Segmenter(path, "cpu") as seg:
        predictions = [(r, seg.predict(r.image(), head, threshold=threshold, label_ids_to_fuse=fuse)[0]) for r in dataset]
    if head == "panoptic":
        panoptic = evaluation.PanopticEvaluator(dataset.categories)
        for r, p in predictions:
            panoptic.update(p, r.ground_truth())
        pq = panoptic.compute()
        return {"PQ": pq.all.pq, "SQ": pq.all.sq, "RQ": pq.all.rq, "PQ_things": pq.things.pq, "PQ_stuff": pq.stuff.pq,
                "RQ_stuff": pq.stuff.rq}  # fmt: skip
    if head == "semantic":
        semantic = evaluation.SemanticEvaluator(len(LABELS))
        for r, p in predictions:
            semantic.update(p, r.semantic())
        sem = semantic.compute()
        return {"mIoU": sem.mean_iou, "pixel_accuracy": sem.pixel_accuracy}
    instance = evaluation.InstanceEvaluator(dataset.instances_json)
    for r, p in predictions:
        instance.update(r.image_id, p)
    ap = instance.compute()
    return {"AP": ap.ap, "AP50": ap.ap50, "AP75": ap.ap75}


def _same(report, expected):
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, abs=1e-9, nan_ok=True), key


@pytest.mark.parametrize("head", HEADS)
def test_fused_head_metrics_equal_the_evaluation_run_directly(graphs, head, tmp_path):
    root, _, fused = graphs
    report = _validate(fused[head], root / "data", tmp_path / "r.json", "--backend", "cpu")
    _same(report, _direct(fused[head], root / "data", head))
    if head != "instance":  # at the images' own size (64 x 80), as the Segmenter cuts them back
        _same(_validate(fused[head], root / "data80", tmp_path / "r80.json"), _direct(fused[head], root / "data80", head))
    assert report["model"]["fused_head"] == head and report["images"] == 2
    others = {"panoptic": {"PQ", "SQ_stuff"}, "semantic": {"mIoU", "per_class_IoU"}, "instance": {"AP", "AP75"}}
    for task, keys in others.items():  # --task all: only the head's metrics (the graph gives nothing else)
        assert (keys <= set(report)) == (task == head), (task, sorted(report))
    again = _validate(fused[head], root / "data", tmp_path / "r.json", "--task", head)
    assert json.dumps(again) == json.dumps(report)  # as text: NaN (a class in neither map) equals itself there


def test_fused_panoptic_head_gets_the_threshold_and_the_stuff_labels(graphs, tmp_path, monkeypatch):
    root, _, fused = graphs
    high = _direct(fused["panoptic"], root / "data", "panoptic", threshold=0.99)
    assert high["PQ"] != pytest.approx(_direct(fused["panoptic"], root / "data", "panoptic")["PQ"])  # it can matter
    _same(_validate(fused["panoptic"], root / "data", tmp_path / "r.json", "--threshold", "0.99"), high)
    unfused = _direct(fused["panoptic"], root / "data", "panoptic", fuse=None)
    assert unfused["RQ_stuff"] != pytest.approx(_direct(fused["panoptic"], root / "data", "panoptic")["RQ_stuff"])
    from m2f_deploy.runtime import heads

    seen = []
    real = heads.decode
    monkeypatch.setattr(heads, "decode", lambda *a, **kw: seen.append(kw["label_ids_to_fuse"]) or real(*a, **kw))
    _validate(fused["panoptic"], root / "data", tmp_path / "r.json")
    assert seen == [STUFF, STUFF]  # the dataset's stuff labels reach the decoding too (its segments_info)


def test_fused_head_and_another_task_is_one_clear_error(graphs):
    root, _, fused = graphs
    for task in ("semantic", "instance"):
        with pytest.raises(InputError) as e:
            main([str(fused["panoptic"]), "--data", str(root / "data"), "--task", task, "-q"])
        assert str(e.value) == (f"{fused['panoptic']}: returns panoptic results (a fused head), not {task}: "
                                "use --task panoptic")  # fmt: skip


def test_fused_head_agreement(graphs, tmp_path, monkeypatch):
    """The agreement of a fused graph: with the reference's maps of the tasks the head returns."""
    root, raw, fused = graphs
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text("{}")
    monkeypatch.setattr(m2f_deploy, "load_model", lambda path: Standin())
    dataset = load_dataset(root / "data")
    with Segmenter(raw, "cpu") as logits, Segmenter(fused["panoptic"], "cpu") as pan, \
         Segmenter(fused["semantic"], "cpu") as sem:  # fmt: skip
        # the logits graph's maps are the reference's (test_cli_validate_output: 100 % agreement)
        pairs = [(logits.predict(r.image(), "panoptic", label_ids_to_fuse=STUFF)[0],
                  pan.predict(r.image(), "panoptic", label_ids_to_fuse=STUFF)[0]) for r in dataset]  # fmt: skip
        pixels = [semantic_agreement(logits.predict(r.image(), "semantic"), sem.predict(r.image(), "semantic"))
                  for r in dataset]  # fmt: skip
    segments = [sum(x) for x in zip(*(matched_segments([a], [b]) for a, b in pairs), strict=True)]
    report = _validate(fused["panoptic"], root / "data", tmp_path / "r.json", "--reference", str(ref))
    assert report["agreement"] == {"semantic_pixels": None, "panoptic_segments_matched": segments}
    assert segments[1] > 0
    report = _validate(fused["semantic"], root / "data", tmp_path / "r.json", "--reference", str(ref))
    assert report["agreement"]["semantic_pixels"] == pytest.approx(100 * sum(pixels) / len(pixels))
    assert report["agreement"]["panoptic_segments_matched"] == [0, 0]


class Checkpoint(Standin):
    """The reference model with a config (what load_model returns for a checkpoint folder); records its inputs."""

    def __init__(self, labels=LABELS):
        super().__init__()
        self.config = SimpleNamespace(id2label=dict(labels))
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape))
        return super().forward(x)


def test_checkpoint_route(graphs, tmp_path, monkeypatch, capsys):
    root, raw, _ = graphs
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    ImageProcessor(**PRE).save_pretrained(checkpoint)
    models = []
    monkeypatch.setattr(m2f_deploy, "load_model", lambda path: models.append((path, Checkpoint())) or models[-1][1])
    report = _validate(checkpoint, root / "data", tmp_path / "r.json", "--threshold", "0.3")
    (path, model), = models
    assert path == checkpoint and model.shapes == [(1, 3, 64, 64)] * 2  # the checkpoint's preprocessing
    assert report["model"] == {"checkpoint": str(checkpoint), "backend": "PyTorch (reference model)", "precision": "fp32"}
    assert "agreement" not in report  # a checkpoint is its own reference
    expected = _validate(raw, root / "data", tmp_path / "a.json", "--threshold", "0.3")  # the same arithmetic
    _same(report, {k: v for k, v in expected.items() if k not in ("model", "data")})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{checkpoint} on 2 images of {root / 'data'} (PyTorch (reference model), fp32)"
    (checkpoint / "preprocessor_config.json").unlink()  # none: the processor's defaults (a larger canvas)
    models.clear()
    _validate(checkpoint, root / "data", tmp_path / "r.json", "--task", "semantic")
    default = ImageProcessor().preprocess(next(iter(load_dataset(root / "data"))).image())
    assert models[0][1].shapes[0] == default["pixel_values"].shape != (1, 3, 64, 64)


def test_checkpoint_with_other_classes_is_one_clear_error(graphs, tmp_path, monkeypatch):
    root, _, _ = graphs
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    monkeypatch.setattr(m2f_deploy, "load_model", lambda path: Checkpoint({0: "a", 1: "b"}))
    with pytest.raises(InputError, match=r"checkpoint: the model has 2 classes, the dataset .* has 7"):
        main([str(checkpoint), "--data", str(root / "data"), "-q"])


def test_uint8_input_artifact_gives_the_float_artifacts_numbers(graphs, tmp_path):
    """A graph exported with --input uint8 takes the image's bytes and their mask: the same predictions."""
    from m2f_deploy.export.uint8_input import uint8_onnx

    root, raw, _ = graphs
    u8 = uint8_onnx(raw, tmp_path / "u8.onnx", validate=False)
    report = _validate(u8, root / "data", tmp_path / "u8.json")
    expected = _validate(raw, root / "data", tmp_path / "f.json")
    assert expected["PQ"] > 0
    _same(report, {k: v for k, v in expected.items() if k not in ("model", "data")})


def test_instance_threshold_reaches_the_post_processing(graphs, tmp_path, monkeypatch):
    root, raw, _ = graphs
    seen = []
    real = ImageProcessor.post_process_instance_segmentation

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("threshold"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ImageProcessor, "post_process_instance_segmentation", recording)
    _validate(raw, root / "data", tmp_path / "r.json", "--task", "instance", "--threshold", "0.7")
    assert seen == [0.7, 0.7]


def test_empty_dataset_is_one_clear_error(graphs, tmp_path):
    root, raw, _ = graphs
    import shutil

    shutil.copytree(root / "data", tmp_path / "empty")
    for name in ("panoptic.json", "instances.json"):  # every image taken out of the lists
        data = json.loads((tmp_path / "empty" / name).read_text())
        (tmp_path / "empty" / name).write_text(json.dumps({**data, "images": [], "annotations": []}))
    with pytest.raises(InputError) as e:
        main([str(raw), "--data", str(tmp_path / "empty"), "-q"])
    assert str(e.value) == f"{tmp_path / 'empty'}: the dataset has no images"


def test_the_source_checkpoint_of_an_engine_is_read_from_its_sidecar(graphs, tmp_path):
    from m2f_deploy.artifact import engine_sidecar_path, read_onnx_metadata
    from m2f_deploy.cli.validate import _metadata_source

    _, raw, _ = graphs
    meta = read_onnx_metadata(raw)
    meta["source"] = {"checkpoint": "/somewhere/ckpt"}
    meta["tensorrt"] = {"version": "10.3", "gpu": "H100", "compute_capability": "9.0", "profile": {}}
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    engine_sidecar_path(engine).write_text(json.dumps(meta))
    assert _metadata_source(engine) == {"checkpoint": "/somewhere/ckpt"}
    assert _metadata_source(raw) == {}  # write_graph records an empty source


def test_agreement_segment_counts_summed_over_images(graphs, tmp_path, monkeypatch):
    """A reference that disagrees on some segments: the matched and total counts are each summed over the images."""
    from test_flags_validate_bench import CLS as SAME

    root, raw, _ = graphs
    other = SAME.copy()
    other[0, 0], other[0, 1] = -3.0, 3.0  # one sky query says "ground"
    twin = write_graph(tmp_path / "twin.onnx", dynamic_hw=False, class_logits=other, preprocessing=PRE, conv_weight=W,
                       conv_bias=B, id2label=LABELS)  # the reference's arithmetic as a graph  # fmt: skip
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text("{}")
    monkeypatch.setattr(m2f_deploy, "load_model", lambda path: Standin(other))
    per_image = []
    with Segmenter(raw, "cpu") as seg, Segmenter(twin, "cpu") as reference:
        for r in load_dataset(root / "data80"):
            image = r.image()
            per_image.append(matched_segments([reference.predict(image, "panoptic", label_ids_to_fuse=STUFF)[0]],
                                              [seg.predict(image, "panoptic", label_ids_to_fuse=STUFF)[0]]))  # fmt: skip
    assert per_image[0][0] < per_image[0][1]  # the first image already has a segment unmatched
    report = _validate(raw, root / "data80", tmp_path / "r.json", "--reference", str(ref))
    assert report["agreement"]["panoptic_segments_matched"] == [sum(m for m, _ in per_image), sum(n for _, n in per_image)]
    assert report["agreement"]["panoptic_segments_matched"][0] < report["agreement"]["panoptic_segments_matched"][1]
