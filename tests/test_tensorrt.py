"""TensorRT: what can be checked without it (profiles, fp32 layer choice, sidecar checks, errors) on every machine;
an engine built from the tiny model and compared with onnxruntime where TensorRT and a GPU are present."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from factory import decisive_model

from m2f_deploy.artifact import check_engine_compatible, engine_sidecar_path, read_engine_metadata, read_onnx_metadata
from m2f_deploy.cli.export import main as export_main
from m2f_deploy.errors import BackendError, InputError
from m2f_deploy.export import export_onnx
from m2f_deploy.export.precision import tensorrt_fp32_layer
from m2f_deploy.export.tensorrt import profile_shapes


def _gpu_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("polygraphy") is None:
        return "TensorRT and Polygraphy are not installed (pip install 'm2f-deploy[gpu]')"
    from m2f_deploy.runtime.cuda import gpu_info

    try:
        gpu_info(0)
    except BackendError as e:
        return f"no usable GPU: {e}"
    return None


NO_TENSORRT = _gpu_reason()


@pytest.fixture(scope="module")
def model():
    return decisive_model()


@pytest.fixture(scope="module")
def tiny_onnx(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp("trt") / "model.onnx", height=64, width=96)


def meta(batch=1, h=384, w=512, dynamic_batch=True, dynamic_hw=False):
    inp = {"batch": batch, "height": h, "width": w, "dynamic_batch": dynamic_batch, "dynamic_hw": dynamic_hw}
    return {"input": {**inp, "hw_multiple": 32}}


def test_default_profiles_follow_the_dynamic_axes():
    assert profile_shapes(meta()) == ((1, 3, 384, 512), (1, 3, 384, 512), (8, 3, 384, 512))
    assert profile_shapes(meta(batch=2, dynamic_batch=False)) == ((2, 3, 384, 512),) * 3
    low, opt, high = profile_shapes(meta(dynamic_hw=True))
    assert low == (1, 3, 192, 256) and opt == (1, 3, 384, 512) and high == (8, 3, 768, 1024)
    assert profile_shapes(meta(h=64, w=64, dynamic_hw=True))[0][2:] == (64, 64)


def test_profiles_given_are_checked_against_the_graph():
    shapes = ["1x3x384x512", "4x3x384x512", "16x3x384x512"]
    assert profile_shapes(meta(), shapes)[2] == (16, 3, 384, 512)
    with pytest.raises(InputError, match="fixed at 384x512"):
        profile_shapes(meta(), ["1x3x384x384", "1x3x384x512", "1x3x384x512"])
    with pytest.raises(InputError, match="batch is fixed at 1"):
        profile_shapes(meta(dynamic_batch=False), shapes)
    with pytest.raises(InputError, match="multiples of 32"):
        profile_shapes(meta(dynamic_hw=True), ["1x3x100x512", "1x3x384x512", "1x3x384x512"])
    with pytest.raises(InputError, match="min <= opt <= max"):
        profile_shapes(meta(), ["4x3x384x512", "1x3x384x512", "8x3x384x512"])
    with pytest.raises(InputError, match="expected BxCxHxW"):
        profile_shapes(meta(), ["1x3x384", "1x3x384x512", "8x3x384x512"])


def test_fp32_pinning_picks_layernorm_cross_attention_softmax_and_sampling(tiny_onnx):
    """TensorRT names layers after the ONNX nodes: the choice, made on the real graph's names."""
    kinds = {"LayerNormalization": "normalization", "Softmax": "softmax"}
    nodes = onnx.load(str(tiny_onnx)).graph.node
    pinned = {n.name for n in nodes if tensorrt_fp32_layer(n.name, kinds.get(n.op_type, n.op_type.lower()))}
    layernorms = {n.name for n in nodes if n.op_type == "LayerNormalization"}
    softmaxes = {n.name for n in nodes if n.op_type == "Softmax"}
    cross = {name for name in softmaxes if "/cross_attn/" in name}
    assert layernorms and cross and layernorms | cross <= pinned
    assert not (softmaxes - cross) & pinned  # Swin's and the self-attention softmaxes run in fp16
    assert any(n.op_type == "GridSample" and n.name in pinned for n in nodes)  # the deformable sampling
    assert len(pinned) < len(nodes) / 2


def test_engine_sidecar_is_checked_before_tensorrt_runs(tiny_onnx, tmp_path):
    built = {**read_onnx_metadata(tiny_onnx)}
    built["tensorrt"] = {"version": "10.3.0", "gpu": "NVIDIA A100", "compute_capability": "8.0", "profile": {}}
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"engine bytes")
    engine_sidecar_path(engine).write_text(json.dumps(built))
    meta = read_engine_metadata(engine)
    check_engine_compatible(
        meta, "m.engine", tensorrt_version="10.3.0", gpu="NVIDIA A100-SXM4", compute_capability="8.0"
    )
    with pytest.raises(InputError, match="built for NVIDIA A100 .compute capability 8.0., this GPU is Orin .8.7."):
        check_engine_compatible(meta, "m.engine", tensorrt_version="10.3.0", gpu="Orin", compute_capability="8.7")
    with pytest.raises(InputError, match="built with TensorRT 10.3.0, this is TensorRT 10.8.0"):
        check_engine_compatible(
            meta, "m.engine", tensorrt_version="10.8.0", gpu="NVIDIA A100", compute_capability="8.0"
        )
    del built["tensorrt"]
    engine_sidecar_path(engine).write_text(json.dumps(built))
    with pytest.raises(InputError, match="no 'tensorrt' section"):
        read_engine_metadata(engine)


def test_cli_checks_the_engine_request(tiny_onnx, tmp_path, capsys):
    with pytest.raises(InputError, match="fixed at 64x96"):
        export_main([str(tiny_onnx), "--shapes", "1x3x64x64", "1x3x64x96", "2x3x64x96"])
    with pytest.raises(InputError, match="written to a .engine file"):
        export_main([str(tiny_onnx), "-o", str(tmp_path / "x.onnx")])
    with pytest.raises(InputError, match="--int8 from a checkpoint needs calibration images"):
        export_main(["--preset", "swin-tiny-coco-panoptic", "--int8"])


@pytest.mark.skipif(NO_TENSORRT is None, reason="TensorRT is installed here: the missing-TensorRT error cannot show")
def test_missing_tensorrt_is_one_clear_error(tiny_onnx, tmp_path):
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        export_main([str(tiny_onnx), "-o", str(tmp_path / "m.engine")])
    assert not list(tmp_path.iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(NO_TENSORRT is not None, reason=str(NO_TENSORRT))
@pytest.mark.parametrize("fp16", [False, True])
def test_engine_matches_onnxruntime(tiny_onnx, tmp_path, fp16):
    from m2f_deploy.export.tensorrt import build_engine
    from m2f_deploy.runtime import Segmenter

    engine = build_engine(
        tiny_onnx, tmp_path / "model.engine", fp16=fp16, shapes=["1x3x64x96", "2x3x64x96", "3x3x64x96"]
    )
    sidecar = read_engine_metadata(engine)
    assert sidecar["tensorrt"]["profile"]["max"] == [3, 3, 64, 96]
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 96)).astype(np.float32)
    with Segmenter(engine) as trt, Segmenter(tiny_onnx, backend="cpu") as ort:
        assert trt.backend == "tensorrt"
        got, want = trt.infer(x), ort.infer(x)
        tolerance = (
            {"class_queries_logits": 0.25, "masks_queries_logits": 1.0}
            if fp16
            else {"class_queries_logits": 2e-2, "masks_queries_logits": 5e-2}
        )
        for name, tol in tolerance.items():
            assert np.abs(got[name] - want[name]).max() <= tol
        with pytest.raises(InputError, match="outside the engine's profile"):
            trt.infer(np.zeros((4, 3, 64, 96), np.float32))
