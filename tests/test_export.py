"""ONNX export: every MSDA flavour x exporter, dynamic axes, fp16, metadata, the gate, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from factory import decisive_model, save_hf_checkpoint, tiny_config

from m2f_deploy import load_model
from m2f_deploy.artifact import OUTPUT_NAMES, REQUIRED
from m2f_deploy.artifact import read_onnx_metadata as _metadata
from m2f_deploy.cli.export import main as export_main
from m2f_deploy.errors import InputError
from m2f_deploy.export import export_onnx, validate_onnx
from m2f_deploy.export.trt_support import check_tensorrt_support
from m2f_deploy.export.validate import ValidationError, session
from m2f_deploy.modeling import Mask2Former
from m2f_deploy.runtime.plugin_standin import count_plugin_nodes
from m2f_deploy.utils import sha256_file

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_hf_checkpoint(tiny_config(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir)


def _check_against_torch(model, path, msda, shape, atol=1e-4):
    """An independent check, at a shape the exporter's own gate did not use."""
    sess = session(path, msda)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(x)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"pixel_values": x.numpy()})))
    for name in OUTPUT_NAMES:
        expected = getattr(ref, name).numpy()
        assert got[name].shape == expected.shape, name
        np.testing.assert_allclose(got[name], expected, atol=atol, rtol=0, err_msg=name)


def _op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def assert_tensorrt_support(path, msda, plugin_version=1):
    """What the static TensorRT check expects of our graphs (README, "Static TensorRT check"): every flavour passes
    for TensorRT 10.3, 10.16 and 11.x; plugin version 1 is deprecated from 10.11, version 2 needs 10.11."""
    report = check_tensorrt_support(path)
    if msda == "trt_plugin" and plugin_version == 2:
        assert {(f.rule, f.versions) for f in report.findings} == {
            ("plugin_version 2 exists from TensorRT 10.11", ("10.3",))}, report.format()
        assert check_tensorrt_support(path, ["10.16", "11.x"]).findings == []
        return
    assert report.ok, report.format()
    if msda == "trt_plugin":
        assert {f.versions for f in report.findings} == {("10.16", "11.x")}
        assert {f.severity for f in report.findings} == {"deprecated"}
    else:
        assert report.findings == [], report.format()


@pytest.mark.parametrize("msda", ["grid_sample", "gather", "trt_plugin"])
def test_torchscript_flavours_with_dynamic_batch_and_size(tiny, tmp_path, msda):
    path = export_onnx(tiny, tmp_path / "m.onnx", height=64, width=64, msda=msda, dynamic_hw=True)
    _check_against_torch(tiny, path, msda, (3, 3, 96, 160))
    assert_tensorrt_support(path, msda)
    ops = _op_types(path)
    if msda == "grid_sample":
        assert "GridSample" in ops
    elif msda == "gather":
        assert "GridSample" not in ops and "Gather" in ops
    else:
        assert "GridSample" not in ops
        assert count_plugin_nodes(path) == tiny.config.encoder_layers
        graph = onnx.load(str(path))
        inits = {i.name: i for i in graph.graph.initializer}
        plugin = next(n for n in graph.graph.node if n.op_type == "MultiscaleDeformableAttnPlugin_TRT")
        assert plugin.domain == "trt.plugins" and len(plugin.input) == 5
        # dynamic sizes: spatial_shapes / level_start_index are computed in the graph, as int32
        inferred = onnx.shape_inference.infer_shapes(graph)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
        types.update({n: i.data_type for n, i in inits.items()})
        assert types.get(plugin.input[1]) == onnx.TensorProto.INT32
        assert types.get(plugin.input[2]) == onnx.TensorProto.INT32


@pytest.mark.parametrize("msda", ["grid_sample", "gather", "trt_plugin"])
def test_dynamo_flavours_with_dynamic_batch(tiny, tmp_path, msda):
    path = export_onnx(tiny, tmp_path / "m.onnx", height=64, width=96, msda=msda, exporter="dynamo")
    _check_against_torch(tiny, path, msda, (3, 3, 64, 96))
    assert_tensorrt_support(path, msda)
    meta = _metadata(path)
    assert meta["exporter"]["name"] == "dynamo" and meta["exporter"]["opset"] >= 18
    # nodes are named by module scope, as the fp16 block list needs
    assert any("/self_attn/sampler/" in n.name for n in onnx.load(str(path)).graph.node)


def test_static_axes_are_static(tiny, tmp_path):
    path = export_onnx(tiny, tmp_path / "m.onnx", height=64, width=64, batch=2, dynamic_batch=False)
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 64, 64]
    assert _metadata(path)["input"]["dynamic_batch"] is False
    # static sizes: Swin's window tables are constants, with no NonZero (BOOL) left over from building them
    assert "NonZero" not in _op_types(path)
    assert_tensorrt_support(path, "grid_sample")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_plugin_version_2(tiny, tmp_path, exporter):
    """--trt-plugin-version 2: the nodes ask for version 2, the metadata says so, the stand-in (the export's gate)
    runs it; the static check wants TensorRT >= 10.11 for it."""
    path = export_onnx(tiny, tmp_path / "m.onnx", height=64, width=64, msda="trt_plugin", exporter=exporter,
                       trt_plugin_version=2)  # fmt: skip
    plugins = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MultiscaleDeformableAttnPlugin_TRT"]
    assert plugins and all(onnx.helper.get_attribute_value(a) == b"2" for n in plugins for a in n.attribute
                           if a.name == "plugin_version")  # fmt: skip
    assert _metadata(path)["exporter"]["trt_plugin_version"] == 2
    assert_tensorrt_support(path, "trt_plugin", plugin_version=2)
    with pytest.raises(InputError, match="has versions 1 .* and 2"):
        export_onnx(tiny, tmp_path / "x.onnx", height=64, width=64, msda="trt_plugin", trt_plugin_version=3)


def test_metadata_is_complete(tiny, tiny_dir, tmp_path):
    path = export_onnx(tiny, tmp_path / "m.onnx", height=64, width=96, msda="gather")
    meta = _metadata(path)
    assert set(REQUIRED) <= set(meta)
    assert meta["id2label"] == tiny.config.id2label
    assert meta["num_queries"] == tiny.config.num_queries
    assert (meta["input"]["height"], meta["input"]["width"]) == (64, 96)
    assert meta["input"]["dynamic_batch"] is True and meta["input"]["dynamic_hw"] is False
    assert meta["msda"] == "gather" and meta["precision"] == "fp32"
    assert meta["source"]["sha256"] == sha256_file(tiny_dir / "model.safetensors")
    assert meta["preprocessing"]["image_mean"] == [0.485, 0.456, 0.406]
    assert {"torch", "onnx", "m2f_deploy", "opset"} <= set(meta["exporter"])


def test_fp16_graph(tmp_path):
    # the decisive model: a random-weight one shows one class everywhere, and agreement on that would be automatic
    model = decisive_model()
    p32 = export_onnx(model, tmp_path / "m32.onnx", height=64, width=64)
    p16 = export_onnx(model, tmp_path / "m16.onnx", height=64, width=64, fp16=True)
    assert_tensorrt_support(p32, "grid_sample")
    assert_tensorrt_support(p16, "grid_sample")
    graph = onnx.load(str(p16))
    assert _metadata(p16)["precision"] == "fp16"
    # inputs and outputs stay float32; weights are float16
    for v in list(graph.graph.input) + list(graph.graph.output):
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.graph.initializer)
    # fp32 islands: every LayerNorm / Softmax and the sampling arithmetic stay float32
    inferred = onnx.shape_inference.infer_shapes(graph)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for node in graph.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax") or "/sampler/" in node.name:
            for out in node.output:
                if out in types and node.op_type != "Cast":
                    assert types[out] != onnx.TensorProto.FLOAT16, (node.name, node.op_type)
    # fp16 agrees with fp32 on the segmentation
    from m2f_deploy.processing import ImageProcessor

    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    outs = [dict(zip(OUTPUT_NAMES, session(p, "grid_sample").run(list(OUTPUT_NAMES), {"pixel_values": x}))) for p in (p32, p16)]
    proc = ImageProcessor()
    maps = [proc.post_process_semantic_segmentation(o, target_sizes=[(64, 64)] * 2) for o in outs]
    assert all(len(np.unique(m)) >= 3 for m in maps[0])  # several classes per map: agreement can fail
    agreement = np.mean([np.mean(a == b) for a, b in zip(*maps)])
    assert agreement >= 0.99


def test_gate_fails_and_writes_nothing(tiny, tmp_path, monkeypatch):
    other = Mask2Former.random(tiny.config, seed=1)
    path = export_onnx(tiny, tmp_path / "ok.onnx", height=64, width=64)
    report = validate_onnx(other, path)
    assert not report.ok
    with pytest.raises(ValidationError, match="does not match the PyTorch model"):
        report.raise_if_failed(path)

    import m2f_deploy.export.validate as validate

    real = validate.validate_onnx
    monkeypatch.setattr(validate, "validate_onnx", lambda model, p, **kw: real(other, p, **kw))
    with pytest.raises(ValidationError, match=r"class_queries_logits .* FAIL"):
        export_onnx(tiny, tmp_path / "bad.onnx", height=64, width=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.onnx"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--msda", "gridsample"], "unknown MSDA flavour 'gridsample' (did you mean 'grid_sample'?)"),
        (["--size", "100"], "height=100: must be a positive multiple of 32"),
        (["--size", "64", "70"], "width=70: must be a positive multiple of 32"),
        (["--exporter", "tracer"], "unknown exporter 'tracer'"),
        (["-o", "/proc/m2f/x.onnx"], "folder /proc/m2f does not exist"),
    ],
)
def test_cli_bad_arguments_one_line_exit_1(tiny_dir, tmp_path, capsys, args, message):
    argv = [str(tiny_dir), "--size", "64", "-o", str(tmp_path / "m.onnx"), *args]
    from m2f_deploy.cli.common import run

    assert run("m2f-export", export_main, argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"m2f-export: error: {err[0].split('error: ', 1)[1]}"] and message in err[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_unwritable_folder_and_broken_checkpoint(tiny_dir, tmp_path, capsys):
    from m2f_deploy.cli.common import run

    # /proc takes no new files, whatever the user (CI runs as root, which ignores permission bits)
    assert run("m2f-export", export_main, [str(tiny_dir), "-o", "/proc/m.onnx"]) == 1
    assert capsys.readouterr().err.strip().startswith("m2f-export: error: /proc/m.onnx: folder /proc is not writable")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    out = tmp_path / "out"
    out.mkdir()
    assert run("m2f-export", export_main, [str(broken), "--size", "64", "-o", str(out / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("m2f-export: error: ") and "not a readable safetensors file" in err[-1]
    assert list(out.iterdir()) == []


def test_cli_entry_point_exit_code(tmp_path):
    """The installed command: a user error is one line on stderr and exit code 1, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "m2f_deploy.cli.export", str(tmp_path / "nope"), "-o", str(tmp_path / "m.onnx")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"m2f-export: error: {tmp_path / 'nope'}: no such checkpoint folder"
    assert "Traceback" not in proc.stderr


def test_api_rejects_bad_size(tiny, tmp_path):
    with pytest.raises(InputError, match="multiple of 32"):
        export_onnx(tiny, tmp_path / "m.onnx", height=60, width=64)


@pytest.mark.slow
def test_swin_tiny_preset_exports_and_validates(tmp_path, capsys):
    """The full Swin-T architecture at 384x384 through the CLI (random weights; the gate runs)."""
    out = tmp_path / "swin-t.onnx"
    assert export_main(["--preset", "swin-tiny-coco-panoptic", "-o", str(out), "--check-tensorrt"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err
    # the static TensorRT check after the export, on the full-size graph
    assert captured.out.splitlines()[-1] == f"{out}: passes for TensorRT 10.3, 10.16, 11.x"
    meta = _metadata(out)
    assert meta["num_queries"] == 100 and meta["num_labels"] == 133
    assert meta["input"]["height"] == 384 and meta["source"]["checkpoint"] is None
