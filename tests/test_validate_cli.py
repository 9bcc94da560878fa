"""m2f-validate on a tiny synthetic dataset: metrics, agreement with the PyTorch reference, JSON, bad input."""

from __future__ import annotations

import json

import pytest
from factory import decisive_model

from m2f_deploy.checkpoints import save_checkpoint
from m2f_deploy.cli.validate import main
from m2f_deploy.data import CLASSES, write_dataset
from m2f_deploy.errors import InputError
from m2f_deploy.export import export_onnx
from m2f_deploy.processing import ImageProcessor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    data = root / "data"
    write_dataset(data, 3, seed=5, size=(96, 128))
    model = decisive_model(id2label={c["id"]: c["name"] for c in CLASSES})
    checkpoint = save_checkpoint(model, root / "checkpoint")
    ImageProcessor(size={"shortest_edge": 96, "longest_edge": 128}).save_pretrained(checkpoint)
    from m2f_deploy import load_model

    onnx_path = export_onnx(load_model(checkpoint), root / "model.onnx", height=96, width=128)
    return root, data, checkpoint, onnx_path


def test_artifact_metrics_and_agreement(setup):
    root, data, _, onnx_path = setup
    out = root / "report.json"
    assert main([str(onnx_path), "--data", str(data), "--json", str(out), "-q", "--threshold", "0.3"]) == 0
    report = json.loads(out.read_text())
    for key in ("PQ", "SQ", "RQ", "PQ_things", "PQ_stuff", "mIoU", "AP", "AP50"):
        assert key in report
    assert 0 <= report["mIoU"] <= 100 and report["images"] == 3
    agreement = report["agreement"]  # the source checkpoint is found through the artifact's metadata
    assert agreement["semantic_pixels"] >= 99.9
    matched, total = agreement["panoptic_segments_matched"]
    assert total > 0 and matched == total


def test_checkpoint_and_task_selection(setup, capsys):
    root, data, checkpoint, _ = setup
    assert main([str(checkpoint), "--data", str(data), "--task", "semantic", "--limit", "2", "-q"]) == 0
    table = capsys.readouterr().out
    assert "on 2 images" in table and "| mIoU | pixel_accuracy |" in table and "PQ" not in table


def test_bad_input(setup, tmp_path):
    root, data, _, onnx_path = setup
    with pytest.raises(InputError, match="no such dataset folder"):
        main([str(onnx_path), "--data", str(tmp_path / "none")])
    other = export_onnx(decisive_model(), tmp_path / "five.onnx", height=64, width=64)
    with pytest.raises(InputError, match="the model has 5 classes, the dataset .* has 7"):
        main([str(other), "--data", str(data)])
    with pytest.raises(InputError, match="not a checkpoint folder"):
        main([str(onnx_path), "--data", str(data), "--reference", str(tmp_path)])
