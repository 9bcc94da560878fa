"""Fake Mask2Former outputs for tests, benchmarks and smoke checks (no model needed; numpy and Pillow only).

``"scene"`` outputs look like a trained model's: "stuff" queries whose masks tile the image in bands, confident
object queries with blob-shaped masks in front of them (objects overlap each other and cut into the stuff),
a few hesitant queries near the usual thresholds, and "no object" queries with mostly negative masks.
``"noise"`` outputs are plain standard-normal logits, where almost nothing passes a threshold. ``"untrained"``
outputs look like a model's with random weights: class logits share one offset per class across all queries
(so the same few classes lead everywhere, by small margins) and mask logits are faint noise around 0 (every mask
probability near 0.5).
"""

from __future__ import annotations

import numpy as np

from m2f_deploy.data.shapes import smooth_noise


def synthetic_outputs(
    batch: int = 1,
    num_queries: int = 100,
    num_classes: int = 133,
    mask_size: tuple[int, int] = (96, 128),
    kind: str = "scene",
    objects: int = 10,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``class_queries_logits`` ``[B, Q, C+1]`` and ``masks_queries_logits`` ``[B, Q, h, w]``, float32.

    ``kind="scene"``: per image three stuff queries, ``objects`` object queries and ``objects // 3 + 1``
    hesitant ones (as many as ``num_queries`` allows), the rest "no object". ``kind="noise"``: standard normal.
    ``kind="untrained"``: class logits N(0, 0.28) per class plus N(0, 0.12) per query, mask logits N(0, 0.075) (as
    measured on a random-weight Swin-T model's outputs).
    """
    rng = np.random.default_rng(seed)
    h, w = mask_size
    if kind == "noise":
        classes = rng.standard_normal((batch, num_queries, num_classes + 1))
        masks = rng.standard_normal((batch, num_queries, h, w))
        return {"class_queries_logits": classes.astype(np.float32), "masks_queries_logits": masks.astype(np.float32)}
    if kind == "untrained":
        offsets = rng.normal(0.0, 0.28, (batch, 1, num_classes + 1))
        classes = offsets + rng.normal(0.0, 0.12, (batch, num_queries, num_classes + 1))
        masks = rng.normal(0.0, 0.075, (batch, num_queries, h, w))
        return {"class_queries_logits": classes.astype(np.float32), "masks_queries_logits": masks.astype(np.float32)}
    if kind != "scene":
        raise ValueError(f"kind must be 'scene', 'noise' or 'untrained', got {kind!r}")

    classes = rng.normal(-2.5, 1.2, (batch, num_queries, num_classes + 1))
    classes[..., -1] = rng.uniform(4.0, 8.0, (batch, num_queries))  # "no object"
    masks = -4.0 + 3.0 * _noise(rng, mask_size, (batch, num_queries))
    ys, xs = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    for b in range(batch):
        stuff, hesitant = 3, objects // 3 + 1
        chosen = rng.permutation(num_queries)[: stuff + objects + hesitant]
        in_front = np.zeros(mask_size)
        for rank, q in enumerate(chosen[stuff:]):
            classes[b, q, -1] = rng.normal()
            confidence = rng.uniform(5.0, 9.0) if rank < objects else rng.uniform(1.5, 3.5)
            classes[b, q, rng.integers(num_classes)] = confidence
            masks[b, q] = _blob(rng, ys, xs) + _noise(rng, mask_size)
            in_front = np.maximum(in_front, masks[b, q])
        # stuff: bands across the image along a random direction, pushed back where objects are
        angle = rng.uniform(0, np.pi)
        along = np.cos(angle) * ys + np.sin(angle) * xs + 0.1 * _noise(rng, mask_size)
        cuts = np.quantile(along, np.sort(rng.uniform(0.2, 0.8, stuff - 1)))
        edges = np.concatenate([[-np.inf], cuts, [np.inf]])
        for band, q in enumerate(chosen[:stuff]):
            classes[b, q, -1] = rng.normal()
            classes[b, q, rng.integers(num_classes)] = rng.uniform(5.0, 9.0)
            outside = np.maximum(edges[band] - along, 0) + np.maximum(along - edges[band + 1], 0)
            masks[b, q] = 8.0 - 60.0 * outside - 5.0 * np.maximum(in_front + 1, 0) + _noise(rng, mask_size)
    return {"class_queries_logits": classes.astype(np.float32), "masks_queries_logits": masks.astype(np.float32)}


def _blob(rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Logits of an elliptical object: positive inside, falling off outside, clipped to [-15, 15]."""
    radius = rng.uniform(0.06, 0.3, 2)
    centre = rng.uniform(0.1, 0.9, 2)
    angle = rng.uniform(0, np.pi)
    dy, dx = ys - centre[0], xs - centre[1]
    u = (dy * np.cos(angle) + dx * np.sin(angle)) / radius[0]
    v = (-dy * np.sin(angle) + dx * np.cos(angle)) / radius[1]
    return np.clip(rng.uniform(4.0, 12.0) * (1.0 - (u**2 + v**2)), -15.0, 15.0)


def _noise(rng: np.random.Generator, size: tuple[int, int], lead: tuple[int, ...] = ()) -> np.ndarray:
    """Standard-normal noise on an 8x coarser grid, bilinearly upsampled: ``[*lead, h, w]``."""
    grid = (max(2, size[0] // 8), max(2, size[1] // 8))
    return smooth_noise(rng, size, grid, lead, normal=True, cubic=False)
