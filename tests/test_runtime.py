"""m2f_deploy.runtime.Segmenter on onnxruntime CPU: the same results as the PyTorch model + processor; bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from factory import decisive_model
from onnx import TensorProto, helper

from m2f_deploy.artifact import INPUT_NAME, engine_sidecar_path, read_onnx_metadata
from m2f_deploy.demo import demo_image
from m2f_deploy.errors import BackendError, InputError
from m2f_deploy.export import export_onnx
from m2f_deploy.modeling import numpy_logits
from m2f_deploy.processing import ImageProcessor
from m2f_deploy.runtime import Segmenter, available_backends, onnxrt

SIZE = (128, 160)
PROCESSOR = {"size": {"shortest_edge": 96, "longest_edge": 160}}
THRESHOLDS = {"threshold": 0.3, "overlap_mask_area_threshold": 0.8}


@pytest.fixture(scope="module")
def model():
    return decisive_model()


@pytest.fixture(scope="module")
def static_onnx(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("static") / "model.onnx"
    return export_onnx(model, path, height=SIZE[0], width=SIZE[1], processor=ImageProcessor(**PROCESSOR))


@pytest.fixture(scope="module")
def dynamic_onnx(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("dynamic") / "model.onnx"
    return export_onnx(model, path, height=96, width=128, dynamic_hw=True, processor=ImageProcessor(**PROCESSOR))


def images():
    scene = demo_image()
    return [scene, np.asarray(scene.resize((180, 100))), scene.crop((0, 0, 90, 200))]


def reference(model, processor, task, batch=None, **kwargs):
    """What a user with PyTorch would do: the processor, the model, the post-process (``batch`` images a run)."""
    if batch is not None:
        results = []
        for start in range(0, len(images()), batch):
            chunk = images()[start : start + batch]
            results += reference(model, processor, task, images=chunk, **kwargs)
        return results
    inputs = processor.preprocess(kwargs.pop("images", images()))
    with torch.no_grad():
        outputs = numpy_logits(model(torch.from_numpy(inputs[INPUT_NAME])))
    post = getattr(processor, f"post_process_{task}_segmentation")
    return post(outputs, target_sizes=inputs["original_sizes"], pixel_mask=inputs["pixel_mask"], **kwargs)


def assert_same_segments(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert [s["label_id"] for s in g["segments_info"]] == [s["label_id"] for s in w["segments_info"]]
        assert len(w["segments_info"]) > 0  # a comparison of empty results would prove nothing
        for sg, sw in zip(g["segments_info"], w["segments_info"]):
            assert abs(sg["score"] - sw["score"]) < 1e-3
            area_g = int((np.asarray(g["segmentation"]) == sg["id"]).sum())
            area_w = int((np.asarray(w["segmentation"]) == sw["id"]).sum())
            assert abs(area_g - area_w) <= 0.001 * np.asarray(w["segmentation"]).size + 1


def test_reads_everything_from_the_artifact(model, static_onnx):
    seg = Segmenter(static_onnx)
    assert seg.backend == "cpu" and "CPUExecutionProvider" in seg.description
    assert seg.processor.canvas == SIZE  # static size: fitted and padded onto the export canvas
    assert seg.processor.size == PROCESSOR["size"]
    assert seg.id2label == model.config.id2label and len(seg.id2label) > 1  # the model's, not the parser's own
    assert "cpu" in available_backends()


@pytest.mark.parametrize("task", ["semantic", "instance", "panoptic"])
def test_predict_equals_pytorch_static(model, static_onnx, task):
    seg = Segmenter(static_onnx)
    kwargs = {} if task == "semantic" else THRESHOLDS
    got = seg.predict(images(), task, **kwargs)
    want = reference(model, seg.processor, task, **kwargs)
    if task == "semantic":
        for g, w in zip(got, want):
            assert g.shape == w.shape and np.mean(g == w) >= 0.999
            assert len(np.unique(w)) > 1
    else:
        assert_same_segments(got, want)
    assert [np.asarray(r if task == "semantic" else r["segmentation"]).shape[:2] for r in got] == [
        (240, 320), (100, 180), (200, 90)
    ]  # fmt: skip


def test_predict_equals_pytorch_dynamic_size_and_batches(model, dynamic_onnx):
    """Dynamic height/width: the checkpoint's own resizing, padded to the batch's largest; batches of 2."""
    seg = Segmenter(dynamic_onnx, batch_size=2)
    assert seg.processor.canvas is None
    got = seg.predict(images(), "panoptic", **THRESHOLDS)
    want = reference(model, ImageProcessor(**PROCESSOR), "panoptic", batch=2, **THRESHOLDS)
    assert_same_segments(got, want)
    timings = {}
    seg.predict(images()[0], "semantic", timings=timings)
    assert set(timings) == {"preprocess", "inference", "postprocess"}


def test_predict_takes_paths(static_onnx, tmp_path):
    seg = Segmenter(static_onnx)
    demo_image().save(tmp_path / "scene.png")
    by_path = seg.predict([tmp_path / "scene.png", str(tmp_path / "scene.png")], "semantic")
    by_image = seg.predict(demo_image(), "semantic")[0]
    assert all(np.array_equal(r, by_image) for r in by_path)
    (tmp_path / "bad.png").write_text("text")
    with pytest.raises(InputError, match="bad.png: not an image"):
        seg.predict(tmp_path / "bad.png")


def test_infer_checks_its_input(static_onnx):
    seg = Segmenter(static_onnx)
    x = np.zeros((2, 3, *SIZE), np.float32)
    out = seg.infer(x)
    assert out["class_queries_logits"].shape[:2] == (2, 10)
    assert out["masks_queries_logits"].shape == (2, 10, SIZE[0] // 4, SIZE[1] // 4)
    with pytest.raises(InputError, match="takes 128x160 only"):
        seg.infer(np.zeros((1, 3, 96, 96), np.float32))
    with pytest.raises(InputError, match=r"float \[B, 3, H, W\]"):
        seg.infer(np.zeros((1, 4, *SIZE), np.float32))
    with pytest.raises(InputError, match="unknown task 'panoptik'.*did you mean 'panoptic'"):
        seg.predict(images()[0], "panoptik")


def test_onnxruntime_rejecting_the_input_is_an_input_error(static_onnx):
    runner = Segmenter(static_onnx)._runner  # below the runner base's checks (infer_impl): onnxruntime's verdict
    with pytest.raises(InputError, match=r"model.onnx: onnxruntime rejects pixel_values float32 \[1, 3, 96, 96\]"):
        runner.infer_impl(np.zeros((1, 3, 96, 96), np.float32))
    with pytest.raises(InputError, match="rejects pixel_values float64"):
        runner.infer_impl(np.zeros((1, 3, *SIZE), np.float64))


def test_a_graph_failing_while_running_is_a_backend_error(static_onnx, tmp_path):
    # a graph whose Reshape cannot split 12 values into rows of 7: the input is what the graph declares, the failure
    # is the artifact's, and the error names it
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["pixel_values", "shape"], ["class_queries_logits"])],
        "broken",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["B", 3, "H", "W"])],
        [helper.make_tensor_value_info("class_queries_logits", TensorProto.FLOAT, None)],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [7, -1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.metadata_props.extend(onnx.load(str(static_onnx), load_external_data=False).metadata_props)
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    runner = onnxrt.OnnxRuntimeRunner(path, read_onnx_metadata(path), "cpu")
    with pytest.raises(BackendError, match=r"broken.onnx: onnxruntime \(cpu\) failed running on pixel_values"):
        runner.infer_impl(np.zeros((1, 3, 2, 2), np.float32))  # below the base checks: the graph itself fails


def test_bad_artifacts_give_one_clear_error(static_onnx, tmp_path):
    with pytest.raises(InputError, match="no such file"):
        Segmenter(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="is a folder"):
        Segmenter(tmp_path)
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(InputError, match="not an ONNX model"):
        Segmenter(text)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(static_onnx.read_bytes()[:20000])
    with pytest.raises(InputError, match="truncated ONNX file"):
        Segmenter(truncated)
    plain = tmp_path / "plain.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["pixel_values"], ["y"])], "g",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32, 32])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph), plain)
    with pytest.raises(InputError, match="no 'm2f_deploy' metadata entry"):
        Segmenter(plain)


def test_backends_are_never_silently_swapped(static_onnx, tmp_path):
    with pytest.raises(InputError, match="unknown backend 'cdua'.*did you mean 'cuda'"):
        Segmenter(static_onnx, backend="cdua")
    with pytest.raises(InputError, match="runs TensorRT engines"):
        Segmenter(static_onnx, backend="tensorrt")
    if "cuda" not in available_backends():
        with pytest.raises(BackendError, match="CUDAExecutionProvider.*does not have"):
            Segmenter(static_onnx, backend="cuda")
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\0" * 64)
    with pytest.raises(InputError, match="sidecar model.engine.json is missing"):
        Segmenter(engine)
    meta = read_onnx_metadata(static_onnx)
    meta["tensorrt"] = {"version": "0.0.1", "gpu": "Some GPU", "compute_capability": "1.0", "profile": {}}
    engine_sidecar_path(engine).write_text(__import__("json").dumps(meta))
    with pytest.raises(InputError, match="runs on backend 'tensorrt' only"):
        Segmenter(engine, backend="cpu")
    if "tensorrt" not in available_backends():
        with pytest.raises(BackendError, match="TensorRT is not installed"):
            Segmenter(engine)


def test_runtime_never_imports_torch(static_onnx):
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from m2f_deploy.runtime import Segmenter
        from m2f_deploy import viz, coco
        seg = Segmenter({str(static_onnx)!r})
        image = np.full((60, 80, 3), 128, np.uint8)
        for task in ("semantic", "instance", "panoptic"):
            seg.predict(image, task)
        heavy = sorted(m for m in ("torch", "torchvision", "transformers", "onnx") if m in sys.modules)
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_threads_and_postprocess_reach_the_processor(static_onnx, monkeypatch):
    from m2f_deploy.processing.postprocess import reference as reference_path

    called = []
    original = reference_path.semantic_segmentation
    monkeypatch.setattr(reference_path, "semantic_segmentation", lambda *a: called.append(1) or original(*a))
    with Segmenter(static_onnx, threads=2, postprocess="reference") as seg:
        assert (seg.processor.postprocess, seg.processor.workers.threads) == ("reference", 2)
        exact = seg.predict(images()[0], "semantic")[0]
        assert called
        seg.processor.workers.run([lambda: None, lambda: None])  # start the pool, to see it closed
        assert seg.processor.workers._pool is not None
    assert seg.processor.workers._pool is None  # closed with the segmenter
    fast = Segmenter(static_onnx)
    assert (fast.processor.postprocess, fast.processor.workers.threads) == ("fast", 1)  # the defaults
    assert np.mean(fast.predict(images()[0], "semantic")[0] == exact) >= 0.999
    for bad, message in [({"threads": 0}, "threads must be a"), ({"postprocess": "exakt"}, "unknown postprocess")]:
        with pytest.raises(InputError, match=message):
            Segmenter(static_onnx, **bad)
