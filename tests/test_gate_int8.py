"""The INT8 gate at its boundary: a threshold just above the measured agreement fails, the measured value itself
passes, the reported value is the measured one, and the default (0.95) decides as its value says.

The agreement is measured here a second time, independently (our own onnxruntime sessions and post-process), so
that a gate comparing the fp32 graph with itself (agreement 1.0) cannot pass.
"""

from __future__ import annotations

import math

import numpy as np
import onnxruntime
import pytest
from factory import decisive_model

from m2f_deploy.artifact import read_onnx_metadata
from m2f_deploy.data import write_dataset
from m2f_deploy.errors import M2FError
from m2f_deploy.export import export_onnx, int8
from m2f_deploy.export.int8 import MIN_INT8_AGREEMENT, calibration_inputs, quantize_int8
from m2f_deploy.processing import ImageProcessor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8gate")
    write_dataset(root / "calib", 3, seed=2, size=(64, 80))
    images = sorted((root / "calib" / "images").glob("*.png"))
    fp32 = export_onnx(decisive_model(), root / "fp32.onnx", height=64, width=64, validate=False)
    return fp32, images


def _independent_agreement(fp32, int8, batches) -> float:
    processor = ImageProcessor()
    maps = []
    for path in (fp32, int8):
        sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs = [dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixel_values": x}))) for x in batches]
        maps.append([m for o in outs for m in processor.post_process_semantic_segmentation(o)])
    return float(np.mean([np.mean(a == b) for a, b in zip(*maps, strict=True)]))


def test_the_int8_gate_at_its_boundary(setup, tmp_path, monkeypatch):
    fp32, images = setup
    seen = []  # the value the gate compares (the real measurement, recorded on its way)
    real = int8.graphs_semantic_agreement
    monkeypatch.setattr(int8, "graphs_semantic_agreement", lambda *a: seen.append(real(*a)) or seen[-1])
    out = tmp_path / "q.onnx"
    assert MIN_INT8_AGREEMENT == 0.95
    # the tiny random model's int8 graph agrees on ~90 %: the default threshold lies between it and 1.0
    measured = _default_run(fp32, out, images, seen)
    # the measured value itself passes (the threshold is inclusive); what was written is what was measured
    assert quantize_int8(fp32, out, images, min_agreement=measured) == out and out.is_file()
    assert seen[-1] == measured
    batches = calibration_inputs(images, read_onnx_metadata(fp32))
    assert _independent_agreement(fp32, out, batches) == pytest.approx(measured, abs=1e-3)


def _default_run(fp32, out, images, seen):
    try:
        quantize_int8(fp32, out, images)
    except M2FError as e:
        measured = seen[-1]
        assert 0.5 < measured < MIN_INT8_AGREEMENT
        assert str(e) == (f"{out}: the int8 graph agrees with fp32 on only {measured:.1%} of semantic pixels (< 95%); "
                          "nothing was written. More or more varied calibration images may help.")  # fmt: skip
        assert sorted(p.name for p in out.parent.iterdir()) == []  # nor any temporary folder
        return measured
    # another platform's numbers may pass the default: then a threshold just above the measured value must fail
    measured = seen[-1]
    assert MIN_INT8_AGREEMENT <= measured < 1.0 and out.is_file()
    out.unlink()
    with pytest.raises(M2FError, match=f"agrees with fp32 on only {measured:.1%}"):
        quantize_int8(fp32, out, images, min_agreement=math.nextafter(measured, 1.0))
    assert not out.exists()
    return measured
