"""Loading: formats, dtype, and one clear error per kind of broken checkpoint."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from factory import save_hf_checkpoint, tiny_config
from safetensors.torch import load_file, save_file

from m2f_deploy import load_model
from m2f_deploy.checkpoints import UNUSED_KEYS
from m2f_deploy.errors import CheckpointError, M2FError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_hf_checkpoint(tiny_config(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def copy(tiny, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny, dst)
    return dst


def _logits(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(torch.randn(1, 3, 64, 64)).masks_queries_logits


def test_loads_in_eval_mode_and_skips_only_unused_keys(tiny):
    model = load_model(tiny)
    assert not model.training
    # transformers' save_pretrained writes the loss weight and the unused final Swin norm
    assert "criterion.empty_weight" in model.skipped_checkpoint_keys
    assert all(any(__import__("re").fullmatch(p, k) for p in UNUSED_KEYS) for k in model.skipped_checkpoint_keys)
    assert model.checkpoint.weight_files == [tiny / "model.safetensors"]


def test_sharded_safetensors_and_pytorch_bin_load_the_same_weights(tiny, tmp_path):
    ref = _logits(load_model(tiny))
    state = load_file(tiny / "model.safetensors")
    keys = sorted(state)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(tiny / "config.json", sharded)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: state[k] for k in ks}, sharded / name)
    index = {"metadata": {}, "weight_map": {k: n for n, ks in halves.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(sharded)
    assert len(model.checkpoint.weight_files) == 2
    assert torch.equal(_logits(model), ref)

    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(tiny / "config.json", binary)
    torch.save(state, binary / "pytorch_model.bin")
    assert torch.equal(_logits(load_model(binary)), ref)


def test_fp16_checkpoint_and_dtype_argument(copy):
    state = load_file(copy / "model.safetensors")
    save_file({k: v.half() for k, v in state.items()}, copy / "model.safetensors")
    model = load_model(copy)
    assert model.dtype == torch.float32
    model16 = load_model(copy, dtype=torch.float16)
    assert model16.dtype == torch.float16 and all(p.dtype == torch.float16 for p in model16.parameters())


def _rewrite(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


BROKEN = {
    "missing key": (
        lambda s: s.pop("class_predictor.weight"),
        r"model\.safetensors: does not match .*missing keys: class_predictor\.weight",
    ),
    "extra key": (
        lambda s: s.__setitem__("model.extra.weight", torch.zeros(3)),
        r"model\.safetensors: .*unexpected keys: model\.extra\.weight",
    ),
    "wrong shape": (
        lambda s: s.__setitem__("class_predictor.bias", torch.zeros(7)),
        r"wrongly shaped keys: class_predictor\.bias \(checkpoint \(7,\), model \(6,\)\)",
    ),
}


@pytest.mark.parametrize("problem", list(BROKEN))
def test_mismatched_checkpoint_names_file_and_keys(copy, problem):
    edit, pattern = BROKEN[problem]
    _rewrite(copy, edit)
    with pytest.raises(CheckpointError, match=pattern):
        load_model(copy)


def test_truncated_safetensors(copy):
    f = copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(copy)


def test_folder_without_config(copy):
    (copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt: no config\.json"):
        load_model(copy)


@pytest.mark.parametrize("name", ["pipe", "pipe.pkl"])
def test_a_fifo_is_neither_a_checkpoint_file_nor_a_folder(tmp_path, name):
    import os

    fifo = tmp_path / name
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=f"{name}: not a regular file or a folder"):
        load_model(fifo)
    with pytest.raises(CheckpointError, match=f"{name}: not a regular file or a folder"):
        load_model(fifo, zoo_config="coco-panoptic/maskformer2_R50_bs16_50ep")


def test_folder_without_weights(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt: no weights found"):
        load_model(copy)


def test_bad_config_json(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_model(copy)


def test_unsupported_backbone_is_named(copy):
    d = json.loads((copy / "config.json").read_text())
    d["backbone_config"]["model_type"] = "convnext"
    (copy / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"config\.json: backbone 'convnext' is not supported"):
        load_model(copy)


def test_pickle_is_never_executed(copy, tmp_path):
    """A pytorch_model.bin holding arbitrary objects is refused by weights_only loading."""
    (copy / "model.safetensors").unlink()
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, copy / "pytorch_model.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable PyTorch weights file"):
        load_model(copy)
    assert not marker.exists()


def test_missing_folder_and_hub_ids(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_model(tmp_path / "nope")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(CheckpointError, match=r"needs huggingface_hub \(pip install 'm2f-deploy\[hub\]'\)"):
        load_model("someone/some-mask2former")
    monkeypatch.delitem(sys.modules, "huggingface_hub")
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="could not be fetched from the Hugging Face Hub"):
        load_model("someone/some-mask2former")


def test_detectron2_file_is_refused_clearly(tmp_path):
    f = tmp_path / "model_final.pkl"
    f.write_bytes(b"\x80\x04")
    with pytest.raises(M2FError, match="detectron2.*give its model-zoo config"):
        load_model(f)


def test_saved_checkpoint_loads_in_transformers_with_same_logits(tmp_path):
    """save_checkpoint writes the Hugging Face on-disk format: transformers reads it as is."""
    import transformers

    from m2f_deploy.checkpoints import save_checkpoint
    from m2f_deploy.modeling import Mask2Former

    ours = Mask2Former.random(tiny_config(), seed=3)
    save_checkpoint(ours, tmp_path)
    hf = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = hf(x).masks_queries_logits, ours(x).masks_queries_logits
    assert (a - b).abs().max() <= 1e-4 and b.std() > 1e-3
    assert torch.equal(_logits(load_model(tmp_path)), _logits(ours))
