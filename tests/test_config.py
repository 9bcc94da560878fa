"""config.json reading/writing (no torch) and the architecture presets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from factory import tiny_config

from m2f_deploy.config import Mask2FormerConfig
from m2f_deploy.errors import ConfigError
from m2f_deploy.presets import PRESETS, preset_config


def test_round_trip_keeps_every_field(tmp_path):
    cfg = tiny_config()
    cfg.extra["init_std"] = 0.5  # a training-only field survives the round trip
    cfg.save_pretrained(tmp_path)
    again = Mask2FormerConfig.from_pretrained(tmp_path)
    assert again == cfg
    assert json.loads((tmp_path / "config.json").read_text())["init_std"] == 0.5


def test_reads_what_transformers_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Mask2FormerConfig(
        backbone_config=transformers.SwinConfig(
            embed_dim=48, depths=[2, 2, 4, 2], num_heads=[2, 4, 8, 16], window_size=5,
            out_features=["stage1", "stage2", "stage3", "stage4"],
        ),
        num_queries=33, decoder_layers=5, pre_norm=True, num_labels=7, hidden_dim=128,
    )  # fmt: skip
    hf.save_pretrained(tmp_path)
    cfg = Mask2FormerConfig.from_pretrained(tmp_path)
    b = cfg.backbone_config
    assert (b.embed_dim, b.depths, b.num_heads, b.window_size) == (48, [2, 2, 4, 2], [2, 4, 8, 16], 5)
    assert (cfg.num_queries, cfg.decoder_layers, cfg.pre_norm, cfg.num_labels, cfg.hidden_dim) == (
        33, 5, True, 7, 128,
    )  # fmt: skip
    # and transformers reads what we write
    out = tmp_path / "ours"
    cfg.save_pretrained(out)
    back = transformers.Mask2FormerConfig.from_pretrained(out)
    assert back.backbone_config.window_size == 5 and back.num_labels == 7 and back.pre_norm


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda d: d["backbone_config"].update(model_type="convnext"), "backbone 'convnext' is not supported"),
        (lambda d: d["backbone_config"].update(depths=[2, 2]), "4-stage Swin"),
        (lambda d: d.update(activation_function="silu"), "activation_function 'silu' is not supported"),
        (lambda d: d.update(feature_size=48, num_attention_heads=8), "multiple of 32"),
        (lambda d: d.update(model_type="detr"), "not a Mask2Former config"),
        (lambda d: d["backbone_config"].update(depths="abc"), "backbone_config.depths: a list of whole numbers"),
        # int() would floor these to another model without a word
        (lambda d: d["backbone_config"].update(depths=[1, 1, 1.5, 1]), r"depths: whole numbers only, got 1.5"),
        (lambda d: d["backbone_config"].update(num_heads=[1, True, 2, 2]), r"num_heads: whole numbers only, got True"),
    ],
)
def test_bad_configs_name_the_file_and_field(tmp_path, edit, pattern):
    d = tiny_config().to_dict()
    edit(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=pattern) as e:
        Mask2FormerConfig.from_pretrained(tmp_path)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"downsample_in_bottleneck": "no"}, "downsample_in_bottleneck must be true or false"),  # truthy: stride moved
        ({"downsample_in_first_stage": 0}, "downsample_in_first_stage must be true or false"),
        ({"embedding_size": "64"}, "embedding_size must be an integer"),
        ({"num_channels": 0}, "num_channels must be an integer of at least 1"),
    ],
)
def test_bad_resnet_configs_name_the_file_and_field(tmp_path, change, pattern):
    from m2f_deploy.config import ResNetConfig

    d = Mask2FormerConfig(backbone_config=ResNetConfig()).to_dict()
    d["backbone_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=pattern) as e:
        Mask2FormerConfig.from_pretrained(tmp_path)
    assert "config.json" in str(e.value)


def test_config_module_does_not_import_torch():
    code = "import sys, m2f_deploy.config, m2f_deploy.presets; print('torch' in sys.modules)"
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "False"


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_transformers_parameter_count(name):
    """Each registered preset builds the same architecture in transformers and here."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from m2f_deploy.modeling import Mask2Former

    cfg = preset_config(name)
    with torch.device("meta"):
        ours = Mask2Former(cfg)
        hf = transformers.Mask2FormerForUniversalSegmentation(transformers.Mask2FormerConfig(**cfg.to_dict()))
    count = lambda m, skip=(): sum(p.numel() for n, p in m.named_parameters() if not n.startswith(skip))  # noqa: E731
    # our frozen batch norms hold their scale and shift as buffers, transformers' BatchNorm2d as parameters
    frozen = sum(b.numel() for n, b in ours.named_buffers() if n.endswith(("normalization.weight", "normalization.bias")))
    # transformers also holds the unused final Swin LayerNorm
    assert count(ours) + frozen == count(hf, skip=("model.pixel_level_module.encoder.swin.layernorm",))


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'swin-tiny-coco-panoptic'"):
        preset_config("swin-tiny-coco-panoptc")
