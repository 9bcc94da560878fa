"""The tiny Mask2Former architecture the tests and the benchmarks' smoke modes build (random weights, ~0.2M
parameters, a Swin backbone of four stages): small enough for seconds on a CPU, every part of the model present."""

from __future__ import annotations

from typing import Any

TINY: dict[str, Any] = dict(
    backbone_config=dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], window_size=4),
    feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64, encoder_layers=2,
    decoder_layers=4, num_attention_heads=4, dim_feedforward=64, num_queries=10,
    id2label={i: f"thing{i}" for i in range(5)},
)  # fmt: skip
"""``Mask2FormerConfig.from_dict`` keys of the tiny model."""


def tiny_config_dict(**overrides: Any) -> dict[str, Any]:
    """:data:`TINY` with ``overrides`` (``backbone_config`` merged key by key)."""
    d = {**TINY, **overrides}
    d["backbone_config"] = {**TINY["backbone_config"], **overrides.get("backbone_config", {})}
    return d
