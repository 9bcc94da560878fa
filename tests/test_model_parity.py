"""Our reference model against transformers' Mask2FormerForUniversalSegmentation (random weights).

Checkpoints are written by transformers' own ``save_pretrained`` and read back by ``load_model``;
the comparison is on the two logits, max abs difference <= 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from factory import save_hf_checkpoint, tiny_config

from m2f_deploy import load_model
from m2f_deploy.presets import preset_config

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def _compare(folder, batch, height, width, seed=0):
    hf = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval()
    ours = load_model(folder)
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, height, width)
    with torch.no_grad():
        ref, out = hf(x), ours(x)
    for name in ("class_queries_logits", "masks_queries_logits"):
        a, b = getattr(ref, name), getattr(out, name)
        assert a.shape == b.shape, name
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"{name}: max abs diff {diff:.3g} > {TOL}"
        # the outputs must not be degenerate, or the comparison proves nothing
        assert a.std() > 1e-3, name
    return ours, out


VARIANTS = {
    "tiny": {},
    # stage maps 16x24 .. 2x3 with window 7: every stage pads to a window multiple
    "not-window-multiple": {"backbone_config": {"window_size": 7}},
    "pre-norm": {"pre_norm": True},
    "input-projection": {"hidden_dim": 64, "num_attention_heads": 4, "enforce_input_projection": True},
    "gelu-decoder": {"activation_function": "gelu", "decoder_layers": 2},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch,height,width", [(1, 64, 64), (2, 64, 96)])
def test_tiny_variants_match_transformers(tmp_path_factory, variant, batch, height, width):
    folder = save_hf_checkpoint(tiny_config(**VARIANTS[variant]), tmp_path_factory.mktemp(variant))
    _compare(folder, batch, height, width)


def test_auxiliary_logits_match_transformers(tmp_path):
    folder = save_hf_checkpoint(tiny_config(), tmp_path)
    hf = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(folder).eval()
    ours = load_model(folder)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = hf(x, output_auxiliary_logits=True)
        out = ours(x, output_auxiliary_logits=True)
    assert ours(x).auxiliary_logits is None
    assert len(out.auxiliary_logits) == len(ref.auxiliary_logits) == ours.config.decoder_layers - 1
    for a, b in zip(ref.auxiliary_logits, out.auxiliary_logits):
        for k in ("class_queries_logits", "masks_queries_logits"):
            assert (a[k] - b[k]).abs().max() <= TOL


@pytest.fixture(scope="module")
def swin_tiny(tmp_path_factory):
    return save_hf_checkpoint(preset_config("swin-tiny-coco-panoptic"), tmp_path_factory.mktemp("swin-t"))


@pytest.mark.slow
@pytest.mark.parametrize("batch,height,width", [(1, 384, 384), (2, 256, 352)])
def test_swin_tiny_architecture_matches_transformers(swin_tiny, batch, height, width):
    _, out = _compare(swin_tiny, batch, height, width)
    assert out.class_queries_logits.shape == (batch, 100, 134)
    assert out.masks_queries_logits.shape == (batch, 100, height // 4, width // 4)
