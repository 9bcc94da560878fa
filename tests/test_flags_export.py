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


# --- the flags of fused heads, uint8 input, model-zoo checkpoints and Triton repositories (recorders, no exports) ---


def test_parser_defaults_types_and_choices(capsys):
    from m2f_deploy.cli.export import build_parser

    p = build_parser()
    a = p.parse_args(["--preset", "x"])
    assert (a.heads, a.head_size, a.input_dtype, a.zoo_config, a.num_queries, a.labels) == (
        "raw", None, "float32", None, None, None)  # fmt: skip
    assert (a.triton_repo, a.triton_instances, a.triton_device, a.triton_max_batch) == (None, None, None, None)
    a = p.parse_args(["--preset", "x", "--heads", "panoptic", "--head-size", "32", "48", "--input", "uint8",
                      "--labels", "l.json", "--num-queries", "5", "--triton-repo", "r", "--triton-instances", "2",
                      "--triton-device", "cpu", "--triton-max-batch", "4"])  # fmt: skip
    assert (a.heads, a.head_size, a.input_dtype, a.labels, a.num_queries) == ("panoptic", [32, 48], "uint8",
                                                                              Path("l.json"), 5)  # fmt: skip
    assert (a.triton_repo, a.triton_instances, a.triton_device, a.triton_max_batch) == (Path("r"), 2, "cpu", 4)
    for heads in ("raw", "semantic", "instance", "panoptic"):
        assert p.parse_args(["--preset", "x", "--heads", heads]).heads == heads
    assert p.parse_args(["--preset", "x", "--input", "float32"]).input_dtype == "float32"
    assert p.parse_args(["--preset", "x", "--triton-device", "gpu"]).triton_device == "gpu"
    for flags, message in (
        (["--heads", "logits"], "argument --heads: invalid choice: 'logits' (choose from raw, semantic, instance, "
         "panoptic)"),
        (["--input", "int8"], "argument --input: invalid choice: 'int8' (choose from float32, uint8)"),
        (["--triton-device", "tpu"], "argument --triton-device: invalid choice: 'tpu' (choose from gpu, cpu)"),
        (["--head-size", "32", "x"], "argument --head-size: invalid int value: 'x'"),
        (["--triton-max-batch", "x"], "argument --triton-max-batch: invalid int value: 'x'"),
    ):  # fmt: skip
        assert run("m2f-export", main, ["--preset", "x", *flags]) == 1
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and message.replace("'", "") in err.replace("'", ""), err
    usage = p.format_help()
    for shown in ("original (detectron2) checkpoints: model_final.pkl / .pth:", "--zoo-config NAME", "--labels JSON",
                  "--num-queries N", "--head-size H W", "--heads {raw,semantic,instance,panoptic}",
                  "--input {float32,uint8}", "--triton-repo DIR", "--triton-device {gpu,cpu}", "--triton-max-batch N",
                  "--triton-instances N",
                  "Triton Inference Server model repository (also from an existing .onnx or .engine):"):  # fmt: skip
        assert shown in usage, shown


def test_head_and_input_flags_reach_the_export(calls, checkpoint):
    assert main([str(checkpoint), "--size", "64", "--heads", "semantic", "--head-size", "32", "48", "-q"]) == 0
    kw = calls.only("export")
    assert kw["path"] == Path("tiny-ckpt-semantic.onnx") and kw["heads"] == "semantic"
    assert kw["head_size"] == [32, 48] and kw["input_dtype"] == "float32" and "trt_plugin_version" not in kw
    calls.clear()
    assert main([str(checkpoint), "--size", "64", "--input", "uint8", "-q"]) == 0
    kw = calls.only("export")
    assert kw["path"] == Path("tiny-ckpt-uint8.onnx") and kw["input_dtype"] == "uint8" and kw["heads"] == "raw"
    assert kw["head_size"] is None
    calls.clear()
    assert main([str(checkpoint), "--size", "64", "--input", "uint8", "--heads", "panoptic", "--fp16", "-q"]) == 0
    assert calls.only("export")["path"] == Path("tiny-ckpt-panoptic-uint8-fp16.onnx")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--head-size", "8", "8"], "--head-size is for --heads semantic|instance|panoptic (the size of their maps)"),
        (["--heads", "semantic", "--engine"], "--heads / --input uint8 with --engine: engines of such graphs are not "
         "built yet (their extra inputs need profiles); run the .onnx with backend ort-tensorrt"),
        (["--input", "uint8", "--engine"], "--heads / --input uint8 with --engine: engines of such graphs are not "
         "built yet (their extra inputs need profiles); run the .onnx with backend ort-tensorrt"),
        (["--heads", "instance", "--dynamic-shape"],
         "--heads instance needs a static input size (the maps' size is fixed): drop --dynamic-shape"),
        (["--heads", "semantic", "--int8", "--calib", "."],
         "--heads semantic with --int8 is not supported yet: export the INT8 graph with --heads raw"),
        (["--heads", "semantic", "--head-size", "0", "8"], "--head-size [0, 8]: give a positive height and width"),
        (["--input", "uint8", "--dynamic-shape"],
         "--input uint8 needs a static size and is not combined with --int8 yet: drop --dynamic-shape / --int8"),
        (["--input", "uint8", "--int8", "--calib", "."],
         "--input uint8 needs a static size and is not combined with --int8 yet: drop --dynamic-shape / --int8"),
        (["--num-queries", "5"], "--num-queries and --labels override a --zoo-config (give one)"),
        (["--labels", "l.json"], "--num-queries and --labels override a --zoo-config (give one)"),
        (["--triton-instances", "2", "--triton-max-batch", "3"],
         "--triton-instances, --triton-max-batch: option(s) of the Triton repository without --triton-repo DIR"),
        (["--triton-device", "cpu"], "--triton-device: option(s) of the Triton repository without --triton-repo DIR"),
    ],
)  # fmt: skip
def test_head_input_zoo_triton_refusals(calls, checkpoint, capsys, flags, message):
    from PIL import Image

    Image.new("RGB", (8, 8)).save("one.png")
    assert run("m2f-export", main, [str(checkpoint), "--size", "64", *flags]) == 1
    assert capsys.readouterr().err == f"m2f-export: error: {message}\n"
    assert calls == []


@pytest.fixture
def zoo(calls, monkeypatch):
    """load_model and the model-zoo lookup recorded: what reaches them from --zoo-config / --num-queries / --labels."""
    import m2f_deploy.zoo

    def fake_zoo(name, **kw):
        calls.append(("zoo", {"name": name, **kw}))
        return "ZOO"

    monkeypatch.setattr(m2f_deploy.zoo, "zoo_config", fake_zoo)
    monkeypatch.setattr(m2f_deploy, "load_model", lambda path, **kw: calls.append(("load", {"path": path, **kw})) or "M")
    Path("model_final.pkl").write_bytes(b"")
    return calls


def test_zoo_flags_reach_the_lookup_and_the_load(zoo):
    assert main(["model_final.pkl", "--zoo-config", "coco/x", "--size", "64", "-q"]) == 0
    assert zoo.only("zoo") == {"name": "coco/x", "num_queries": None, "id2label": None}
    assert zoo.only("load") == {"path": "model_final.pkl", "zoo_config": "ZOO"}
    assert zoo.only("export")["path"] == Path("model_final.onnx")  # the file's stem names the output
    zoo.clear()
    Path("names.json").write_text(json.dumps(["cat", "dög"]), encoding="utf-8")
    argv = ["model_final.pkl", "--zoo-config", "c", "--num-queries", "7", "--labels", "names.json", "-o", "m.onnx"]
    assert main([*argv, "-q"]) == 0
    assert zoo.only("zoo") == {"name": "c", "num_queries": 7, "id2label": {0: "cat", 1: "dög"}}


@pytest.mark.parametrize(
    "content,why",
    [
        (None, "not a readable JSON file"),
        ("[1", "not a readable JSON file"),
        ('{"0": "cat"}', "expected a JSON list of class names"),
        ("[]", "expected a JSON list of class names"),
        ('["cat", 2]', "expected a JSON list of class names"),
        ('[2, "cat"]', "expected a JSON list of class names"),
    ],
)
def test_labels_file_refusals(zoo, capsys, content, why):
    if content is not None:
        Path("l.json").write_text(content, encoding="utf-8")
    assert run("m2f-export", main, ["model_final.pkl", "--zoo-config", "c", "--labels", "l.json"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"m2f-export: error: --labels l.json: {why}") and len(err.splitlines()) == 1
    if content is not None and why.startswith("expected"):
        assert err == f"m2f-export: error: --labels l.json: {why}\n"
    assert zoo == []


def test_zoo_config_only_for_original_checkpoints(zoo, graph, capsys):
    message = "m2f-export: error: --zoo-config is for an original (detectron2) .pkl / .pth checkpoint\n"
    assert run("m2f-export", main, ["--preset", "swin-tiny-coco-panoptic", "--zoo-config", "c"]) == 1
    assert capsys.readouterr().err == message
    assert zoo == []
    # an exported graph or engine never reads them: refused, not ignored (the .onnx route returned before the check)
    for artifact in (str(graph), "model.engine"):
        for flags, named in ((["--zoo-config", "c"], "--zoo-config"), (["--num-queries", "50"], "--num-queries"),
                             (["--labels", "l.json", "--num-queries", "5"], "--num-queries / --labels")):  # fmt: skip
            assert run("m2f-export", main, [artifact, *flags, "--triton-repo", "r"]) == 1
            err = capsys.readouterr().err
            assert err.startswith(f"m2f-export: error: {named}: for an original (detectron2) .pkl / .pth checkpoint, "
                                  f"not for {artifact}") and err.count("\n") == 1, err
    assert zoo == [] and not Path("r").exists()


@pytest.fixture
def repo(calls, monkeypatch):
    """The Triton repository writer recorded (its own tests are tests/test_serve*.py)."""
    from m2f_deploy.serve import repository

    def fake_write(artifact, out, options):
        calls.append(("repo", {"artifact": artifact, "out": out, "options": options}))
        return Path(out)

    monkeypatch.setattr(repository, "write_repository", fake_write)
    return calls


def test_triton_flags_reach_the_repository(repo, checkpoint, graph, capsys):
    from m2f_deploy.serve.repository import RepoOptions

    assert main([str(checkpoint), "--size", "64", "-o", "m.onnx", "--triton-repo", "r"]) == 0
    assert repo.only("repo") == {"artifact": Path("m.onnx"), "out": Path("r"), "options": RepoOptions()}
    assert capsys.readouterr().out.splitlines() == ["m.onnx", "r"]
    repo.clear()
    argv = ["--triton-repo", "r2", "--triton-instances", "3", "--triton-device", "cpu", "--triton-max-batch", "5"]
    assert main([str(checkpoint), "--size", "64", "-o", "m.onnx", "--engine", *argv]) == 0
    assert repo.only("repo") == {"artifact": "E", "out": Path("r2"),
                                 "options": RepoOptions(instances=3, device="cpu", max_batch=5)}  # fmt: skip
    repo.clear()
    assert main([str(graph), "--triton-repo", "r3", "--triton-max-batch", "2"]) == 0  # no engine unless asked
    assert repo == [("repo", {"artifact": graph, "out": Path("r3"), "options": RepoOptions(max_batch=2)})]
    repo.clear()
    assert main([str(graph), "--triton-repo", "r4", "--engine", "-o", "g.engine"]) == 0
    assert repo.only("repo")["artifact"] == Path("E") and repo.only("engine")["output"] == Path("g.engine")
    repo.clear()
    Path("x.engine").write_bytes(b"")
    assert main(["x.engine", "--triton-repo", "r5", "--triton-instances", "2"]) == 0
    assert repo == [("repo", {"artifact": Path("x.engine"), "out": Path("r5"), "options": RepoOptions(instances=2)})]


def test_triton_refusals(repo, capsys):
    Path("x.engine").write_bytes(b"")
    Path("full").mkdir()
    Path("full/f").write_bytes(b"")
    for argv, message in (
        (["x.engine"], "x.engine: an engine is already built; an .engine input is for --triton-repo DIR"),
        (["x.engine", "--triton-repo", "full"], "--triton-repo full: exists and is not an empty folder (give a new "
         "one)"),
        (["x.engine", "--triton-repo", "r", "--triton-instances", "0"], "--triton-instances 0: at least 1"),
    ):  # fmt: skip
        assert run("m2f-export", main, argv) == 1
        assert capsys.readouterr().err == f"m2f-export: error: {message}\n"
    assert repo == []


def reported(argv):
    """main's exit code; an interrupt it lets through (instead of reporting) fails the test, not the whole run."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("the interrupt was not reported")


def test_an_interrupt_lists_what_was_written(calls, checkpoint, monkeypatch, capsys):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(tensorrt, "build_engine", interrupted)
    assert reported([str(checkpoint), "--size", "64", "-o", "m.onnx", "--engine", "-q"]) == 130
    assert capsys.readouterr().err == ("m2f-export: interrupted; written (complete): m.onnx; the steps after it were "
                                       "not finished\n")  # fmt: skip
    from m2f_deploy.serve import repository

    monkeypatch.setattr(tensorrt, "build_engine", lambda path, output=None, **kw: "m.engine")
    monkeypatch.setattr(repository, "write_repository", interrupted)
    assert reported([str(checkpoint), "--size", "64", "-o", "n.onnx", "--engine", "--triton-repo", "r", "-q"]) == 130
    assert capsys.readouterr().err == ("m2f-export: interrupted; written (complete): n.onnx, m.engine; the steps "
                                       "after it were not finished\n")  # fmt: skip
    monkeypatch.setattr(export_pkg, "export_onnx", interrupted)
    with pytest.raises(KeyboardInterrupt):  # nothing written: cli.common.run says so
        main([str(checkpoint), "--size", "64", "-o", "m.onnx"])


def test_an_interrupt_after_a_quantization_or_an_engine_from_an_onnx(calls, graph, monkeypatch, capsys, tmp_path):
    from m2f_deploy.data import write_dataset

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    import m2f_deploy.artifact as artifact

    write_dataset(tmp_path / "calib", 1, seed=1, size=(40, 48))
    monkeypatch.setattr(artifact, "read_onnx_metadata", lambda p: {"fused_heads": []})  # the recorded "q.onnx"
    monkeypatch.setattr(tensorrt, "build_engine", interrupted)
    argv = [str(graph), "--int8", "--calib", str(tmp_path / "calib" / "images"), "-q", "--engine"]
    assert reported([*argv, "-o", "q.onnx"]) == 130
    assert capsys.readouterr().err == ("m2f-export: interrupted; written (complete): q.onnx; the steps after it were "
                                       "not finished\n")  # fmt: skip
    from m2f_deploy.serve import repository

    monkeypatch.setattr(tensorrt, "build_engine", lambda path, output=None, **kw: calls.append(output) or "g.engine")
    monkeypatch.setattr(repository, "write_repository", interrupted)
    assert reported([*argv, "--triton-repo", "r"]) == 130
    assert calls[-1] is None  # the quantized graph's engine: named after it
    assert capsys.readouterr().err == (f"m2f-export: interrupted; written (complete): {graph.with_name('g-int8.onnx')}"
                                       ", g.engine; the steps after it were not finished\n")  # fmt: skip


def test_the_fp32_graph_and_its_weights_are_removed_after_the_quantization(calls, checkpoint, monkeypatch, tmp_path):
    from m2f_deploy.data import write_dataset

    def export_with_data(model, path, **kw):
        Path(path).write_bytes(b"graph")
        Path(str(path) + ".data").write_bytes(b"weights")

    monkeypatch.setattr(export_pkg, "export_onnx", export_with_data)
    write_dataset(tmp_path / "calib", 1, seed=1, size=(40, 48))
    assert main([str(checkpoint), "--int8", "--calib", str(tmp_path / "calib" / "images"), "-q", "-o", "q.onnx"]) == 0
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["calib", "q.onnx"]


def test_stale_temporaries_are_reported_with_their_size(tmp_path, caplog):
    from m2f_deploy.cli.export import report_stale_temporaries

    (tmp_path / ".m2f-trt-1" / "sub").mkdir(parents=True)
    (tmp_path / ".m2f-trt-1" / "sub" / "w").write_bytes(b"x" * 300_000)
    (tmp_path / ".m-fp32.onnx").write_bytes(b"x" * 200_000)
    (tmp_path / "kept.onnx").write_bytes(b"x")
    with caplog.at_level("WARNING", logger="m2f_deploy.cli"):
        found = report_stale_temporaries(tmp_path)
    assert found == [tmp_path / ".m-fp32.onnx", tmp_path / ".m2f-trt-1"]
    assert caplog.messages == [f"{tmp_path}: 2 temporary item(s) (0.5 MB) left by an interrupted m2f-export: "
                               ".m-fp32.onnx, .m2f-trt-1; remove them unless another m2f-export is running there"]


def test_atol_splits_at_the_first_equals_sign():
    from m2f_deploy.cli.export import _tolerances

    with pytest.raises(InputError) as e:
        _tolerances(["masks_queries_logits=1=2"])
    assert str(e.value) == "--atol masks_queries_logits=1=2: '1=2' is not a number"


def test_no_engine_of_a_fused_head_graph(calls, graph, monkeypatch, capsys):
    import m2f_deploy.artifact as artifact

    real = artifact.read_onnx_metadata
    monkeypatch.setattr(artifact, "read_onnx_metadata", lambda p: {**real(p), "fused_heads": ["semantic"]})
    assert run("m2f-export", main, [str(graph)]) == 1
    assert capsys.readouterr().err == (f"m2f-export: error: {graph}: has a fused head; engines of fused-head graphs are "
                                       "not built yet (their threshold inputs need profiles): run it with backend "
                                       "ort-tensorrt\n")  # fmt: skip
    assert calls == []


@pytest.fixture
def fuse(calls, monkeypatch):
    """The graph rewrites of an .onnx input recorded (their own tests: tests/test_heads.py, tests/test_uint8_input.py)."""
    from m2f_deploy.export import heads, uint8_input

    def fake_fuse(source, path, head, **kw):
        assert Path(source).is_file()
        calls.append(("fuse", {"source": source, "path": path, "head": head, **kw}))
        Path(path).write_bytes(b"fused")
        return Path(path)

    def fake_uint8(source, path, **kw):
        assert Path(source).is_file()
        calls.append(("uint8", {"source": source, "path": path, **kw}))
        Path(path).write_bytes(b"uint8")
        return Path(path)

    monkeypatch.setattr(heads, "fuse_onnx", fake_fuse)
    monkeypatch.setattr(uint8_input, "uint8_onnx", fake_uint8)
    return calls


def test_heads_and_input_on_an_onnx_rewrite_it(fuse, graph, capsys, tmp_path):
    assert main([str(graph), "--heads", "semantic"]) == 0
    assert fuse == [("fuse", {"source": graph, "path": graph.with_name("g-semantic.onnx"), "head": "semantic",
                              "head_size": None, "validate": True, "seed": 0})]  # fmt: skip
    assert capsys.readouterr().out == f"{graph.with_name('g-semantic.onnx')}\n"
    fuse.clear()
    assert main([str(graph), "--input", "uint8", "-o", "u.onnx", "--no-validate", "--seed", "4"]) == 0
    assert fuse == [("uint8", {"source": graph, "path": Path("u.onnx"), "validate": False, "seed": 4})]
    assert capsys.readouterr().out == "u.onnx\n"
    fuse.clear()
    assert main([str(graph), "--heads", "panoptic", "--input", "uint8", "--head-size", "8", "16", "--seed", "2"]) == 0
    f, u = fuse.only("fuse"), fuse.only("uint8")
    out = graph.with_name("g-panoptic-uint8.onnx")
    assert f["source"] == graph and f["head"] == "panoptic" and f["head_size"] == [8, 16] and f["seed"] == 2
    assert f["path"].name == out.name and f["path"].parent.parent == graph.parent and f["validate"] is True
    assert f["path"].parent.name.startswith(".m2f-export-") and not f["path"].parent.exists()  # removed after
    assert u == {"source": f["path"], "path": out, "validate": True, "seed": 2}
    assert capsys.readouterr().out == f"{out}\n"
    fuse.clear()
    assert main([str(graph), "--input", "uint8"]) == 0
    assert fuse.only("uint8")["validate"] is True and fuse.only("uint8")["seed"] == 0
    assert fuse.only("uint8")["path"] == graph.with_name("g-uint8.onnx")  # the default name: no head suffix
    fuse.clear()
    assert main([str(graph), "--heads", "instance", "-o", "i.onnx", "--no-validate", "--seed", "3",
                 "--head-size", "4", "4"]) == 0  # fmt: skip
    assert fuse == [("fuse", {"source": graph, "path": Path("i.onnx"), "head": "instance", "head_size": [4, 4],
                              "validate": False, "seed": 3})]  # fmt: skip


def test_a_rewritten_onnx_is_checked_and_put_in_a_repository(fuse, graph, monkeypatch, capsys):
    from m2f_deploy.serve import repository
    from m2f_deploy.serve.repository import RepoOptions

    monkeypatch.setattr(repository, "write_repository", lambda a, o, opt: fuse.append(("repo", (a, o, opt))) or o)
    assert main([str(graph), "--heads", "semantic", "-o", "s.onnx", "--triton-repo", "r",
                 "--triton-device", "cpu"]) == 0  # fmt: skip
    assert fuse.only("repo") == (Path("s.onnx"), Path("r"), RepoOptions(device="cpu"))
    assert capsys.readouterr().out == "s.onnx\nr\n"
    fuse.clear()
    refused = SimpleNamespace(ok=False, format=lambda: "THE REPORT")
    seen = []
    monkeypatch.setattr(trt_support, "check_tensorrt_support", lambda p, v=None: seen.append((p, v)) or refused)
    assert main([str(graph), "--heads", "semantic", "-o", "t.onnx", "--check-tensorrt", "--trt-version", "10.3",
                 "--triton-repo", "r2"]) == 1  # fmt: skip
    assert seen == [(Path("t.onnx"), ["10.3"])] and capsys.readouterr().out == "t.onnx\nTHE REPORT\n"
    assert [what for what, _ in fuse] == ["fuse"]  # refused: not put in the repository
    fuse.clear()
    monkeypatch.setattr(trt_support, "check_tensorrt_support", lambda p, v=None: SimpleNamespace(ok=True, format=str))
    assert main([str(graph), "--heads", "semantic", "-o", "v.onnx", "--check-tensorrt"]) == 0


def test_rewrite_refusals(fuse, graph, capsys, tmp_path):
    message = "--heads / --input on an .onnx: writes the rewritten .onnx only (no --engine, --int8, --calib)"
    for flags in (["--engine"], ["--int8"], ["--calib", str(tmp_path)]):
        assert run("m2f-export", main, [str(graph), "--heads", "semantic", *flags]) == 1
        assert capsys.readouterr().err == f"m2f-export: error: {message}\n"
    Path("folder.onnx").mkdir()
    assert run("m2f-export", main, [str(graph), "--input", "uint8", "-o", "folder.onnx"]) == 1
    assert capsys.readouterr().err == ("m2f-export: error: folder.onnx: is a folder; give a file name such as "
                                       "folder.onnx/model.onnx\n")  # fmt: skip
    assert fuse == []


def test_an_interrupted_rewrite_reports_its_output(fuse, graph, monkeypatch, capsys):
    from m2f_deploy.serve import repository

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(repository, "write_repository", interrupted)
    assert reported([str(graph), "--heads", "semantic", "-o", "s.onnx", "--triton-repo", "r"]) == 130
    assert capsys.readouterr().err == ("m2f-export: interrupted; written (complete): s.onnx; the steps after it were "
                                       "not finished\n")  # fmt: skip


def test_a_full_disk_during_a_rewrite_is_one_error(fuse, graph, monkeypatch, capsys):
    import errno

    from m2f_deploy.export import heads

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(heads, "fuse_onnx", full)
    assert run("m2f-export", main, [str(graph), "--heads", "semantic", "-o", "s.onnx"]) == 1
    assert capsys.readouterr().err == "m2f-export: error: -o s.onnx: cannot write (No space left on device); nothing " \
                                      "was written\n"


def test_head_size_without_a_head_on_an_onnx_is_refused(fuse, graph, capsys):
    message = "m2f-export: error: --head-size is for --heads semantic|instance|panoptic (the size of their maps)\n"
    for flags in ([], ["--input", "uint8"]):  # an engine build or the uint8 rewrite would ignore it
        assert run("m2f-export", main, [str(graph), "--head-size", "8", "8", *flags]) == 1
        assert capsys.readouterr().err == message
    assert fuse == []


def test_a_full_disk_during_an_export_or_a_quantization_is_one_error(calls, checkpoint, graph, monkeypatch, capsys,
                                                                      tmp_path):  # fmt: skip
    import errno

    from m2f_deploy.data import write_dataset

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_pkg, "export_onnx", full)
    assert run("m2f-export", main, [str(checkpoint), "--size", "64", "-o", "m.onnx", "-q"]) == 1
    assert capsys.readouterr().err == "m2f-export: error: -o m.onnx: cannot write (No space left on device); " \
                                      "nothing was written\n"
    monkeypatch.setattr(int8, "quantize_int8", full)
    write_dataset(tmp_path / "calib", 1, seed=1, size=(40, 48))
    argv = [str(graph), "--int8", "--calib", str(tmp_path / "calib" / "images"), "-q", "-o", "q.onnx"]
    assert run("m2f-export", main, argv) == 1
    assert capsys.readouterr().err == "m2f-export: error: -o q.onnx: cannot write (No space left on device); " \
                                      "nothing was written\n"
