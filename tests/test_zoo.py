"""The official model zoo: ResNet backbones against transformers, detectron2 .pkl / .pth files (safe loading,
conversion to our layout), the zoo's named configs, export of a ResNet model in every MSDA flavour and precision."""

from __future__ import annotations

import os
import pickle
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from d2_factory import detectron2_state, write_pkl, write_pth
from factory import tiny_config

from m2f_deploy import load_model
from m2f_deploy.artifact import DEFAULT_PREPROCESSING, read_onnx_metadata
from m2f_deploy.checkpoints import read_state_dict, save_checkpoint
from m2f_deploy.cli.common import run
from m2f_deploy.cli.export import main as export_main
from m2f_deploy.errors import CheckpointError, ConfigError
from m2f_deploy.export import export_onnx
from m2f_deploy.runtime import Segmenter
from m2f_deploy.zoo import DATASETS, ZOO, ZooConfig, labels, zoo_config

transformers = pytest.importorskip("transformers")

TOL = 1e-4
R50_TINY = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 2, 1, 1]}
LOGITS = ("class_queries_logits", "masks_queries_logits")


def r50_tiny(**backbone):
    return tiny_config(backbone_config={**R50_TINY, **backbone})


def save_hf(config, folder, seed=0):
    """transformers' model from our config, every weight and batch-norm statistic randomised, save_pretrained."""
    torch.manual_seed(seed)
    hf = transformers.Mask2FormerForUniversalSegmentation(transformers.Mask2FormerConfig(**config.to_dict())).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for name, b in hf.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.2)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    hf.save_pretrained(folder)
    return folder


def tiny_zoo(config):
    return ZooConfig("test/tiny", config, dict(DEFAULT_PREPROCESSING, size={"shortest_edge": 64, "longest_edge": 96}))


@pytest.fixture(scope="module")
def r50_dir(tmp_path_factory):
    return save_hf(r50_tiny(), tmp_path_factory.mktemp("r50"))


@pytest.fixture(scope="module")
def swin_dir(tmp_path_factory):
    return save_hf(tiny_config(), tmp_path_factory.mktemp("swin"))


def _outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return {k: getattr(out, k) for k in LOGITS}


def _assert_close(a, b, tol=TOL):
    for k in LOGITS:
        assert a[k].shape == b[k].shape, k
        diff = (a[k] - b[k]).abs().max().item()
        assert diff <= tol, f"{k}: max abs diff {diff:.3g} > {tol}"
        assert a[k].std() > 1e-3, k  # not degenerate


# ---- ResNet against transformers -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 64, 96), (1, 3, 70, 50)])
def test_resnet_matches_transformers(r50_dir, shape):
    hf = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(r50_dir).eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    _assert_close(_outputs(hf, x), _outputs(load_model(r50_dir), x))


def test_resnet_stride_in_1x1_variant_matches_transformers(tmp_path):
    folder = save_hf(r50_tiny(downsample_in_bottleneck=True), tmp_path)
    hf = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval()
    ours = load_model(folder)
    assert ours.model.pixel_level_module.encoder.encoder.stages[1].layers[0].layer[0].convolution.stride == (2, 2)
    x = torch.randn(1, 3, 64, 64)
    _assert_close(_outputs(hf, x), _outputs(ours, x))


def test_resnet_config_round_trip_and_refusals():
    cfg = r50_tiny()
    d = cfg.to_dict()
    assert d["backbone_config"]["model_type"] == "resnet" and d["backbone_config"]["out_indices"] == [1, 2, 3, 4]
    assert type(cfg).from_dict(d).to_dict() == d
    for bad, message in (
        ({"layer_type": "basic"}, "layer_type 'basic' is not supported"),
        ({"downsample_in_first_stage": True}, "strides 8-64"),
        ({"depths": [1, 1, 1]}, "4-stage ResNet"),
        ({"depths": [1, 1, 1, 2.5]}, "depths: whole numbers only, got 2.5"),
        ({"hidden_sizes": [8, 16, 32, "64"]}, "hidden_sizes: whole numbers only, got '64'"),
    ):
        with pytest.raises(ConfigError, match=message):
            r50_tiny(**bad)


# ---- export: every MSDA flavour and precision, batch norm folded ------------------------------------------------


@pytest.fixture(scope="module")
def r50_model(r50_dir):
    return load_model(r50_dir)


def assert_batch_norm_folded(path):
    graph = onnx.load(str(path)).graph
    ops = Counter(n.op_type for n in graph.node)
    assert "BatchNormalization" not in ops
    # batch norm folded: every backbone convolution takes constant weights and a bias (ResNet convs have none)
    constants = {i.name for i in graph.initializer}
    backbone = [n for n in graph.node if n.op_type == "Conv" and n.name.startswith("/model/encoder/")]
    assert len(backbone) == 1 + 3 * 5 + 4  # stem, 3 per block (5 blocks), 4 shortcuts
    assert all(len(n.input) == 3 and n.input[1] in constants and n.input[2] in constants for n in backbone)


# grid_sample: through the CLI, from a .pkl (test_cli_exports_a_pkl_with_its_zoo_config)
@pytest.mark.parametrize("msda", ["gather", "trt_plugin", "deform_conv"])
def test_resnet_exports_in_every_msda_flavour(r50_model, tmp_path, msda):
    path = export_onnx(r50_model, tmp_path / "m.onnx", height=64, width=64, msda=msda)  # the gate compares to torch
    assert_batch_norm_folded(path)
    meta = read_onnx_metadata(path)
    assert meta["msda"] == msda and meta["precision"] == "fp32"


def test_resnet_exports_fp16_and_int8(r50_model, tmp_path):
    from m2f_deploy.data import write_dataset
    from m2f_deploy.export.int8 import quantize_int8

    p16 = export_onnx(r50_model, tmp_path / "m16.onnx", height=64, width=64, fp16=True)
    assert read_onnx_metadata(p16)["precision"] == "fp16"
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in onnx.load(str(p16)).graph.initializer)
    fp32 = export_onnx(r50_model, tmp_path / "m.onnx", height=64, width=64)
    write_dataset(tmp_path / "calib", 2, seed=2, size=(64, 64))
    images = sorted((tmp_path / "calib" / "images").iterdir())
    p8 = quantize_int8(fp32, tmp_path / "m8.onnx", images, min_agreement=0.3)
    assert read_onnx_metadata(p8)["precision"] == "int8"
    ops = Counter(n.op_type for n in onnx.load(str(p8)).graph.node)
    assert ops["QuantizeLinear"] > 0
    result = Segmenter(p8, backend="cpu").predict(images[0], "semantic")
    assert result[0].shape == (64, 64)


# ---- detectron2 files --------------------------------------------------------------------------------------------


def _d2_state(folder, config):
    return detectron2_state(read_state_dict([folder / "model.safetensors"]), config)


@pytest.mark.parametrize("kind", ["pkl-protocol2", "pkl", "pth"])
def test_resnet_detectron2_file_equals_hf_layout(r50_dir, r50_model, tmp_path, kind):
    config = r50_model.config
    state = _d2_state(r50_dir, config)
    assert "backbone.res3.0.conv2.norm.running_var" in state and "sem_seg_head.predictor.class_embed.weight" in state
    if kind == "pth":
        # a SyncBN-trained file (Cityscapes configs) carries the step counters too
        state["backbone.res2.0.conv1.norm.num_batches_tracked"] = torch.tensor(5)
        path = write_pth(state, tmp_path / "model_final.pth")
    else:
        path = write_pkl(state, tmp_path / "model_final.pkl", protocol=2 if kind == "pkl-protocol2" else 4)
    ours = load_model(path, zoo_config=tiny_zoo(config))
    assert ours.state_dict().keys() == r50_model.state_dict().keys()
    for k, v in r50_model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert "criterion.empty_weight" in ours.skipped_checkpoint_keys
    x = torch.randn(1, 3, 64, 64)
    a, b = _outputs(r50_model, x), _outputs(ours, x)
    assert all(torch.equal(a[k], b[k]) for k in LOGITS)


def test_swin_detectron2_file_equals_hf_layout(swin_dir, tmp_path):
    hf_layout = load_model(swin_dir)
    state = _d2_state(swin_dir, hf_layout.config)
    assert state["backbone.layers.0.blocks.0.attn.relative_position_index"].dtype == torch.int64
    path = write_pkl(state, tmp_path / "model_final.pkl")
    ours = load_model(path, zoo_config=tiny_zoo(hf_layout.config))
    x = torch.randn(2, 3, 64, 96)
    a, b = _outputs(hf_layout, x), _outputs(ours, x)
    assert all(torch.equal(a[k], b[k]) for k in LOGITS)
    # and the converted model, saved as a Hugging Face folder, is what transformers loads
    folder = save_checkpoint(ours, tmp_path / "hf")
    hf = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval()
    _assert_close(_outputs(hf, x), b)


def test_converted_resnet_saved_loads_in_transformers(r50_dir, r50_model, tmp_path):
    path = write_pkl(_d2_state(r50_dir, r50_model.config), tmp_path / "model_final.pkl")
    ours = load_model(path, zoo_config=tiny_zoo(r50_model.config))
    folder = save_checkpoint(ours, tmp_path / "hf")
    hf = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval()
    x = torch.randn(1, 3, 64, 96)
    _assert_close(_outputs(hf, x), _outputs(ours, x))


def test_cli_exports_a_pkl_with_its_zoo_config(r50_dir, r50_model, tmp_path, monkeypatch, capsys):
    import m2f_deploy.zoo

    pkl = write_pkl(_d2_state(r50_dir, r50_model.config), tmp_path / "model_final.pkl")
    asked = {}

    def fake_zoo_config(name, **overrides):  # the tiny architecture under a real entry's name
        asked.update(name=name, **overrides)
        return tiny_zoo(r50_model.config)

    monkeypatch.setattr(m2f_deploy.zoo, "zoo_config", fake_zoo_config)
    out = tmp_path / "r50.onnx"
    name = "coco-panoptic/maskformer2_R50_bs16_50ep"
    assert export_main([str(pkl), "--zoo-config", name, "--size", "64", "-o", str(out), "-q"]) == 0
    assert asked == {"name": name, "num_queries": None, "id2label": None}
    assert_batch_norm_folded(out)
    meta = read_onnx_metadata(out)
    assert meta["msda"] == "grid_sample"
    assert meta["source"]["zoo_config"] == "test/tiny" and meta["source"]["checkpoint"] == str(pkl)
    assert meta["preprocessing"]["size"] == {"shortest_edge": 64, "longest_edge": 96}
    assert Segmenter(out, backend="cpu").infer(np.zeros((1, 3, 64, 64), np.float32))["class_queries_logits"].shape == (1, 10, 6)


# ---- safety: a .pkl or .pth carrying anything but weights is refused without running it --------------------------


class _Payload:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("how", ["os.system", "builtins.exec", "nested"])
def test_pickle_with_code_is_refused_and_not_run(tmp_path, how):
    marker = tmp_path / "pwned"
    if how == "os.system":
        payload = _Payload(os.system, f"touch {marker}")
    else:
        payload = _Payload(exec, f"open({str(marker)!r}, 'w').close()")
    model = {"backbone.stem.conv1.weight": np.zeros(3, np.float32), "x": payload}
    obj = {"model": model, "__author__": "x"} if how != "nested" else {"model": {"a": [np.zeros(1), (payload,)]}}
    path = tmp_path / "model_final.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(CheckpointError, match=r"refused, not executed: refused pickled global \S+\.(system|exec) "):
        load_model(path, zoo_config=tiny_zoo(r50_tiny()))
    assert not marker.exists()
    pth = tmp_path / "model_final.pth"  # the same inside a torch file: torch.load(weights_only=True) refuses it
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(3), "x": payload}}, pth)
    with pytest.raises(CheckpointError, match=r"model_final\.pth: refused, not executed: "):
        load_model(pth, zoo_config=tiny_zoo(r50_tiny()))
    assert not marker.exists()


def test_numpy_1_pickles_load(tmp_path):
    """numpy 1.x writes numpy.core.multiarray._reconstruct, numpy 2.x numpy._core...: both are weights."""
    from m2f_deploy.checkpoints import read_detectron2

    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float32(2.5)}
    for protocol in (2, 5):
        raw = pickle.dumps({"model": arrays, "__author__": "FAIR"}, protocol=protocol)
        # protocol 2 names globals in text: rewritten, it is what numpy 1.x writes
        for variant in (raw, raw.replace(b"numpy._core", b"numpy.core")) if protocol == 2 else (raw,):
            path = tmp_path / "m.pkl"
            path.write_bytes(variant)
            got = read_detectron2(path)
            np.testing.assert_array_equal(got["a"], arrays["a"])
            assert got["s"] == 2.5
    assert b"cnumpy.core.multiarray\n_reconstruct" in pickle.dumps(arrays, protocol=2).replace(b"numpy._core", b"numpy.core")


def test_detectron2_errors_are_one_line(r50_dir, r50_model, tmp_path, capsys):
    state = _d2_state(r50_dir, r50_model.config)
    pkl = write_pkl(state, tmp_path / "model_final.pkl")
    cases = [
        ([str(pkl)], "carries no architecture; give its model-zoo config"),
        ([str(pkl), "--zoo-config", "coco-panoptic/maskformer2_R50_bs16_5ep"],
         "did you mean 'coco-panoptic/maskformer2_R50_bs16_50ep'"),
        ([str(r50_dir), "--zoo-config", "coco-panoptic/maskformer2_R50_bs16_50ep"], "is for an original (detectron2)"),
        ([str(pkl), "--num-queries", "5"], "override a --zoo-config"),
        ([str(tmp_path / "missing.pkl"), "--zoo-config", "coco-panoptic/maskformer2_R50_bs16_50ep"], "no such file"),
        # the real R50 config against the tiny file: shapes do not match, named
        ([str(pkl), "--zoo-config", "coco-panoptic/maskformer2_R50_bs16_50ep"], "wrongly shaped keys"),
        ([str(pkl), "--zoo-config", "coco-panoptic/maskformer2_swin_tiny_bs16_50ep"],
         "holds a resnet backbone, but the model-zoo config describes a swin one"),
    ]
    for args, message in cases:
        assert run("m2f-export", export_main, [*args, "-o", str(tmp_path / "x.onnx"), "-q"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "x.onnx").exists()
    state["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="keys of no known Mask2Former module.*extra_head"):
        load_model(write_pkl(state, tmp_path / "odd.pkl"), zoo_config=tiny_zoo(r50_model.config))


# ---- the zoo's named configs --------------------------------------------------------------------------------------


def test_every_zoo_entry_builds_with_its_dataset_labels():
    counts = {"coco-panoptic": 133, "coco-instance": 80, "ade20k-semantic": 150, "cityscapes-semantic": 19,
              "cityscapes-panoptic": 19, "cityscapes-instance": 8}  # fmt: skip
    assert set(counts) == set(DATASETS)
    for name in ZOO:
        zoo = zoo_config(name)
        assert zoo.config.num_labels == counts[name.split("/")[0]], name
        assert zoo.config.num_queries in (100, 200) and zoo.config.decoder_layers == 10
        assert zoo.preprocessing["image_mean"] == [0.485, 0.456, 0.406]
    assert labels("coco-panoptic")[0] == "person" and labels("coco-panoptic")[80] == "banner"
    assert labels("ade20k-semantic")[:3] == ["wall", "building", "sky"]
    assert labels("cityscapes-instance") == ["person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
    r50 = zoo_config("coco-panoptic/maskformer2_R50_bs16_50ep").config.backbone_config
    defaults = transformers.ResNetConfig()  # transformers' ResNet-50 is detectron2's R50 with the stride in the 3x3
    assert r50.hidden_sizes == list(defaults.hidden_sizes) and r50.depths == list(defaults.depths)
    assert r50.embedding_size == defaults.embedding_size and not r50.downsample_in_bottleneck
    assert zoo_config("coco-panoptic/maskformer2_R101_bs16_50ep").config.backbone_config.depths == [3, 4, 23, 3]
    big = zoo_config("ade20k-semantic/maskformer2_swin_large_IN21k_384_bs16_160k_res640")
    assert big.preprocessing["size"] == {"shortest_edge": 640, "longest_edge": 2560}
    assert zoo_config("coco-instance/maskformer2_R50_bs16_50ep", num_queries=50).config.num_queries == 50


def test_cli_zoo_overrides_reach_the_config(tmp_path, monkeypatch, capsys):
    import m2f_deploy.zoo

    asked = {}

    def recording_zoo_config(name, **overrides):
        asked.update(name=name, **overrides)
        raise ConfigError("recorded")  # stop before any loading

    monkeypatch.setattr(m2f_deploy.zoo, "zoo_config", recording_zoo_config)
    names = tmp_path / "labels.json"
    names.write_text('["road", "car"]')
    pkl = tmp_path / "model_final.pkl"
    pkl.write_bytes(b"")
    args = [str(pkl), "--zoo-config", "cityscapes-semantic/maskformer2_R50_bs16_90k", "-o", str(tmp_path / "x.onnx")]
    assert run("m2f-export", export_main, [*args, "--num-queries", "50", "--labels", str(names)]) == 1
    assert asked == {"name": args[2], "num_queries": 50, "id2label": {0: "road", 1: "car"}}
    names.write_text('{"0": "road"}')
    capsys.readouterr()
    assert run("m2f-export", export_main, [*args, "--labels", str(names)]) == 1
    assert "expected a JSON list of class names" in capsys.readouterr().err


def test_unpickler_allows_names_not_modules(tmp_path):
    """The allow-list is of (module, name) pairs: numpy itself is not trusted, nor _codecs beyond latin-1."""
    from m2f_deploy.checkpoints import read_detectron2

    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps({"model": {"a": _Payload(np.load, str(tmp_path / "x.npy"))}}, protocol=2))
    with pytest.raises(CheckpointError, match=r"refused pickled global numpy\.load "):
        read_detectron2(path)
    # _codecs.encode("abc", "zlib"): allowed only as the latin-1 bytes of protocol-2 pickles
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x04\x00\x00\x00zlib\x86R.")
    with pytest.raises(CheckpointError, match="only latin1 is allowed"):
        read_detectron2(path)
    raw = pickle.dumps({"model": {"w": b"abc"}}, protocol=2)  # protocol 2 stores bytes as _codecs.encode(s, "latin1")
    assert b"c_codecs\nencode" in raw
    path.write_bytes(raw)
    assert read_detectron2(path) == {"w": b"abc"}


@pytest.mark.parametrize("what", ["array", "scalar", "object-array", "ndarray-call"])
def test_unpickler_refuses_forged_dtypes(tmp_path, what):
    """numpy.dtype.__setstate__ believes the pickle: an int64 field renamed 'O8' becomes an object field numpy does
    not know holds pointers, and the pickled bytes 0x41... would be dereferenced (a segfault) when read."""
    from m2f_deploy.checkpoints import read_detectron2

    record = np.zeros(1, dtype=[("a", "<i8")])
    record["a"] = 0x4141414141414141

    class _Call:
        def __reduce__(self):
            return np.ndarray, ((1,), np.dtype("<f4"), b"AAAA")

    value = {"array": record, "scalar": record[0], "object-array": np.array([1, "x"], dtype=object),
             "ndarray-call": _Call()}[what]
    raw = pickle.dumps({"model": {"w": np.zeros(2, np.float32), "x": value}}, protocol=2)
    if what in ("array", "scalar"):
        assert raw.count(b"i8") == 1
        raw = raw.replace(b"i8", b"O8")
    path = tmp_path / "m.pkl"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"m\.pkl: refused, not executed: refused pickled (array of dtype|call)"):
        read_detectron2(path)
