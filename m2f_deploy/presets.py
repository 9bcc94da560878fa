"""Named architecture presets (data, not code): the shapes of the released COCO-panoptic models (Swin, ResNet).

A preset builds a :class:`Mask2FormerConfig` with generic class names; weights are random
unless a checkpoint is loaded. Used for latency work and architecture tests.
"""

from __future__ import annotations

from typing import Any

from m2f_deploy.config import Mask2FormerConfig, ResNetConfig, SwinConfig
from m2f_deploy.errors import ConfigError
from m2f_deploy.utils import did_you_mean

_COCO_PANOPTIC = {"num_labels": 133, "num_queries": 100}

PRESETS: dict[str, dict[str, Any]] = {
    # the model zoo's lightest: detectron2's ResNet-50 / 101 (stride in the 3x3 convolution)
    "r50-coco-panoptic": {"backbone": {"model_type": "resnet", "depths": [3, 4, 6, 3]}, **_COCO_PANOPTIC},
    "r101-coco-panoptic": {"backbone": {"model_type": "resnet", "depths": [3, 4, 23, 3]}, **_COCO_PANOPTIC},
    "swin-tiny-coco-panoptic": {
        "backbone": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
        **_COCO_PANOPTIC,
    },
    "swin-small-coco-panoptic": {
        "backbone": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
        **_COCO_PANOPTIC,
    },
    "swin-base-IN21k-coco-panoptic": {
        "backbone": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12},
        **_COCO_PANOPTIC,
    },
    "swin-large-coco-panoptic": {
        "backbone": {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48], "window_size": 12},
        "num_labels": 133,
        "num_queries": 200,
    },
}


def preset_config(name: str) -> Mask2FormerConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{did_you_mean(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    spec = PRESETS[name]
    if spec["backbone"].get("model_type") == "resnet":
        backbone = ResNetConfig.from_dict(spec["backbone"])
    else:
        backbone = SwinConfig(**spec["backbone"], drop_path_rate=0.3)
    return Mask2FormerConfig(
        backbone_config=backbone,
        num_queries=spec["num_queries"],
        id2label={i: f"class_{i}" for i in range(spec["num_labels"])},
    )
