"""TensorRT: what can be checked without it on every machine (profiles, fp32 layer choice, sidecar checks, errors,
and the build and run code under the real Polygraphy over a fake TensorRT 10.3 / 10.12 / 11.1: the config it
builds, plugins, buffers, timing cache, sidecar, CLI flags); an engine built from the tiny model and compared with
onnxruntime where TensorRT and a GPU are present."""

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
    missing = [m for m in ("tensorrt", "polygraphy") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'm2f-deploy[gpu]')"
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
        with pytest.raises(InputError, match="has batch 4: model.engine takes 1..3"):
            trt.infer(np.zeros((4, 3, 64, 96), np.float32))


# -- the build and run code on a fake TensorRT, under the real Polygraphy ------------------------------------------
import ctypes  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402

import fake_tensorrt  # noqa: E402

from m2f_deploy.runtime import cuda as runtime_cuda  # noqa: E402
from m2f_deploy.runtime import tensorrt as runtime_tensorrt  # noqa: E402
from m2f_deploy.runtime import trt_api  # noqa: E402

PINNED = sorted(name for name, _, _, pinned in fake_tensorrt.graph_layers(int8=True) if pinned)
SHAPES = ["1x3x64x96", "2x3x64x96", "3x3x64x96"]


def _polygraphy_lazy_trt():
    """Polygraphy's modules import TensorRT lazily, each through its own LazyModule: forget what they imported."""
    import polygraphy.backend.trt  # noqa: F401  (loads config, loader, profile, util, runner)
    from polygraphy.backend.trt import util as trt_util

    for name, module in list(sys.modules.items()):
        lazy = getattr(module, "trt", None) if name.startswith("polygraphy") else None
        if lazy is not None and type(lazy).__name__ == "LazyModule":
            object.__setattr__(lazy, "module", None)
    trt_util.TRT_LOGGER = None


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a fake ``tensorrt`` of a given version for Polygraphy and our code; a fake GPU and CUDA helpers."""
    loaded = []

    def install(version="10.3.0", **kwargs):
        module = fake_tensorrt.make(version, **kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        _polygraphy_lazy_trt()
        cuda = fake_tensorrt.make_cuda(module)
        monkeypatch.setattr(runtime_tensorrt, "polygraphy_cuda", lambda: cuda)
        monkeypatch.setattr(runtime_cuda, "gpu_info", lambda device=0: runtime_cuda.GpuInfo("Fake GPU", "8.9"))
        real_cdll = ctypes.CDLL

        def cdll(name, *args, **kwargs):  # plugin libraries, in the order they are loaded
            module.calls.append(("load", str(name)))
            loaded.append(str(name))
            return real_cdll(name, *args, **kwargs)

        monkeypatch.setattr(ctypes, "CDLL", cdll)
        return module

    yield install
    _polygraphy_lazy_trt()


def with_precision(onnx_path, out, precision, int8_target="tensorrt"):
    """A copy of ``onnx_path`` whose metadata says ``precision`` (the fake parser does not read the graph)."""
    model = onnx.load(str(onnx_path))
    for prop in model.metadata_props:
        if prop.key == "m2f_deploy":
            meta = json.loads(prop.value)
            meta["precision"] = precision
            if precision == "int8":
                meta.setdefault("exporter", {})["int8"] = {"target": int8_target}
            prop.value = json.dumps(meta)
    onnx.save(model, str(out))
    return out


def build(tiny_onnx, tmp_path, **kwargs):
    from m2f_deploy.export.tensorrt import build_engine

    engine = build_engine(tiny_onnx, tmp_path / "model.engine", shapes=SHAPES, **kwargs)
    return engine, read_engine_metadata(engine)["tensorrt"]


def built_config(module):
    (_, network, config), = [c for c in module.calls if c[0] == "build"]
    return network, config


def flag_names(module, config):
    return sorted(name for name, flag in module.BuilderFlag.__members__.items() if config.get_flag(flag))


@pytest.mark.parametrize("version", ["10.3.0", "10.12.0", "11.1.0"])
def test_trt_api_picks_typing_per_version(fake_trt, version):
    trt = fake_trt(version)
    strong = version != "10.3.0"
    assert trt_api.version(trt) == tuple(int(p) for p in version.split(".")[:2])
    assert trt_api.strongly_typed(trt) is strong
    assert trt_api.strongly_typed_network_flag(trt) is strong
    assert trt_api.can_pin_layers(trt) is (version != "11.1.0")  # the API; we pin only on weak builds
    assert trt_api.has_weak_typing(trt) is (version != "11.1.0")
    assert trt_api.numpy_dtype(trt, trt.float16) == np.float16


def test_trt_api_on_11_without_the_strongly_typed_flag(fake_trt):
    import enum

    trt = fake_trt("11.1.0")
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", ["OTHER"], start=0)
    assert trt_api.strongly_typed(trt) and not trt_api.strongly_typed_network_flag(trt)  # always strong; no flag


def test_weakly_typed_fp16_build_on_10_3_pins_fp32_layers_but_never_casts(fake_trt, tiny_onnx, tmp_path):
    trt = fake_trt("10.3.0")
    engine, built = build(tiny_onnx, tmp_path, fp16=True, workspace_gib=2)
    network, config = built_config(trt)
    assert flag_names(trt, config) == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]  # TF32 cleared
    assert not network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    pinned = sorted(layer.name for layer in network if layer.precision_is_set)
    assert pinned == sorted(n for n, _, _, p in fake_tensorrt.graph_layers() if p)
    assert all(layer.output_types == {0: trt.float32} for layer in network if layer.precision_is_set)
    casts = [layer for layer in network if layer.type in (trt.LayerType.CAST, trt.LayerType.IDENTITY)]
    assert casts and not any(c.precision_is_set or c.output_types for c in casts)
    (profile,) = config.profiles
    assert profile.shapes["pixel_values"] == ((1, 3, 64, 96), (2, 3, 64, 96), (3, 3, 64, 96))
    assert config.pools == {trt.MemoryPoolType.WORKSPACE: 2 << 30}
    assert built["flags"] == {"tf32": False, "fp16": True, "int8": False, "strongly_typed": False}
    assert built["builder_flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    assert sorted(built["pinned_fp32_layers"]) == pinned
    assert built["version"] == "10.3.0" and built["gpu"] == "Fake GPU" and built["compute_capability"] == "8.9"
    assert built["profile"] == {"min": [1, 3, 64, 96], "opt": [2, 3, 64, 96], "max": [3, 3, 64, 96]}
    assert read_engine_metadata(engine)["precision"] == "fp16"
    assert engine.read_bytes() == b"ENGINE 10.3.0"


def test_fp32_build_sets_no_precision_flag_and_tf32_only_when_asked(fake_trt, tiny_onnx, tmp_path):
    trt = fake_trt("10.3.0")
    _, built = build(tiny_onnx, tmp_path)
    network, config = built_config(trt)
    assert flag_names(trt, config) == [] and built["pinned_fp32_layers"] == []
    assert not any(layer.precision_is_set for layer in network)
    trt.calls.clear()
    _, built = build(tiny_onnx, tmp_path, tf32=True)
    assert flag_names(trt, built_config(trt)[1]) == ["TF32"]
    assert built["flags"]["tf32"] is True and built["builder_flags"] == ["TF32"]


def test_no_fp32_layers_pins_nothing(fake_trt, tiny_onnx, tmp_path):
    trt = fake_trt("10.3.0")
    _, built = build(tiny_onnx, tmp_path, fp16=True, fp32_layers=False)
    assert flag_names(trt, built_config(trt)[1]) == ["FP16"] and built["pinned_fp32_layers"] == []


@pytest.mark.parametrize("version", ["10.12.0", "11.1.0"])
def test_strongly_typed_fp16_build_takes_the_fp16_graph(fake_trt, tiny_onnx, tmp_path, version):
    """10.12+ and 11: no precision flag (11 has none: Polygraphy would fail on fp16=True), no pinning; --fp16 on
    an fp32 graph first makes the fp16 graph (and builds from it), an fp16 graph is built as it is."""
    trt = fake_trt(version)
    before = tiny_onnx.read_bytes()
    engine, built = build(tiny_onnx, tmp_path, fp16=True)
    network, config = built_config(trt)
    assert flag_names(trt, config) == []
    assert network.get_flag(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    (parsed,) = [c[1:] for c in trt.calls if c[0] == "parse"]
    assert parsed[0].endswith("model-fp16.onnx") and parsed[1] > 10  # the converter's casts to float16
    assert tiny_onnx.read_bytes() == before  # the fp32 graph itself was not touched
    assert built["flags"] == {"tf32": False, "fp16": True, "int8": False, "strongly_typed": True}
    assert built["pinned_fp32_layers"] == [] and built["onnx"]["converted_to"] == "fp16"
    assert read_engine_metadata(engine)["precision"] == "fp16"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the converted graph is gone
    trt.calls.clear()
    fp16_graph = with_precision(tiny_onnx, tmp_path / "fp16.onnx", "fp16")
    from m2f_deploy.export.tensorrt import build_engine

    build_engine(fp16_graph, tmp_path / "b.engine", shapes=SHAPES)
    (parsed,) = [c[1:] for c in trt.calls if c[0] == "parse"]
    assert parsed == (str(fp16_graph), 0)  # built as it is (its metadata says fp16: no second conversion)


def test_fp16_conversion_without_onnxruntime_is_one_clear_error(fake_trt, tiny_onnx, tmp_path, monkeypatch):
    """The fp16 converter imports onnxruntime only when it runs: its absence is named, and nothing is left."""
    fake_trt("10.12.0")
    monkeypatch.setitem(sys.modules, "onnxruntime.transformers.float16", None)  # import fails
    with pytest.raises(BackendError, match="needs the onnx and onnxruntime packages .*onnxruntime.transformers"):
        build(tiny_onnx, tmp_path, fp16=True)
    assert not [p for p in tmp_path.iterdir() if "engine" in p.name or p.name.startswith(".")]


@pytest.mark.parametrize("version, flags", [("10.3.0", ["INT8", "OBEY_PRECISION_CONSTRAINTS"]), ("11.1.0", [])])
def test_int8_build_takes_the_qdq_graph(fake_trt, tiny_onnx, tmp_path, version, flags):
    trt = fake_trt(version, int8_graph=True)
    qdq = with_precision(tiny_onnx, tmp_path / "int8.onnx", "int8")
    from m2f_deploy.export.tensorrt import build_engine

    engine = build_engine(qdq, tmp_path / "model.engine", shapes=SHAPES)
    network, config = built_config(trt)
    assert flag_names(trt, config) == flags
    built = read_engine_metadata(engine)["tensorrt"]
    assert built["flags"]["int8"] is True and built["flags"]["strongly_typed"] is (version != "10.3.0")
    # a float DequantizeLinear in the pinned sampler scope stays unpinned (NOT_PINNED), as does the QuantizeLinear
    assert sorted(built["pinned_fp32_layers"]) == (PINNED if version == "10.3.0" else [])
    assert any(name.endswith("sampler/DequantizeLinear") for name, *_ in fake_tensorrt.graph_layers(int8=True))
    trt.calls.clear()
    built = read_engine_metadata(build_engine(qdq, tmp_path / "model.engine", shapes=SHAPES, fp16=True))["tensorrt"]
    assert flag_names(trt, built_config(trt)[1]) == (["FP16", *flags] if version == "10.3.0" else [])
    assert built["flags"]["fp16"] is (version == "10.3.0")  # strongly typed: the QDQ graph's types, said so
    with pytest.raises(InputError, match="--int8 needs an explicitly quantized graph"):
        build_engine(tiny_onnx, tmp_path / "x.engine", int8=True)
    cpu = with_precision(tiny_onnx, tmp_path / "cpu.onnx", "int8", int8_target="cpu")
    with pytest.raises(InputError, match="quantized for onnxruntime CPU"):
        build_engine(cpu, tmp_path / "y.engine")


def test_parse_failure_names_the_real_cause(fake_trt, tiny_onnx, tmp_path):
    fake_trt("10.3.0", parse_error="No importer registered for op: MultiscaleDeformableAttnPlugin_TRT")
    plugin_graph = tmp_path / "plugin.onnx"
    model = onnx.load(str(tiny_onnx))
    for prop in model.metadata_props:
        if prop.key == "m2f_deploy":
            prop.value = json.dumps({**json.loads(prop.value), "msda": "trt_plugin"})
    onnx.save(model, str(plugin_graph))
    from m2f_deploy.export.tensorrt import build_engine

    with pytest.raises(InputError, match="ONNX parser failed.*ships in libnvinfer_plugin") as info:
        build_engine(plugin_graph, tmp_path / "m.engine", shapes=SHAPES)
    assert str(info.value) == (
        f"{plugin_graph}: TensorRT's ONNX parser failed (TensorRT's MSDA plugin MultiscaleDeformableAttnPlugin_TRT "
        "ships in libnvinfer_plugin, loaded with TensorRT; no --plugin-lib is needed: check that this TensorRT has the "
        "plugin version the graph asks for); its errors are above"
    )
    assert not [p for p in tmp_path.iterdir() if "engine" in p.name or p.name.startswith(".")]


def test_build_failure_leaves_nothing(fake_trt, tiny_onnx, tmp_path):
    fake_trt("10.3.0", build_fails=True)
    with pytest.raises(BackendError, match="could not build an engine"):
        build(tiny_onnx, tmp_path)
    assert not [p for p in tmp_path.iterdir() if "engine" in p.name or p.name.startswith(".")]


def test_timing_cache_is_merged_and_a_rejected_one_replaced(fake_trt, tiny_onnx, tmp_path, caplog):
    trt = fake_trt("10.3.0")
    cache = tmp_path / "timing.cache"
    build(tiny_onnx, tmp_path, timing_cache=cache)
    first = fake_tensorrt.parse_cache(cache.read_bytes())
    assert first[0] == "10.3.0" and len(first[1]) == 1
    trt.calls.clear()
    build(tiny_onnx, tmp_path, timing_cache=cache)
    loaded = [c[1] for c in trt.calls if c[0] == "set_timing_cache"]
    assert sorted(first[1]) in loaded  # the file's entries went into the build
    second = fake_tensorrt.parse_cache(cache.read_bytes())
    assert second[1] > first[1]  # merged, not overwritten
    trt.on_build = lambda: cache.write_bytes(b"cache 10.3.0: tactic1,another-process")  # a build beside ours
    build(tiny_onnx, tmp_path, timing_cache=cache)
    trt.on_build = None
    third = fake_tensorrt.parse_cache(cache.read_bytes())[1]
    assert "another-process" in third and second[1] < third  # re-read under the lock and merged
    for stale in (b"cache 9.9.9: other-gpu", b"not a timing cache"):
        cache.write_bytes(stale)
        with caplog.at_level(logging.WARNING, "m2f_deploy.export"):
            engine, _ = build(tiny_onnx, tmp_path, timing_cache=cache)
        assert engine.is_file() and "another GPU or TensorRT version" in caplog.text
        version, entries = fake_tensorrt.parse_cache(cache.read_bytes())
        assert version == "10.3.0" and "other-gpu" not in entries
        caplog.clear()


def test_a_timing_cache_that_cannot_be_saved_costs_a_warning_not_the_engine(fake_trt, tiny_onnx, tmp_path, caplog,
                                                                              monkeypatch):  # fmt: skip
    fake_trt("10.3.0")

    def broken(self):
        raise RuntimeError("no cache after a rejected one")

    monkeypatch.setattr(fake_tensorrt.BuilderConfig, "get_timing_cache", broken)
    with caplog.at_level(logging.WARNING, "m2f_deploy.export"):
        engine, _ = build(tiny_onnx, tmp_path, timing_cache=tmp_path / "t.cache")
    assert engine.is_file() and "timing cache" in caplog.text and "not updated" in caplog.text


def test_plugins_are_loaded_for_the_build_and_again_by_the_runner(fake_trt, tiny_onnx, tmp_path):
    from m2f_deploy.runtime import Segmenter

    trt = fake_trt("10.3.0")
    engine, built = build(tiny_onnx, tmp_path, plugin_libraries=["libm.so.6"])
    assert built["plugin_libraries"] == ["libm.so.6"]
    loads = [i for i, c in enumerate(trt.calls) if c == ("load", "libm.so.6")]
    build_at = [i for i, c in enumerate(trt.calls) if c[0] == "build"]
    assert loads and loads[0] < build_at[0]
    trt.calls.clear()
    with Segmenter(engine) as seg:
        assert seg.backend == "tensorrt"
    assert ("load", "libm.so.6") in trt.calls
    with pytest.raises(InputError, match="--plugin-lib: plugin library /nonexistent/libx.so cannot be loaded"):
        build(tiny_onnx, tmp_path, plugin_libraries=["/nonexistent/libx.so"])
    sidecar = engine_sidecar_path(engine)
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "tensorrt": {
        **built, "plugin_libraries": ["/nonexistent/libx.so"]}}))  # fmt: skip
    with pytest.raises(InputError, match="plugin library /nonexistent/libx.so cannot be loaded"):
        Segmenter(engine)


def test_polygraphy_messages_go_to_logging_not_stdout(capsys, caplog):
    """TensorRT's warnings and the parser's errors reach us through Polygraphy's logger: never on stdout (the CLIs'
    results), but as log records of m2f_deploy (stderr in the CLIs, where -q applies)."""
    from polygraphy.logger import G_LOGGER

    runtime_tensorrt.polygraphy_quiet()
    with caplog.at_level(logging.INFO, logger="m2f_deploy"):
        G_LOGGER.info("polygraphy info")
        G_LOGGER.warning("tensorrt warning")
        G_LOGGER.error("parser error")
    assert capsys.readouterr().out == ""
    records = [(r.name, r.levelno, r.getMessage().split("] ")[-1]) for r in caplog.records]
    assert records == [("m2f_deploy.polygraphy", logging.WARNING, "tensorrt warning"),
                       ("m2f_deploy.polygraphy", logging.ERROR, "parser error")]  # fmt: skip


def test_sidecar_stores_a_relative_plugin_path_as_absolute(fake_trt, tiny_onnx, tmp_path, monkeypatch):
    """The runner may run elsewhere: a relative path is stored resolved, a bare name stays a name for dlopen."""
    import shutil

    import _ctypes

    fake_trt("10.3.0")
    lib = tmp_path / "plugins" / "libx.so"
    lib.parent.mkdir()
    shutil.copy(_ctypes.__file__, lib)  # a shared library that loads anywhere

    monkeypatch.chdir(tmp_path)
    _, built = build(tiny_onnx, tmp_path, plugin_libraries=["plugins/libx.so", "libm.so.6"])
    assert built["plugin_libraries"] == [str(lib.resolve()), "libm.so.6"]
    engine = tmp_path / "cli.engine"  # the CLI keeps "./" (a path, not a name for the loader's search)
    assert export_main([str(tiny_onnx), "-o", str(engine), "--shapes", *SHAPES, "--plugin-lib", "./plugins/libx.so"]) == 0
    assert read_engine_metadata(engine)["tensorrt"]["plugin_libraries"] == [str(lib.resolve())]


def test_unknown_ops_are_left_to_the_plugin_libraries_and_notes_are_logged(fake_trt, tiny_onnx, tmp_path, caplog):
    """With --plugin-lib, an op without a TensorRT importer is a warning (the parser's fallback importer looks for a
    plugin of its name), not a refusal; without, the build refuses it before TensorRT."""
    from m2f_deploy.export.trt_support import TensorRTSupportError

    model = onnx.load(str(tiny_onnx))
    model.graph.node.append(onnx.helper.make_node("MyOp", [model.graph.output[0].name], ["my"], name="mine",
                                                  domain="my.plugins"))  # fmt: skip
    model.opset_import.append(onnx.helper.make_opsetid("my.plugins", 1))
    custom = tmp_path / "custom.onnx"
    onnx.save(model, str(custom))
    fake_trt("10.3.0")
    with pytest.raises(TensorRTSupportError, match="node 'mine' \\(MyOp\\): op of domain 'my.plugins'"):
        build(custom, tmp_path)
    with caplog.at_level(logging.WARNING, logger="m2f_deploy.export"):
        build(custom, tmp_path, plugin_libraries=["libm.so.6"])
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("TensorRT support:")]
    assert notes == ["TensorRT support: node 'mine' (MyOp): op of domain 'my.plugins' is neither an ONNX op TensorRT "
                     "imports nor a known plugin (left to the plugin libraries) [TensorRT 10.3]"]  # fmt: skip


@pytest.mark.parametrize("version, ok", [("10.3.0", False), ("10.16.1", True)])
def test_the_build_checks_for_the_imported_tensorrt_without_package_metadata(fake_trt, version, ok):
    """A system TensorRT (JetPack) has no dist-info: its module's version is the target, not the defaults."""
    from m2f_deploy.export.trt_support import TensorRTSupportError, installed_tensorrt_version, require_tensorrt_support

    fake_trt(version)
    assert installed_tensorrt_version() == version.rsplit(".", 1)[0]
    from test_trt_support import _plugin

    plugin_v2 = _plugin("2")
    if ok:
        assert require_tensorrt_support(plugin_v2).targets == ("10.16",)
    else:
        with pytest.raises(TensorRTSupportError, match="plugin_version 2 exists from TensorRT 10.11"):
            require_tensorrt_support(plugin_v2)


@pytest.mark.parametrize("version", ["10.3.0", "11.1.0"])
def test_runner_grows_its_buffers_and_checks_inputs_against_the_profile(fake_trt, tiny_onnx, tmp_path, version):
    from m2f_deploy.runtime import Segmenter

    fake_trt(version)
    engine, _ = build(tiny_onnx, tmp_path)
    with Segmenter(engine) as seg:
        for batch in (1, 3, 2):  # the first copy goes into a buffer made empty; then a larger batch comes
            x = np.full((batch, 3, 64, 96), float(batch), np.float32)
            out = seg.infer(x)
            assert out["masks_queries_logits"].shape == (batch, 4, 16, 24)
            assert out["class_queries_logits"].dtype == np.float32
            assert np.all(out["class_queries_logits"] == batch)  # what went in came back
        with pytest.raises(InputError, match="has batch 4: model.engine takes 1..3"):
            seg.infer(np.zeros((4, 3, 64, 96), np.float32))
        with pytest.raises(InputError, match="takes 64x96 only"):
            seg.infer(np.zeros((1, 3, 64, 64), np.float32))
        with pytest.raises(InputError, match=r"float \[B, 3, H, W\]"):
            seg.infer(np.zeros((1, 3, 64), np.float32))


def test_runner_checks_a_dynamic_size_within_the_profile():
    from m2f_deploy.runtime.base import InputSpec

    spec = InputSpec.from_profile((1, 3, 64, 64), (8, 3, 256, 320))
    assert spec.check(np.zeros((2, 3, 128, 96), np.float64), "m.engine").dtype == np.float32
    with pytest.raises(InputError, match="multiples of 32"):
        spec.check(np.zeros((1, 3, 100, 96), np.float32), "m.engine")
    with pytest.raises(InputError, match="384x96 is outside what m.engine takes .64..256 x 64..320."):
        spec.check(np.zeros((1, 3, 384, 96), np.float32), "m.engine")
    with pytest.raises(InputError, match="has batch 9: m.engine takes 1..8"):
        spec.check(np.zeros((9, 3, 64, 64), np.float32), "m.engine")


def test_cli_engine_flags_reach_the_build(fake_trt, tiny_onnx, tmp_path, capsys):
    trt = fake_trt("10.3.0")
    engine = tmp_path / "cli.engine"
    cache = tmp_path / "cli.cache"
    args = [str(tiny_onnx), "-o", str(engine), "--shapes", *SHAPES, "--workspace", "1.5", "--timing-cache",
            str(cache), "--plugin-lib", "libm.so.6"]  # fmt: skip
    assert export_main([*args, "--fp16", "--tf32"]) == 0
    built = read_engine_metadata(engine)["tensorrt"]
    assert built["flags"] == {"tf32": True, "fp16": True, "int8": False, "strongly_typed": False}
    assert built["builder_flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS", "TF32"]
    assert built["pinned_fp32_layers"] and built["plugin_libraries"] == ["libm.so.6"]
    assert built["profile"]["max"] == [3, 3, 64, 96] and cache.is_file()
    assert built_config(trt)[1].pools == {trt.MemoryPoolType.WORKSPACE: int(1.5 * (1 << 30))}
    assert capsys.readouterr().out.strip() == str(engine)
    trt.calls.clear()
    assert export_main([str(tiny_onnx), "-o", str(engine), "--fp16", "--no-fp32-layers"]) == 0
    built = read_engine_metadata(engine)["tensorrt"]
    assert built["builder_flags"] == ["FP16"] and built["pinned_fp32_layers"] == []
    assert built["flags"]["tf32"] is False and built["plugin_libraries"] == []
    qdq = with_precision(tiny_onnx, tmp_path / "q.onnx", "int8")
    with pytest.raises(InputError, match="--int8 needs an explicitly quantized graph"):
        export_main([str(tiny_onnx), "-o", str(engine), "--int8"])
    assert export_main([str(qdq), "-o", str(engine), "--int8"]) == 0
    assert "INT8" in read_engine_metadata(engine)["tensorrt"]["builder_flags"]
    engine.unlink()
    capsys.readouterr()
    assert export_main([str(tiny_onnx), "--check-tensorrt", "-o", str(engine), "--engine", "--fp16"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{tiny_onnx}: passes for TensorRT 10.3, 10.16, 11.x", str(engine)]
    assert read_engine_metadata(engine)["tensorrt"]["flags"]["fp16"] is True  # checked, then built with its flags


def test_cudart_is_found_where_pip_puts_it(tmp_path, monkeypatch):
    wheel = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    wheel.mkdir(parents=True)
    (wheel / "libcudart.so.13").write_bytes(b"")
    assert runtime_cuda.find_cudart([str(tmp_path / "empty"), str(wheel)]) == str(wheel / "libcudart.so.13")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "site")])
    monkeypatch.setattr(runtime_cuda, "cudart_dirs", lambda: [str(tmp_path / "empty"), str(wheel)])
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/x")
    assert runtime_cuda.ensure_cudart() == str(wheel / "libcudart.so.13")
    assert __import__("os").environ["LD_LIBRARY_PATH"].split(":") == [str(wheel), "/opt/x"]



def test_cudart_not_found_leaves_the_search_to_polygraphy(tmp_path, monkeypatch, caplog):
    """Polygraphy falls back to the loader's default paths (ld.so.cache): not finding it is a warning, not an end."""
    monkeypatch.setattr(runtime_cuda, "cudart_dirs", lambda: [str(tmp_path / "empty")])
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/x")
    with caplog.at_level(logging.WARNING, logger="m2f_deploy.runtime"):
        assert runtime_cuda.ensure_cudart() is None
    assert "(libcudart.so*) was not found" in caplog.text and "the loader's default paths" in caplog.text
    assert __import__("os").environ["LD_LIBRARY_PATH"] == "/opt/x"


def test_cudart_search_covers_conda_and_windows(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "conda"))
    assert str(tmp_path / "conda" / "lib") in runtime_cuda.cudart_dirs()
    toolkit = tmp_path / "CUDA" / "v12.4"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "cudart64_12.dll").write_bytes(b"")
    monkeypatch.setattr(runtime_cuda, "WINDOWS", True)
    monkeypatch.setattr(runtime_cuda, "CUDART_GLOB", "cudart64_*.dll")
    monkeypatch.setenv("CUDA_PATH", str(toolkit))
    monkeypatch.setenv("PATH", "/opt/y")
    dirs = runtime_cuda.cudart_dirs()
    assert str(tmp_path / "conda" / "Library" / "bin") in dirs and str(tmp_path / "conda" / "lib") not in dirs
    assert runtime_cuda.ensure_cudart() == str(toolkit / "bin" / "cudart64_12.dll")
    assert __import__("os").environ["PATH"].split(":")[0] == str(toolkit / "bin")


def test_cudart_search_covers_the_wheel_folders(tmp_path, monkeypatch):
    wheel = tmp_path / "nvidia" / "cuda_runtime" / "lib"
    wheel.mkdir(parents=True)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.setenv("LD_LIBRARY_PATH", "")
    assert str(wheel) in runtime_cuda.cudart_dirs()


def test_runtime_imports_without_polygraphy_tensorrt_or_torch():
    import subprocess
    import textwrap

    script = textwrap.dedent(
        """
        import sys
        for name in ("polygraphy", "tensorrt", "torch"):
            sys.modules[name] = None  # any import of them raises ImportError
        import m2f_deploy.runtime, m2f_deploy.runtime.tensorrt, m2f_deploy.runtime.trt_api, m2f_deploy.export.tensorrt
        from m2f_deploy.errors import BackendError
        try:
            m2f_deploy.export.tensorrt.check_tensorrt()
        except BackendError as e:
            print(e)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "TensorRT is not installed" in done.stdout
