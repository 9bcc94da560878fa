"""Instance segmentation, fast: HF's segments, and only the masks that can become segments.

HF: the top-``Q`` (query, class) pairs of the class probabilities; each pair's mask is ``logits > 0`` on the
working grid, its score the class probability times the mean mask probability inside the mask; masks are resized
(nearest) to the target size; pairs whose mask is not empty and whose score reaches ``threshold`` become segments
(ids from 0, background -1, a float map). ``mask_threshold`` and ``overlap_mask_area_threshold`` are accepted but
unused, as in HF. Here, a pair's class probability bounds its score (the mean mask probability is below 1), so
only the masks of pairs whose class probability reaches the threshold are resized.

Order, where we differ from HF on purpose (:func:`segment_order`; :mod:`.reference` states the same order in its own
code, so that the oracle does not share ours): HF walks its
top-k pairs in the order ``torch.topk(sorted=False)`` leaves them, which depends on how torch was built (the C++
standard library's selection algorithm). We return the same segments with the same scores, ordered by score
descending (ties: by query, then class); ids follow that order, and where masks overlap the pixel goes to the
segment of highest score (the first in that order). The top-k itself is taken by class probability descending,
ties by query then class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from m2f_deploy.errors import InputError
from m2f_deploy.processing.postprocess.common import WORKING_SIZE, Size, TargetSizes, per_image, sigmoid, softmax
from m2f_deploy.processing.postprocess.resample import nearest
from m2f_deploy.processing.postprocess.threads import SERIAL, Workers
from m2f_deploy.processing.postprocess.windows import WorkingGrid, working_grid
from m2f_deploy.processing.rle import segmentation_to_rle


def top_pairs(probs: np.ndarray, k: int) -> np.ndarray:
    """Flat indices (``query * C + class``) of the ``k`` largest of ``probs`` ``[Q, C]``, largest first, ties by
    index: ``[k]`` int64."""
    flat = probs.reshape(-1)
    if k < flat.size:  # every value that can be among the k largest, then an exact order of those
        kth = np.partition(flat, flat.size - k)[flat.size - k]
        candidates = np.flatnonzero(flat >= kth)
    else:
        candidates = np.arange(flat.size)
    return candidates[np.lexsort((candidates, -flat[candidates]))][:k].astype(np.int64)


def segment_order(scores: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """The order of segments ``[N]`` with float32 ``scores`` and flat pair indices ``pairs``: score descending,
    ties by pair index (query, then class)."""
    return np.lexsort((pairs, -np.asarray(scores, np.float32)))


def instance_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    target_sizes: TargetSizes = None,
    return_coco_annotation: bool = False,
    return_binary_maps: bool = False,
    pixel_mask: np.ndarray | None = None,
    workers: Workers = SERIAL,
) -> list[dict[str, Any]]:
    """Per image: ``{"segmentation", "segments_info"}``.

    ``segmentation``: ``[H, W]`` float32 segment ids (-1: none); or HF's run-length encoding per distinct id
    with ``return_coco_annotation``; or the instance masks ``[N, H, W]`` float32 with ``return_binary_maps``
    (when there is at least one). ``segments_info``: ``{"id", "label_id", "was_fused": False, "score"}`` per
    segment, in :func:`segment_order`. ``workers`` is accepted for symmetry: this post-process runs on one thread.
    """
    if return_coco_annotation and return_binary_maps:
        raise InputError("return_coco_annotation and return_binary_maps cannot both be True")
    results = []
    for classes, masks, size, region in per_image(outputs, target_sizes, pixel_mask):
        grid = working_grid(masks.shape[1:], region)
        segmentation, segments, instance_masks = _instance(classes, masks, threshold, size, grid, return_binary_maps)
        if return_coco_annotation:
            segmentation = segmentation_to_rle(segmentation)
        elif instance_masks:
            segmentation = np.stack(instance_masks).astype(np.float32)
        results.append({"segmentation": segmentation, "segments_info": segments})
    return results


def _instance(
    classes: np.ndarray,
    masks: np.ndarray,
    threshold: float,
    size: Size | None,
    grid: WorkingGrid,
    with_masks: bool,
) -> tuple[np.ndarray, list[dict[str, Any]], list[np.ndarray]]:
    """Segmentation ``[H, W]``, segments, and (``with_masks``) the instance masks ``[H, W]`` bool of one image."""
    probs = softmax(classes)[:, :-1]
    num_queries, num_classes = probs.shape
    flat = probs.reshape(-1)
    pairs = top_pairs(probs, num_queries)
    # A pair's score is its class probability times a mean mask probability (below 1): pairs below the
    # threshold already cannot pass.
    pairs = pairs[flat[pairs] >= threshold]
    queries, inverse = np.unique(pairs // num_classes, return_inverse=True)

    gh, gw = WORKING_SIZE
    rows, cols = (np.arange(gh), np.arange(gw)) if size is None else (nearest(gh, size[0]), nearest(gw, size[1]))
    segmentation = np.full(WORKING_SIZE, -1, np.float32)
    segments: list[dict[str, Any]] = []
    instance_masks: list[np.ndarray] = []
    if queries.size:
        logits = grid.resize(masks[queries])  # [U, 384, 384]
        inside = logits > 0
        area = inside.sum(axis=(1, 2))
        prob_sum = np.array([sigmoid(lg[m]).sum(dtype=np.float32) for lg, m in zip(logits, inside)], np.float32)
        mask_score = prob_sum / (area.astype(np.float32) + np.float32(1e-6))
        # a mask that nearest resizing reduces to nothing is dropped, as in HF
        used_rows, used_cols = np.unique(rows), np.unique(cols)
        if used_rows.size == gh and used_cols.size == gw:
            visible = area > 0
        else:
            visible = inside[:, used_rows][:, :, used_cols].any(axis=(1, 2))
        scores = flat[pairs] * mask_score[inverse]  # float32, as torch multiplies
        kept = np.flatnonzero(visible[inverse] & (scores.astype(np.float64) >= threshold))
        kept = kept[segment_order(scores[kept], pairs[kept])]
        for rank, k in enumerate(kept):
            label, score = int(pairs[k] % num_classes), round(float(scores[k]), 6)
            segments.append({"id": rank, "label_id": label, "was_fused": False, "score": score})
            if with_masks:
                instance_masks.append(inside[inverse[k]][np.ix_(rows, cols)])
        segmentation = paint([inside[inverse[k]] for k in kept], WORKING_SIZE)
    if size is not None:
        segmentation = segmentation[np.ix_(rows, cols)]
    return segmentation, segments, instance_masks


def paint(masks: Sequence[np.ndarray], shape: Size) -> np.ndarray:
    """Segment ids ``[H, W]`` float32 (-1: none) from the segments' masks in segment order: where masks overlap,
    the first (highest score) wins."""
    segmentation = np.full(shape, -1, np.float32)
    for rank in range(len(masks) - 1, -1, -1):
        segmentation[masks[rank]] = rank
    return segmentation
