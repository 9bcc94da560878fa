"""m2f-export's flags, one by one: each reaches the function it is for, with its value (not ignored, not inverted).

Most cases stop the command at its boundary (the export, the quantization, the engine build are replaced by
recorders: fast, and exact about what was asked); one real export checks that the recorded arguments become the
graph's input dims, opset and metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
from factory import tiny_config
from test_gates import write_graph

import m2f_deploy
import m2f_deploy.export as export_pkg
from m2f_deploy.artifact import read_onnx_metadata
from m2f_deploy.cli.common import run
from m2f_deploy.cli.export import main
from m2f_deploy.errors import InputError
from m2f_deploy.export import int8, tensorrt, trt_support
from m2f_deploy.modeling import Mask2Former

DEFAULTS = dict(height=384, width=384, batch=1, dynamic_batch=True, dynamic_hw=False, msda="grid_sample", opset=None,
                fp16=False, exporter="torchscript", cleanup="auto", validate=True, tolerances={}, seed=0)  # fmt: skip


class Calls(list):
    def only(self, name):
        found = [kw for what, kw in self if what == name]
        assert len(found) == 1, self
        return found[0]


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Every slow step replaced by a recorder; the working folder is an empty temporary one."""
    record = Calls()
    monkeypatch.chdir(tmp_path)
    # **kw: options other branches add (a model-zoo config) are theirs to test
    monkeypatch.setattr(m2f_deploy, "load_model", lambda path, **kw: record.append(("load", {"path": path})) or "MODEL")

    def fake_export(model, path, **kw):
        record.append(("export", {"model": model, "path": path, **kw}))
        Path(path).write_bytes(b"graph")
        return Path(path)

    monkeypatch.setattr(export_pkg, "export_onnx", fake_export)

    def fake_quantize(fp32, path, images, **kw):
        assert Path(fp32).is_file()  # the fp32 graph exists while it is quantized
        for i in range(len(images)):
            kw["progress"](i + 1, len(images))
        record.append(("quantize", {"fp32": fp32, "path": path, "images": images, **kw}))
        Path(path).write_bytes(b"int8")

    monkeypatch.setattr(int8, "quantize_int8", fake_quantize)
    monkeypatch.setattr(tensorrt, "check_tensorrt", lambda: record.append(("check_tensorrt", {})))
    def fake_build(path, output=None, **kw):
        record.append(("engine", {"path": path, "output": output, **kw}))
        return "E"

    monkeypatch.setattr(tensorrt, "build_engine", fake_build)
    return record


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from m2f_deploy.checkpoints import save_checkpoint

    return save_checkpoint(Mask2Former.random(tiny_config(), seed=0), tmp_path_factory.mktemp("ck") / "tiny-ckpt")


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    return write_graph(tmp_path_factory.mktemp("g") / "g.onnx")


def test_defaults(calls, checkpoint):
    assert main([str(checkpoint) + "/"]) == 0
    assert calls.only("load") == {"path": str(checkpoint) + "/"}
    kw = calls.only("export")
    assert kw.pop("model") == "MODEL" and kw.pop("path") == Path("tiny-ckpt.onnx")  # the default name, here
    assert {k: kw[k] for k in DEFAULTS} == DEFAULTS
    assert [what for what, _ in calls] == ["load", "export"]


@pytest.mark.parametrize(
    "flags,changed",
    [
        (["--size", "64", "96"], dict(height=64, width=96)),
        (["--size", "64"], dict(height=64, width=64)),
        (["--batch", "3"], dict(batch=3)),
        (["--static-batch"], dict(dynamic_batch=False)),
        (["--dynamic-shape"], dict(dynamic_hw=True)),
        (["--msda", "gather"], dict(msda="gather")),
        (["--exporter", "dynamo"], dict(exporter="dynamo")),
        (["--opset", "18"], dict(opset=18)),
        (["--fp16"], dict(fp16=True)),
        (["--cleanup", "none"], dict(cleanup="none")),
        (["--no-validate"], dict(validate=False)),
        (["--seed", "7"], dict(seed=7)),
        (["--atol", "masks_queries_logits=0.1", "--atol", "class_queries_logits=3"],
         dict(tolerances={"masks_queries_logits": 0.1, "class_queries_logits": 3.0})),
        (["--msda", "trt_plugin", "--trt-plugin-version", "2"], dict(msda="trt_plugin", trt_plugin_version=2)),
    ],
)  # fmt: skip
def test_each_flag_reaches_the_export(calls, checkpoint, flags, changed):
    assert main([str(checkpoint), "-o", "m.onnx", *flags]) == 0
    kw = calls.only("export")
    assert kw.pop("path") == Path("m.onnx") and kw.pop("model") == "MODEL"
    expected = {**DEFAULTS, **changed}
    assert {k: kw.get(k) for k in expected} == expected


def test_default_names_follow_the_precision(calls, checkpoint, capsys):
    main([str(checkpoint), "--fp16", "-q"])
    assert calls.only("export")["path"] == Path("tiny-ckpt-fp16.onnx")
    assert capsys.readouterr().out.splitlines() == ["tiny-ckpt-fp16.onnx"]  # the output is printed


@pytest.mark.parametrize("bad", [["--atol", "logits=1"], ["--atol", "masks_queries_logits=x"], ["--atol", "x"]])
def test_bad_tolerances_are_refused_before_the_export(calls, checkpoint, bad):
    with pytest.raises(InputError, match=r"^--atol "):
        main([str(checkpoint), *bad])
    assert calls == []


def test_atol_messages():
    from m2f_deploy.cli.export import _tolerances

    with pytest.raises(InputError) as e:
        _tolerances(["logits=1"])
    assert str(e.value) == ("--atol logits=1: unknown output 'logits' (outputs: class_queries_logits, "
                            "masks_queries_logits)")  # fmt: skip
    with pytest.raises(InputError) as e:
        _tolerances(["masks_queries_logits=x"])
    assert str(e.value) == "--atol masks_queries_logits=x: 'x' is not a number"


def test_preset_uses_the_seed(calls, monkeypatch):
    seen = []
    monkeypatch.setattr(Mask2Former, "random", staticmethod(lambda config, seed: seen.append((config, seed)) or "RND"))
    assert main(["--preset", "swin-tiny-coco-panoptic", "--seed", "3", "-q"]) == 0
    from m2f_deploy.presets import preset_config

    assert seen == [(preset_config("swin-tiny-coco-panoptic"), 3)]
    kw = calls.only("export")
    assert kw["model"] == "RND" and kw["seed"] == 3 and kw["path"] == Path("swin-tiny-coco-panoptic.onnx")


def test_int8_flags_reach_the_quantization(calls, checkpoint, tmp_path, capsys):
    from m2f_deploy.data import write_dataset

    write_dataset(tmp_path / "calib", 3, seed=1, size=(40, 48))
    images = sorted((tmp_path / "calib" / "images").glob("*.png"))
    argv = [str(checkpoint), "--int8", "--calib", str(tmp_path / "calib" / "images"), "-q"]
    assert main([*argv, "--calib-limit", "2", "--calib-method", "entropy", "--min-agreement", "0.7"]) == 0
    q = calls.only("quantize")
    assert q["images"] == images[:2] and q["method"] == "entropy" and q["min_agreement"] == 0.7
    assert q["target"] == "cpu" and q["path"] == Path("tiny-ckpt-int8.onnx")
    assert q["fp32"] == Path(".tiny-ckpt-int8-fp32.onnx") == calls.only("export")["path"]
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["calib", "tiny-ckpt-int8.onnx"]  # the fp32 graph is gone
    assert capsys.readouterr().err == ""  # -q: no progress
    calls.clear()
    assert main([*argv[:-1], "--calib-limit", "2"]) == 0  # not quiet: one progress line per tenth of the way
    assert capsys.readouterr().err.splitlines()[-2:] == ["1/2 calibration images", "2/2 calibration images"]
    calls.clear()
    assert main([*argv, "--int8-target", "tensorrt", "-o", "q.onnx"]) == 0
    q = calls.only("quantize")
    assert q["images"] == images and q["method"] == "minmax" and q["min_agreement"] == 0.95
    assert q["target"] == "tensorrt" and q["path"] == Path("q.onnx")
    calls.clear()
    assert main([*argv, "--engine", "-o", "e.onnx"]) == 0  # an engine follows: quantized for TensorRT
    assert calls.only("quantize")["target"] == "tensorrt"
    assert calls.only("engine")["path"] == Path("e.onnx") and calls.only("engine")["int8"] is True


def test_int8_from_an_onnx_file(calls, graph, tmp_path):
    from m2f_deploy.data import write_dataset

    write_dataset(tmp_path / "calib", 2, seed=1, size=(40, 48))
    assert main([str(graph), "--int8", "--calib", str(tmp_path / "calib" / "images"), "-q"]) == 0
    q = calls.only("quantize")
    assert q["fp32"] == graph and q["path"] == graph.with_name("g-int8.onnx") and q["target"] == "cpu"
    assert [what for what, _ in calls] == ["quantize"]  # no engine unless asked


ENGINE_DEFAULTS = dict(fp16=False, int8=False, tf32=False, shapes=None, workspace_gib=None, timing_cache=None,
                       plugin_libraries=[], fp32_layers=True)  # fmt: skip


def test_engine_flags_reach_the_build(calls, graph, tmp_path):
    assert main([str(graph)]) == 0  # an .onnx alone: its engine
    assert calls.only("engine") == {"path": graph, "output": None, **ENGINE_DEFAULTS}
    calls.clear()
    shapes = ["1x3x64x64", "2x3x64x64", "4x3x96x96"]
    argv = [str(graph), "-o", "x.engine", "--fp16", "--tf32", "--workspace", "2", "--timing-cache", "t.cache",
            "--plugin-lib", "./p.so", "--plugin-lib", "q.so", "--no-fp32-layers", "--shapes", *shapes]  # fmt: skip
    assert main(argv) == 0
    assert calls.only("engine") == {
        "path": graph, "output": Path("x.engine"), "fp16": True, "int8": False, "tf32": True, "shapes": shapes,
        "workspace_gib": 2.0, "timing_cache": Path("t.cache"), "plugin_libraries": ["./p.so", "q.so"],
        "fp32_layers": False,
    }  # fmt: skip
    calls.clear()
    assert main([str(graph), "--int8"]) == 0
    assert calls.only("engine")["int8"] is True


def test_shapes_are_checked_against_the_graph_the_export_will_write(calls, checkpoint):
    shapes = ["1x3x64x64", "2x3x64x64", "4x3x640x96"]  # other sizes and batches: dynamic axes take them
    assert main([str(checkpoint), "--engine", "--size", "64", "--dynamic-shape", "--shapes", *shapes, "-q"]) == 0
    assert calls.only("engine")["shapes"] == shapes and calls.only("export")["dynamic_hw"] is True


def test_engine_after_an_export(calls, checkpoint):
    assert main([str(checkpoint), "--engine", "--size", "64", "-o", "m.onnx", "--tf32"]) == 0
    assert [what for what, _ in calls] == ["check_tensorrt", "load", "export", "engine"]  # TensorRT looked for first
    assert calls.only("engine") == {"path": Path("m.onnx"), "output": None, **ENGINE_DEFAULTS, "tf32": True}


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tf32"], "--tf32: engine option(s) without an engine build (no engine is built): add --engine"),
        (["--workspace", "1", "--no-fp32-layers"],
         "--workspace, --no-fp32-layers: engine option(s) without an engine build (no engine is built): add --engine"),
        (["--plugin-lib", "a.so", "--timing-cache", "c", "--shapes", "1x3x64x64", "1x3x64x64", "1x3x64x64"],
         "--plugin-lib, --timing-cache, --shapes: engine option(s) without an engine build"),
        (["--engine", "--workspace", "0"], "--workspace must be a positive number of GiB, got 0.0"),
        (["--engine", "--workspace", "nan"], "--workspace must be a positive number of GiB, got nan"),
        (["--engine", "--shapes", "1x3x64x64", "1x3x64x64", "1x3x640x64"],
         "--shapes max 1x3x640x64: the graph's size is fixed at 64x64 (export with --dynamic-shape to vary it)"),
        (["--engine", "--dynamic-shape", "--static-batch", "--shapes", "1x3x64x64", "2x3x64x64", "2x3x640x64"],
         "--shapes opt 2x3x64x64: the graph's batch is fixed at 1 (exported with --static-batch)"),
    ],
)  # fmt: skip
def test_engine_flags_without_a_build_are_errors(calls, checkpoint, capsys, flags, message):
    assert run("m2f-export", main, [str(checkpoint), "--size", "64", *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("m2f-export: error: ")
    assert message in err
    assert calls == []  # refused before anything slow


def test_onnx_input_engine_options(calls, graph, capsys):
    for argv, message in (
        ([str(graph), "--check-tensorrt", "--fp16"], "--fp16: engine option(s) without an engine build "
         "(--check-tensorrt only checks the graph): add --engine"),
        ([str(graph), "--check-tensorrt", "-o", "x.engine"], "-o: engine option(s) without an engine build"),
        ([str(graph), "-o", "x.onnx"], "-o x.onnx: an engine built from g.onnx is written to a .engine file"),
        ([str(graph), "--check-tensorrt", "--tf32", "--fp16", "--int8"],
         "error: --tf32, --fp16, --int8: engine option(s) without an engine build"),
    ):  # fmt: skip
        assert run("m2f-export", main, argv) == 1
        assert message in capsys.readouterr().err
    assert calls == []


def test_check_tensorrt_and_versions(calls, graph, capsys, monkeypatch):
    seen = []
    real = trt_support.check_tensorrt_support
    monkeypatch.setattr(trt_support, "check_tensorrt_support", lambda p, v=None: seen.append((p, v)) or real(p, v))
    assert main([str(graph), "--check-tensorrt", "--trt-version", "10.3", "--trt-version", "11.x"]) == 0
    assert seen == [(graph, ["10.3", "11.x"])] and calls == []  # checked, nothing built
    assert capsys.readouterr().out == real(graph, ["10.3", "11.x"]).format() + "\n"  # the report is printed
    # a refusal: the report printed, exit code 1, nothing built
    refused = SimpleNamespace(ok=False, format=lambda: "THE REPORT")
    monkeypatch.setattr(trt_support, "check_tensorrt_support", lambda p, v=None: refused)
    assert main([str(graph), "--check-tensorrt", "--engine"]) == 1
    assert capsys.readouterr().out == "THE REPORT\n" and calls == []
    with pytest.raises(InputError) as e:
        main([str(graph), "--trt-version", "10.3"])
    assert str(e.value) == "--trt-version is for --check-tensorrt (a build checks for the installed TensorRT)"
    with pytest.raises(InputError, match=r"--trt-plugin-version is for --msda trt_plugin .*not grid_sample"):
        main([str(graph), "--trt-plugin-version", "2"])


def test_a_real_export_carries_the_flags_into_the_graph(checkpoint, tmp_path):
    """The recorded arguments become the file: input dims, opset, metadata (validation skipped: --no-validate)."""
    out = tmp_path / "m.onnx"
    assert main([str(checkpoint), "--size", "64", "96", "--batch", "2", "--static-batch", "--opset", "18",
                 "--msda", "gather", "--no-validate", "-q", "-o", str(out)]) == 0  # fmt: skip
    graph = onnx.load(str(out), load_external_data=False)
    shape = graph.graph.input[0].type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in shape.dim]
    assert dims == [2, 3, 64, 96]
    assert {o.domain: o.version for o in graph.opset_import}[""] == 18
    meta = read_onnx_metadata(out)
    assert meta["input"]["batch"] == 2 and meta["input"]["dynamic_batch"] is False
    assert (meta["input"]["height"], meta["input"]["width"], meta["input"]["dynamic_hw"]) == (64, 96, False)
    assert meta["msda"] == "gather" and meta["exporter"]["opset"] == 18
    assert json.loads(graph.metadata_props[0].value)["precision"] == "fp32"


def test_usage_as_the_readme_documents_it(capsys):
    from m2f_deploy.cli.export import build_parser

    usage = build_parser().format_help()
    assert usage.startswith("usage: m2f-export ")
    for shown in ("--size H [W ...]", "--atol OUTPUT=TOL", "--calib DIR", "--calib-limit N", "--workspace GIB",
                  "--shapes MIN OPT MAX", "INT8 (QDQ) quantization:", "TensorRT engine (needs TensorRT and a GPU):",
                  "static TensorRT check (no TensorRT needed):", "--min-agreement SHARE", "--plugin-lib SO",
                  "--trt-version X.Y", "--trt-plugin-version {1,2}", "--int8-target {cpu,tensorrt}"):  # fmt: skip
        assert shown in usage, shown
    from m2f_deploy.cli.common import run

    assert run("m2f-export", main, ["--size", "64"]) == 1  # a checkpoint or a preset is required
    assert capsys.readouterr().err == "m2f-export: error: one of the arguments checkpoint --preset is required\n"


def test_calibration_flag_messages(calls, checkpoint, graph, tmp_path):
    with pytest.raises(InputError) as e:
        main([str(graph), "--int8-target", "cpu"])
    assert str(e.value) == "--int8-target is for --int8 --calib DIR (it says how the graph is quantized)"
    with pytest.raises(InputError) as e:
        main([str(checkpoint), "--calib", str(tmp_path)])
    assert str(e.value) == "--calib is for --int8 (calibration images of the INT8 quantization)"


def test_a_workspace_below_one_gib_is_taken(calls, graph):
    assert main([str(graph), "--workspace", "0.5"]) == 0
    assert calls.only("engine")["workspace_gib"] == 0.5


def test_source_flag_messages_before_anything_slow(calls, checkpoint):
    from PIL import Image

    Image.new("RGB", (8, 8)).save("one.png")
    fp16 = "--int8 and --fp16: the INT8 graph is quantized from fp32 (give one of them)"
    for argv, message in (
        (["--int8"], "--int8 from a checkpoint needs calibration images: --calib DIR"),
        (["--int8", "--fp16", "--calib", "."], fp16),
        (["--msda", "deform_conv", "--dynamic-shape"], "needs a static size"),
    ):  # fmt: skip
        with pytest.raises(InputError) as e:
            main([str(checkpoint), *argv])
        assert message in str(e.value) and (message == str(e.value) or "static" in message)
    assert calls == []
    assert main([str(checkpoint), "--msda", "deform_conv", "-q"]) == 0  # its opset (19) chosen by default
    assert calls.only("export")["msda"] == "deform_conv"


def test_check_tensorrt_after_an_export(calls, checkpoint, monkeypatch, capsys):
    seen = []
    refused = SimpleNamespace(ok=False, format=lambda: "THE REPORT")
    monkeypatch.setattr(trt_support, "check_tensorrt_support", lambda p, v=None: seen.append((p, v)) or refused)
    assert main([str(checkpoint), "-o", "m.onnx", "--check-tensorrt", "--trt-version", "10.3", "-q"]) == 1
    assert seen == [(Path("m.onnx"), ["10.3"])] and capsys.readouterr().out == "m.onnx\nTHE REPORT\n"
