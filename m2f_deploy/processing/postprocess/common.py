"""What every post-process shares: the working grid's size, reading and checking the outputs and arguments,
softmax and sigmoid. Used by the fast path and by :mod:`.reference` alike."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from m2f_deploy.errors import InputError

WORKING_SIZE = (384, 384)
"""HF resizes mask logits to this grid before anything else, for every model and input size."""

FLOAT32_MIN = float(np.finfo(np.float32).min)

Size = tuple[int, int]
Region = tuple[Size, Size]
"""An image's valid region in its padded input: ((valid height, valid width), (padded height, padded width))."""
TargetSizes = Sequence[Sequence[int]] | np.ndarray | None


def read_outputs(outputs: Any) -> tuple[np.ndarray, np.ndarray]:
    """``class_queries_logits`` ``[B, Q, C+1]`` and ``masks_queries_logits`` ``[B, Q, h, w]`` as float32.

    ``outputs`` is a mapping (e.g. onnxruntime results by name) or an object with the two attributes (e.g.
    ``Mask2FormerForUniversalSegmentationOutput``); values are numpy arrays or anything ``np.asarray`` takes.
    """
    arrays = []
    for name, shape in (("class_queries_logits", "[B, Q, C+1]"), ("masks_queries_logits", "[B, Q, h, w]")):
        try:
            value = outputs[name] if isinstance(outputs, Mapping) else getattr(outputs, name)
        except (KeyError, AttributeError):
            raise InputError(f"outputs has no {name!r} (expected {shape} logits)") from None
        array = np.asarray(value)
        if array.dtype.kind not in "fiu":
            raise InputError(f"{name} must hold real numbers, got dtype {array.dtype}")
        if array.ndim != len(shape.split(",")):
            raise InputError(f"{name} must have shape {shape}, got {array.shape}")
        if 0 in array.shape:
            raise InputError(f"{name} is empty: shape {array.shape}")
        array = array.astype(np.float32, copy=False)
        if not (np.isfinite(array.min()) and np.isfinite(array.max())):  # min and max propagate NaN
            raise InputError(f"{name} contains NaN or infinite values")
        arrays.append(array)
    classes, masks = arrays
    if classes.shape[:2] != masks.shape[:2]:
        raise InputError(
            f"class_queries_logits {classes.shape} and masks_queries_logits {masks.shape} disagree on batch or "
            "query count"
        )
    if classes.shape[2] < 2:
        raise InputError(f"class_queries_logits needs at least one class plus 'no object', got {classes.shape}")
    return classes, masks


def target_sizes_of(target_sizes: TargetSizes, batch: int) -> list[Size | None]:
    """Per image: the (height, width) to resize to, or None (the working grid), checked."""
    if target_sizes is None:
        return [None] * batch
    try:
        sizes = np.asarray(target_sizes)
    except (TypeError, ValueError) as err:
        raise InputError(f"target_sizes must be {batch} (height, width) pairs: {err}") from None
    if sizes.ndim != 2 or sizes.shape[1] != 2 or sizes.dtype.kind not in "iuf":
        raise InputError(f"target_sizes must be {batch} (height, width) pairs, got {sizes.tolist()!r}")
    if len(sizes) != batch:
        raise InputError(f"target_sizes has {len(sizes)} entries but the outputs hold {batch} images")
    if (sizes != np.round(sizes)).any() or (sizes < 1).any():
        raise InputError(f"target_sizes must be positive whole numbers, got {sizes.tolist()!r}")
    return [(int(h), int(w)) for h, w in sizes]


def valid_regions(pixel_mask: np.ndarray | None, batch: int) -> list[Region | None]:
    """Per image: ((valid height, valid width), (padded height, padded width)), from preprocess' pixel_mask."""
    if pixel_mask is None:
        return [None] * batch
    mask = np.asarray(pixel_mask)
    if mask.ndim != 3 or mask.shape[0] != batch:
        raise InputError(f"pixel_mask must have shape [{batch}, H, W] (one per image), got {mask.shape}")
    regions: list[Region | None] = []
    for i, m in enumerate(mask != 0):
        height, width = int(m.any(axis=1).sum()), int(m.any(axis=0).sum())
        if height == 0 or not m[:height, :width].all() or m.sum() != height * width:
            raise InputError(f"pixel_mask[{i}] must be a non-empty top-left rectangle of ones, as preprocess makes")
        regions.append(((height, width), m.shape))
    return regions


def per_image(
    outputs: Any, target_sizes: TargetSizes, pixel_mask: np.ndarray | None
) -> Iterator[tuple[np.ndarray, np.ndarray, Size | None, Region | None]]:
    """Per image: class logits ``[Q, C+1]``, mask logits ``[Q, h, w]``, target size, valid region (all checked)."""
    classes, masks = read_outputs(outputs)
    batch = classes.shape[0]
    sizes = target_sizes_of(target_sizes, batch)
    regions = valid_regions(pixel_mask, batch)
    for b in range(batch):
        yield classes[b], masks[b], sizes[b], regions[b]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=-1, keepdims=True)
    return shifted


def sigmoid(values: np.ndarray) -> np.ndarray:
    """Sigmoid, in place."""
    with np.errstate(over="ignore"):  # exp overflows to inf for logits below about -88: 1 / inf = 0 is right
        np.negative(values, out=values)
        np.exp(values, out=values)
    values += 1
    np.reciprocal(values, out=values)
    return values


