"""Random-weight Hugging Face checkpoints written by transformers itself (test helper)."""

from __future__ import annotations

from pathlib import Path

import torch

from m2f_deploy.config import Mask2FormerConfig
from m2f_deploy.testing.configs import tiny_config_dict


def tiny_config(**overrides) -> Mask2FormerConfig:
    return Mask2FormerConfig.from_dict(tiny_config_dict(**overrides))


def save_hf_checkpoint(config: Mask2FormerConfig, folder: Path, seed: int = 0, perturb: bool = True) -> Path:
    """Build transformers' model from our config, randomise it, ``save_pretrained`` it.

    transformers initialises some weights to constants (zeros, ones); ``perturb`` adds noise to
    every floating tensor so that a mix-up of two parameters cannot go unnoticed.
    """
    from transformers import Mask2FormerConfig as HFConfig
    from transformers import Mask2FormerForUniversalSegmentation

    torch.manual_seed(seed)
    hf = Mask2FormerForUniversalSegmentation(HFConfig(**config.to_dict())).eval()
    if perturb:
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    hf.save_pretrained(folder)
    return Path(folder)


def decisive_model(seed: int = 0, **overrides):
    """Our random-weight tiny model, made to find segments: "no object" is unlikely and class scores are spread.

    Random weights put most of each query's probability on "no object" and give mask logits near 0, so
    post-processes find nothing and a comparison of results would compare empty lists.
    """
    from m2f_deploy.modeling import Mask2Former

    model = Mask2Former.random(tiny_config(**overrides), seed=seed)
    with torch.no_grad():
        model.class_predictor.weight.mul_(8.0)
        model.class_predictor.bias[-1] = -6.0
        # mask logits of a few units rather than ~1e-3: masks with shapes, not sigmoid(0) everywhere
        model.model.pixel_level_module.decoder.mask_projection.weight.mul_(100.0)
        model.model.transformer_module.decoder.mask_predictor.mask_embedder[2][0].weight.mul_(100.0)
    return model.eval()
