"""The whole model: Swin or ResNet backbone -> pixel decoder -> masked-attention decoder -> heads."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from m2f_deploy.config import Mask2FormerConfig, ResNetConfig
from m2f_deploy.modeling.pixel_decoder import PixelDecoder
from m2f_deploy.modeling.resnet import ResNetBackbone
from m2f_deploy.modeling.swin import SwinBackbone
from m2f_deploy.modeling.transformer_decoder import TransformerModule

NORMS = (nn.LayerNorm, nn.GroupNorm)


class Mask2FormerOutput(NamedTuple):
    """The two logits, named as transformers names them.

    class_queries_logits: [B, Q, num_labels + 1] (the last class is "no object")
    masks_queries_logits: [B, Q, H/4, W/4]
    auxiliary_logits: per earlier decoder layer, a dict of both logits (only when asked for)
    """

    class_queries_logits: Tensor
    masks_queries_logits: Tensor
    auxiliary_logits: list[dict[str, Tensor]] | None = None


def numpy_logits(output: Any) -> dict[str, np.ndarray]:
    """The two logits of a model's output (ours or transformers') as float32 numpy arrays on the CPU, by name:
    what the post-processes and the runtime take."""
    return {
        name: getattr(output, name).detach().float().cpu().numpy()
        for name in ("class_queries_logits", "masks_queries_logits")
    }


class PixelLevelModule(nn.Module):
    """Backbone (``encoder``: Swin or ResNet, four maps at strides 4-32) and pixel decoder (``decoder``); named as
    transformers names them, so that checkpoint keys match. Run by :class:`Mask2Former`."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        backbone = ResNetBackbone if isinstance(config.backbone_config, ResNetConfig) else SwinBackbone
        self.encoder = backbone(config.backbone_config)
        self.decoder = PixelDecoder(config, self.encoder.channels)


class Mask2FormerModel(nn.Module):
    """The pixel-level module and the transformer module (queries, masked-attention decoder) under transformers'
    checkpoint names; :class:`Mask2Former` runs them and adds the class head."""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        self.pixel_level_module = PixelLevelModule(config)
        self.transformer_module = TransformerModule(config)


class Mask2Former(nn.Module):
    """Inference-only Mask2Former equal to transformers' ``Mask2FormerForUniversalSegmentation``.

    ``state_dict()`` keys are the checkpoint keys of the Hugging Face format on disk.
    """

    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        self.config = config
        self.model = Mask2FormerModel(config)
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)

    def forward(self, pixel_values: Tensor, output_auxiliary_logits: bool = False) -> Mask2FormerOutput:
        """pixel_values: [B, 3, H, W] normalised float (H, W multiples of 32 for export)."""
        plm = self.model.pixel_level_module
        mask_features, multi_scale = plm.decoder(plm.encoder(pixel_values))
        states, masks = self.model.transformer_module(multi_scale, mask_features, auxiliary=output_auxiliary_logits)
        classes = [self.class_predictor(s) for s in states]
        aux = None
        if output_auxiliary_logits:
            aux = [
                {"class_queries_logits": c, "masks_queries_logits": m}
                for c, m in zip(classes[:-1], masks[:-1])
            ]
        return Mask2FormerOutput(classes[-1], masks[-1], aux)

    @classmethod
    def random(cls, config: Mask2FormerConfig, seed: int = 0) -> Mask2Former:
        """A model with seeded random weights (latency work, tests): N(0, 0.02) weights, unit norms."""
        model = cls(config)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            for m in model.modules():
                if isinstance(m, NORMS):
                    m.weight.fill_(1.0)
                    m.bias.fill_(0.0)
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.class_predictor.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.class_predictor.weight.dtype
