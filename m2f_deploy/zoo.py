"""The official Mask2Former model zoo's configs, as data: what a detectron2 ``.pkl`` / ``.pth`` does not carry (no torch).

A detectron2 checkpoint holds weights only; the architecture, the number of queries, the class names and the test
input size live in the release's YAML configs (facebookresearch/Mask2Former ``configs/<dataset>/<task>/...yaml``,
resolved through their ``_BASE_`` chains). Each entry here is named ``<dataset>-<task>/<config file stem>`` and
records those settings. Every entry shares the decoder settings of the release (hidden and pixel-decoder width 256,
6 deformable encoder layers, DEC_LAYERS 10, 8 heads, feed-forward 2048, post-norm) and its input normalisation
(RGB, ImageNet mean and std in 0-255 units: the Hugging Face processor defaults). Class names come from
detectron2's ``builtin_meta.py`` (``zoo_labels.json``), in the contiguous order of the models' outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from m2f_deploy.artifact import DEFAULT_PREPROCESSING
from m2f_deploy.config import Mask2FormerConfig, ResNetConfig, SwinConfig
from m2f_deploy.errors import ConfigError
from m2f_deploy.utils import did_you_mean

BACKBONES: dict[str, dict[str, Any]] = {
    "R50": {"model_type": "resnet", "depths": [3, 4, 6, 3]},
    "R101": {"model_type": "resnet", "depths": [3, 4, 23, 3]},
    "swin_tiny": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
    "swin_small": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24], "window_size": 7},
    "swin_base_384": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32], "window_size": 12},
    "swin_large_384": {"embed_dim": 192, "depths": [2, 2, 18, 2], "num_heads": [6, 12, 24, 48], "window_size": 12},
}

# dataset-task -> (labels key in zoo_labels.json, test shortest edge, test longest edge)
DATASETS: dict[str, tuple[str, int, int]] = {
    "coco-panoptic": ("coco_panoptic", 800, 1333),
    "coco-instance": ("coco_instance", 800, 1333),
    "ade20k-semantic": ("ade20k_semantic", 512, 2048),
    "cityscapes-semantic": ("cityscapes_semantic", 1024, 2048),
    "cityscapes-panoptic": ("cityscapes_semantic", 1024, 2048),  # the 19 train ids, things 11-18
    "cityscapes-instance": ("cityscapes_instance", 1024, 2048),
}

# name -> (backbone, queries[, test shortest edge, longest edge where the config overrides its base])
ZOO: dict[str, tuple] = {
    "coco-panoptic/maskformer2_R50_bs16_50ep": ("R50", 100),
    "coco-panoptic/maskformer2_R101_bs16_50ep": ("R101", 100),
    "coco-panoptic/maskformer2_swin_tiny_bs16_50ep": ("swin_tiny", 100),
    "coco-panoptic/maskformer2_swin_small_bs16_50ep": ("swin_small", 100),
    "coco-panoptic/maskformer2_swin_base_384_bs16_50ep": ("swin_base_384", 100),
    "coco-panoptic/maskformer2_swin_base_IN21k_384_bs16_50ep": ("swin_base_384", 100),
    "coco-panoptic/maskformer2_swin_large_IN21k_384_bs16_100ep": ("swin_large_384", 200),
    "coco-instance/maskformer2_R50_bs16_50ep": ("R50", 100),
    "coco-instance/maskformer2_R101_bs16_50ep": ("R101", 100),
    "coco-instance/maskformer2_swin_tiny_bs16_50ep": ("swin_tiny", 100),
    "coco-instance/maskformer2_swin_small_bs16_50ep": ("swin_small", 100),
    "coco-instance/maskformer2_swin_base_384_bs16_50ep": ("swin_base_384", 100),
    "coco-instance/maskformer2_swin_base_IN21k_384_bs16_50ep": ("swin_base_384", 100),
    "coco-instance/maskformer2_swin_large_IN21k_384_bs16_100ep": ("swin_large_384", 200),
    "ade20k-semantic/maskformer2_R50_bs16_160k": ("R50", 100),
    "ade20k-semantic/maskformer2_R101_bs16_90k": ("R101", 100),
    "ade20k-semantic/maskformer2_swin_tiny_bs16_160k": ("swin_tiny", 100),
    "ade20k-semantic/maskformer2_swin_small_bs16_160k": ("swin_small", 100),
    "ade20k-semantic/maskformer2_swin_base_384_bs16_160k_res640": ("swin_base_384", 100, 640, 2560),
    "ade20k-semantic/maskformer2_swin_base_IN21k_384_bs16_160k_res640": ("swin_base_384", 100, 640, 2560),
    "ade20k-semantic/maskformer2_swin_large_IN21k_384_bs16_160k_res640": ("swin_large_384", 100, 640, 2560),
    **{
        f"cityscapes-{task}/maskformer2_{backbone}_bs16_90k": (
            {"swin_base_IN21k_384": "swin_base_384", "swin_large_IN21k_384": "swin_large_384"}.get(backbone, backbone),
            200 if backbone == "swin_large_IN21k_384" and task != "semantic" else 100,
        )
        for task in ("semantic", "panoptic", "instance")
        for backbone in ("R50", "R101", "swin_tiny", "swin_small", "swin_base_IN21k_384", "swin_large_IN21k_384")
    },
}


@dataclass
class ZooConfig:
    """One model-zoo entry: the model config (with class names) and the processor settings of its test input."""

    name: str
    config: Mask2FormerConfig
    preprocessing: dict[str, Any] = field(default_factory=dict)


@cache
def _labels() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "zoo_labels.json").read_text(encoding="utf-8"))


def labels(dataset_task: str) -> list[str]:
    """Class names of a ``<dataset>-<task>`` (a key of :data:`DATASETS`), in output order."""
    return list(_labels()[DATASETS[dataset_task][0]]["labels"])


def zoo_config(name: str, *, num_queries: int | None = None, id2label: dict[int, str] | None = None) -> ZooConfig:
    """The named entry of :data:`ZOO`, with optional overrides (a fine-tuned model's queries or classes)."""
    if name not in ZOO:
        raise ConfigError(f"unknown model-zoo config {name!r}{did_you_mean(name, ZOO)}; see m2f_deploy.zoo.ZOO")
    dataset_task = name.split("/", 1)[0]
    backbone, queries, *size = ZOO[name]
    _, short, long = DATASETS[dataset_task]
    short, long = size or (short, long)
    spec = dict(BACKBONES[backbone])
    backbone_config = ResNetConfig.from_dict(spec) if spec.get("model_type") == "resnet" else SwinConfig(**spec)
    if num_queries is not None and num_queries < 1:
        raise ConfigError(f"num_queries must be at least 1, got {num_queries}")
    config = Mask2FormerConfig(
        backbone_config=backbone_config,
        num_queries=num_queries or queries,
        id2label=id2label if id2label is not None else dict(enumerate(labels(dataset_task))),
    )
    preprocessing = {**DEFAULT_PREPROCESSING, "size": {"shortest_edge": short, "longest_edge": long}}
    return ZooConfig(name, config, preprocessing)
