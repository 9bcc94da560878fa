"""m2f-validate around the metrics: its printed header and table, the reference it picks, its one-line errors.

The artifact is test_flags_validate_bench's hand-written graph (fast; the metrics themselves are checked there).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from test_flags_validate_bench import B, CLS, PRE, STUFF, W, Standin
from test_gates import write_graph

import m2f_deploy
from m2f_deploy import evaluation
from m2f_deploy.artifact import METADATA_KEY
from m2f_deploy.cli.validate import format_report, main
from m2f_deploy.data import CLASSES, load_dataset, write_dataset
from m2f_deploy.errors import InputError
from m2f_deploy.runtime import Segmenter

LABELS = {c["id"]: c["name"] for c in CLASSES}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate-output")
    write_dataset(root / "data", 2, seed=4, size=(64, 80))
    artifact = write_graph(root / "m.onnx", dynamic_hw=False, class_logits=CLS, preprocessing=PRE, conv_weight=W,
                           conv_bias=B, id2label=LABELS)  # fmt: skip
    return root, artifact


def with_source(artifact, path, checkpoint):
    """The artifact with ``source.checkpoint`` in its metadata (where export_onnx records the checkpoint)."""
    model = onnx.load(str(artifact))
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    meta = json.loads(prop.value)
    meta["source"] = {"checkpoint": str(checkpoint)}
    prop.value = json.dumps(meta)
    onnx.save(model, str(path))
    return path


def test_format_report():
    report = {"PQ": 51.234, "SQ": float("nan"), "mIoU": None, "AP": 7.0, "images": 2, "model": {}}
    assert format_report(report) == (
        "| PQ | SQ | mIoU | AP | agreement with PyTorch |\n|---|---|---|---|---|\n| 51.23 | n/a | n/a | 7.00 | n/a (no reference) |"
    )
    report["agreement"] = {"semantic_pixels": 99.5, "panoptic_segments_matched": [2, 3]}
    assert format_report(report).endswith("| 99.50% pixels, 2/3 segments |")
    report["agreement"] = {"semantic_pixels": None, "panoptic_segments_matched": [0, 0]}
    assert format_report(report).endswith("| n/a pixels, 0/0 segments |")


def test_printed_header_and_table(files, capsys):
    root, artifact = files
    assert main([str(artifact), "--data", str(root / "data"), "--backend", "cpu", "--json", str(root / "r.json")]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert "2/2 images" in captured.err  # the progress counter, without -q
    text = (root / "r.json").read_text()
    assert text.startswith('{\n "model": {\n  "artifact": ')  # indented by one space
    report = json.loads(text)
    dataset = load_dataset(root / "data")  # every PQ part, as m2f_deploy.evaluation computes it directly
    panoptic = evaluation.PanopticEvaluator(dataset.categories)
    with Segmenter(artifact, "cpu") as seg:
        for r in dataset:
            panoptic.update(seg.predict(r.image(), "panoptic", label_ids_to_fuse=STUFF)[0], r.ground_truth())
    pq = panoptic.compute()
    for part, value in (("", pq.all), ("_things", pq.things), ("_stuff", pq.stuff)):
        for key in ("PQ", "SQ", "RQ"):
            assert report[key + part] == pytest.approx(getattr(value, key.lower()), nan_ok=True), key + part
    iou = [v for v in report["per_class_IoU"].values() if v == v]  # NaN: a class in neither map
    assert len(report["per_class_IoU"]) == 7 and report["mIoU"] == pytest.approx(sum(iou) / len(iou))
    assert out[0] == f"{artifact} on 2 images of {root / 'data'} ({report['model']['backend']}, fp32)" and out[1] == ""
    keys = ["PQ", "SQ", "RQ", "PQ_things", "PQ_stuff", "mIoU", "pixel_accuracy", "AP", "AP50", "AP75"]
    assert out[2] == "| " + " | ".join(keys) + " | agreement with PyTorch |"
    row = out[4].split(" | ")
    assert float(row[0].lstrip("| ")) == pytest.approx(report["PQ"], abs=0.005)
    assert float(row[5]) == pytest.approx(report["mIoU"], abs=0.005) and len(row) == len(keys) + 1


def test_reference_from_the_artifacts_metadata(files, tmp_path, monkeypatch, capsys):
    root, artifact = files
    checkpoint = tmp_path / "checkpoint"
    model = with_source(artifact, tmp_path / "m.onnx", checkpoint)
    argv = [str(model), "--data", str(root / "data"), "--json", str(tmp_path / "r.json"), "-q"]
    assert main(argv) == 0  # recorded but not here: a warning (shown with -q too), no agreement
    assert f"source checkpoint {checkpoint} is not here: no agreement measured" in capsys.readouterr().err
    assert "agreement" not in json.loads((tmp_path / "r.json").read_text())
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    loaded = []
    monkeypatch.setattr(m2f_deploy, "load_model", lambda path: loaded.append(path) or Standin())
    assert main(argv) == 0
    assert loaded == [checkpoint]  # the recorded checkpoint, found: the agreement is measured with it
    assert json.loads((tmp_path / "r.json").read_text())["agreement"]["semantic_pixels"] == 100.0
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert main([*argv, "--reference", str(other)]) == 0
    assert loaded == [checkpoint, other]  # --reference wins over the metadata
    capsys.readouterr()
    assert main([*argv, "--task", "instance", "--limit", "1"]) == 0  # the agreement needs semantic and panoptic maps
    assert capsys.readouterr().err == ""  # -q: no progress counter either
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["images"] == 1 and report["agreement"] == {"semantic_pixels": 100.0,
                                                             "panoptic_segments_matched": [2, 2]}  # fmt: skip


def test_bad_input_is_one_clear_error(files, tmp_path):
    root, artifact = files
    data = str(root / "data")
    cases = [
        ([str(artifact), "--data", data, "--limit", "0"], "--limit must be at least 1, got 0"),
        ([str(tmp_path / "gone.onnx"), "--data", data], "gone.onnx: no such file or folder"),
        ([str(root / "data" / "panoptic.json"), "--data", data], "neither an .onnx / .engine artifact nor a checkpoint"),
        ([str(artifact), "--data", data, "--reference", str(tmp_path)], "not a checkpoint folder (no config.json)"),
    ]
    two = write_graph(tmp_path / "two.onnx", dynamic_hw=False, class_logits=np.zeros((2, 3)), preprocessing=PRE,
                      conv_weight=W[:2], conv_bias=B[:2], id2label={0: "a", 1: "b"})  # fmt: skip
    cases.append(([str(two), "--data", data], f"has 2 classes, the dataset {data} has 7: it was not trained for this data"))
    # as many classes as the model, under other ids (COCO-style ids from 1, say): every prediction would be misread
    shifted = tmp_path / "shifted"
    shutil.copytree(root / "data", shifted)
    annotations = json.loads((shifted / "panoptic.json").read_text())
    for c in annotations["categories"]:
        c["id"] += 10
    for a in annotations["annotations"]:
        for segment in a["segments_info"]:
            segment["category_id"] += 10
    (shifted / "panoptic.json").write_text(json.dumps(annotations))
    cases.append(([str(artifact), "--data", str(shifted)], "the model's class ids are not the dataset's"))
    cases.append(([str(artifact), "--data", data, "--backend", "nope"], "nope"))  # --backend reaches the Segmenter
    (tmp_path / "m.engine").write_bytes(b"not an engine")  # an artifact by its suffix: read as one, not "neither"
    cases.append(([str(tmp_path / "m.engine"), "--data", data], "m.engine: "))
    for argv, message in cases:
        with pytest.raises(InputError) as e:
            main([*argv, "-q"])
        assert message in str(e.value), argv
        assert ("neither" in str(e.value)) == ("panoptic.json" in argv[0]), argv


def test_help_and_renamed_classes(files, tmp_path, capsys):
    root, _ = files
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: m2f-validate ")
    renamed = write_graph(tmp_path / "renamed.onnx", dynamic_hw=False, class_logits=CLS, preprocessing=PRE,
                          conv_weight=W, conv_bias=B, id2label={**LABELS, 0: "heaven"})  # fmt: skip
    assert main([str(renamed), "--data", str(root / "data"), "--task", "semantic", "-q"]) == 0
    err = capsys.readouterr().err
    assert f"class names differ between the model and the dataset (compared by id): {{0: ('heaven', '{LABELS[0]}')}}" in err
