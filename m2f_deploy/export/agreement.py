"""Agreement of two models on the same inputs: an exported graph against its PyTorch reference (numpy only).

What a user sees, rather than logits: the share of semantic-map pixels that are the same, and how many panoptic
segments of the reference have a counterpart in the other model's result. The export's validation gate, the INT8
gate and ``m2f-validate`` all measure it here. Accuracy against ground truth is :mod:`m2f_deploy.evaluation`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from m2f_deploy.errors import InputError
from m2f_deploy.evaluation import IOU_MATCH


def _paired(reference: Sequence[Any], other: Sequence[Any], what: str) -> list[tuple[Any, Any]]:
    if len(reference) != len(other):
        raise InputError(f"{what}: {len(reference)} reference results against {len(other)} others; give one per image")
    return list(zip(reference, other, strict=True))


def semantic_agreement(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    """Share (0..1) of identical pixels of two lists of semantic maps ``[H, W]``, averaged over the images."""
    pairs = _paired(reference, other, "semantic agreement")
    if not pairs:
        raise InputError("semantic agreement: no images")
    shares = []
    for a, b in pairs:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise InputError(f"semantic agreement: maps of shapes {a.shape} and {b.shape}")
        shares.append(float(np.mean(a == b)))
    return float(np.mean(shares))


def matched_segments(reference: Sequence[Mapping[str, Any]], other: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """How many panoptic segments of ``reference`` have a segment of the same label in ``other`` with IoU above
    :data:`~m2f_deploy.evaluation.IOU_MATCH` (0.5, strictly: panopticapi's rule, which PQ uses too).

    Both are lists of panoptic post-process results for the same images. Returns ``(matched, total)``.
    """
    matched = total = 0
    for a, b in _paired(reference, other, "matched segments"):
        ids_a, ids_b = np.asarray(a["segmentation"]), np.asarray(b["segmentation"])
        if ids_a.shape != ids_b.shape:
            raise InputError(f"matched segments: segmentations of shapes {ids_a.shape} and {ids_b.shape}")
        for sa in a["segments_info"]:
            total += 1
            mask_a = ids_a == sa["id"]
            for sb in b["segments_info"]:
                if sb["label_id"] != sa["label_id"]:
                    continue
                mask_b = ids_b == sb["id"]
                union = int((mask_a | mask_b).sum())
                if union and int((mask_a & mask_b).sum()) / union > IOU_MATCH:
                    matched += 1
                    break
    return matched, total
