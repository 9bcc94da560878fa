"""INT8 QDQ export: calibration on images, the agreement gate, metadata, the runtime runs it; bad input."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest
from factory import decisive_model

from m2f_deploy.artifact import read_onnx_metadata
from m2f_deploy.checkpoints import save_checkpoint
from m2f_deploy.cli.export import main as export_main
from m2f_deploy.data import write_dataset
from m2f_deploy.errors import InputError, M2FError
from m2f_deploy.export import export_onnx
from m2f_deploy.export.int8 import quantize_int8
from m2f_deploy.export.trt_support import check_tensorrt_support
from m2f_deploy.runtime import Segmenter


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    write_dataset(root / "calib", 4, seed=2, size=(80, 100))
    checkpoint = save_checkpoint(decisive_model(), root / "checkpoint")
    return root, checkpoint, root / "calib" / "images"


def test_int8_from_a_checkpoint(setup, tmp_path):
    _, checkpoint, calib = setup
    out = tmp_path / "model-int8.onnx"
    assert export_main([str(checkpoint), "--size", "64", "96", "--int8", "--calib", str(calib), "-o", str(out), "-q",
                        "--min-agreement", "0.5"]) == 0  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-int8.onnx"]  # the fp32 intermediate is gone
    meta = read_onnx_metadata(out)
    assert meta["precision"] == "int8" and meta["exporter"]["int8"]["calibration_images"] == 4
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > ops["QuantizeLinear"] // 2
    assert ops["Softmax"] > 0 and ops["LayerNormalization"] > 0  # kept in float
    results = Segmenter(out, backend="cpu").predict(calib / "000000.png", "panoptic", threshold=0.3)
    assert results[0]["segmentation"].shape == (80, 100)


def test_gate_and_errors(setup, tmp_path):
    root, checkpoint, calib = setup
    fp32 = export_onnx(decisive_model(), tmp_path / "fp32.onnx", height=64, width=64)
    images = sorted(calib.glob("*.png"))
    with pytest.raises(M2FError, match="agrees with fp32 on only"):
        quantize_int8(fp32, tmp_path / "q.onnx", images, min_agreement=1.01)
    assert not (tmp_path / "q.onnx").exists()
    fp16 = export_onnx(decisive_model(), tmp_path / "fp16.onnx", height=64, width=64, fp16=True)
    with pytest.raises(InputError, match="starts from an fp32 graph"):
        quantize_int8(fp16, tmp_path / "q.onnx", images)
    with pytest.raises(InputError, match="needs calibration images: --calib DIR"):
        export_main([str(checkpoint), "--int8"])
    with pytest.raises(InputError, match="--calib is for --int8"):
        export_main([str(checkpoint), "--calib", str(calib)])
    with pytest.raises(InputError, match="--int8 and --fp16"):
        export_main([str(checkpoint), "--int8", "--fp16", "--calib", str(calib)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        export_main([str(fp32), "--int8", "--calib", str(tmp_path / "empty")])


def test_int8_targets_quantize_activations_their_way(setup, tmp_path):
    """cpu: uint8 activations (onnxruntime's x86 U8S8 kernels); tensorrt: int8 with zero point 0. Both quantize
    the inputs of the MatMuls only, never their outputs (a quantized output is dequantized again for the bias);
    cpu quantizes the biases of Linear layers too (as Gemm)."""
    import numpy as np
    from onnx import numpy_helper

    from m2f_deploy.export.tensorrt import build_engine

    _, _, calib = setup
    fp32 = export_onnx(decisive_model(), tmp_path / "fp32.onnx", height=64, width=64)
    images = sorted(calib.glob("*.png"))
    for target, dtype in (("cpu", np.uint8), ("tensorrt", np.int8)):
        path = quantize_int8(fp32, tmp_path / f"{target}.onnx", images, min_agreement=0.5, target=target)
        meta = read_onnx_metadata(path)["exporter"]["int8"]
        assert meta["target"] == target and meta["activations"].startswith(np.dtype(dtype).name)
        graph = onnx.load(str(path))
        inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
        producers = {o: n.op_type for n in graph.graph.node for o in n.output}
        quantize = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
        assert quantize and all(inits[n.input[2]].dtype == dtype for n in quantize)
        if target == "tensorrt":
            assert all(not inits[n.input[2]].any() for n in quantize)  # symmetric
        assert not [n.name for n in quantize if producers.get(n.input[0]) == "MatMul"]
        # cpu: Linear layers as Gemm with an int32-quantized bias (onnxruntime fuses them whole into QGemm);
        # tensorrt: left as MatMul + float bias Add
        dequantized = {n.output[0]: inits.get(n.input[0]) for n in graph.graph.node if n.op_type == "DequantizeLinear"}
        biases = [dequantized.get(n.input[2]) for n in graph.graph.node if n.op_type == "Gemm"]
        if target == "cpu":
            assert len(biases) > 10 and all(b is not None and b.dtype == np.int32 for b in biases)
        else:
            assert not biases
            # no int32 bias anywhere (Conv's either): TensorRT dequantizes INT8 only
            assert all(inits[n.input[0]].dtype == np.int8 for n in graph.graph.node
                       if n.op_type == "DequantizeLinear" and n.input[0] in inits)  # fmt: skip
    # the static TensorRT check: the tensorrt target's graph passes; the cpu one is refused (uint8 activations and
    # zero points), with the way out, before TensorRT is even looked for
    assert check_tensorrt_support(tmp_path / "tensorrt.onnx").findings == []
    cpu = check_tensorrt_support(tmp_path / "cpu.onnx")
    assert not cpu.ok and {f.versions for f in cpu.errors} == {("10.3", "10.16", "11.x")}
    assert {f.op for f in cpu.errors} >= {"QuantizeLinear", "DequantizeLinear"}
    assert any("UINT8" in f.rule for f in cpu.errors) and any("zero_point must be zero" in f.rule for f in cpu.errors)
    with pytest.raises(InputError, match="--int8-target tensorrt"):
        build_engine(tmp_path / "cpu.onnx", int8=True)
    with pytest.raises(InputError, match="unknown INT8 target 'gpu'"):
        quantize_int8(fp32, tmp_path / "q.onnx", images, target="gpu")
    with pytest.raises(InputError, match="--int8-target is for --int8 --calib"):
        export_main([str(fp32), "--int8-target", "cpu"])


def test_the_agreement_check_closes_both_sessions_also_on_failure(tmp_path, monkeypatch):
    import numpy as np

    from m2f_deploy.export.int8 import graphs_semantic_agreement
    from m2f_deploy.runtime import onnxrt

    fp32 = export_onnx(decisive_model(), tmp_path / "fp32.onnx", height=64, width=64)
    closed = []
    close = onnxrt.OnnxRuntimeRunner.close
    monkeypatch.setattr(onnxrt.OnnxRuntimeRunner, "close", lambda self: closed.append(1) or close(self))
    x = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    assert graphs_semantic_agreement(fp32, fp32, [x]) == 1.0
    assert len(closed) == 2
    with pytest.raises(InputError):  # a batch the graph cannot take: both sessions are closed all the same
        graphs_semantic_agreement(fp32, fp32, [x[:, :, :32]])
    assert len(closed) == 4
