"""Panoptic segmentation, fast: HF's segments and map, with exact values only where bounds do not decide.

HF: queries whose best class is not "no object" and scores above ``threshold``; their mask probabilities
resized (bilinear) to the target size, weighted by the score; every pixel goes to the query with the highest
weighted probability; a query becomes a segment when it owns pixels and owns more than
``overlap_mask_area_threshold`` of the pixels where its weighted probability reaches ``mask_threshold`` (the
ratio in float32, as torch divides). Segment ids from 1, a fused label reuses its id (and HF then continues
counting from that id, so later ids can repeat: kept). An int32 map, or a float map of -1 without segments.

Here: queries that cannot pass the score filter are dropped before anything is resized; the weighted
probabilities of the kept ones are bounded per logit window (:mod:`.windows`), owners decided per cell where the
bounds agree and computed exactly elsewhere (:func:`_panoptic_assignment`). The segment test needs, per query,
the pixels it owns (exact, from the owner map) and the pixels where it reaches ``mask_threshold``: the latter are
bounded from the windows, then from the exact values at the corners of the cells in doubt, and counted pixel by
pixel only when the test still depends on them (the test can only turn from true to false as the count grows).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from m2f_deploy.processing.postprocess.cells import TOL, leaders
from m2f_deploy.processing.postprocess.common import (
    FLOAT32_MIN,
    WORKING_SIZE,
    Size,
    TargetSizes,
    per_image,
    sigmoid,
    softmax,
)
from m2f_deploy.processing.postprocess.threads import SERIAL, Workers
from m2f_deploy.processing.postprocess.windows import WorkingGrid, agreeing_cells, cells_to, working_grid


def panoptic_segmentation(
    outputs: Any,
    threshold: float = 0.5,
    mask_threshold: float = 0.5,
    overlap_mask_area_threshold: float = 0.8,
    label_ids_to_fuse: Collection[int] | None = None,
    target_sizes: TargetSizes = None,
    pixel_mask: np.ndarray | None = None,
    workers: Workers = SERIAL,
) -> list[dict[str, Any]]:
    """Per image: ``{"segmentation", "segments_info"}``.

    ``segmentation``: ``[H, W]`` int32 segment ids (0: none), or float32 -1 everywhere when no query passes
    ``threshold``. ``segments_info``: ``{"id", "label_id", "was_fused", "score"}`` per segment, in query order.
    ``workers``: see :mod:`.threads`.
    """
    fuse = set() if label_ids_to_fuse is None else set(label_ids_to_fuse)
    results = []
    for classes, masks, size, region in per_image(outputs, target_sizes, pixel_mask):
        grid = working_grid(masks.shape[1:], region)
        probs = softmax(classes)
        scores, labels = probs.max(axis=1), probs.argmax(axis=1)
        keep = np.flatnonzero((labels != probs.shape[1] - 1) & (scores > threshold))
        if keep.size == 0:
            results.append({"segmentation": np.full(size or WORKING_SIZE, -1, np.float32), "segments_info": []})
            continue
        is_segment = _overlap_test(overlap_mask_area_threshold)
        owner, segment = _panoptic_assignment(
            masks[keep], scores[keep], mask_threshold, is_segment, size or WORKING_SIZE, grid, workers
        )
        ids = np.zeros(keep.size, np.int32)
        segments: list[dict[str, Any]] = []
        current, fused_ids = 0, {}
        for k in np.flatnonzero(segment):
            query = keep[k]
            label = int(labels[query])
            current = fused_ids[label] if label in fused_ids else current + 1
            ids[k] = current
            was_fused = label in fuse
            score = round(float(scores[query]), 6)
            segments.append({"id": current, "label_id": label, "was_fused": was_fused, "score": score})
            if was_fused:
                fused_ids[label] = current
        results.append({"segmentation": ids[owner], "segments_info": segments})
    return results


def _overlap_test(overlap_mask_area_threshold: float) -> Callable[[int, int], bool]:
    """HF's segment test on a query's pixel counts: it owns pixels, some reach ``mask_threshold``, and the owned
    ones are more than ``overlap_mask_area_threshold`` of those (the ratio in float32, as torch divides).

    For ``owned > 0`` the test can only turn from true to false as ``reached`` grows: float32 rounding and
    division are monotone.
    """

    def is_segment(owned: int, reached: int) -> bool:
        if not (owned > 0 and reached > 0):
            return False
        return float(np.float32(owned) / np.float32(reached)) > overlap_mask_area_threshold

    return is_segment


def _panoptic_assignment(
    masks: np.ndarray,
    scores: np.ndarray,
    mask_threshold: float,
    is_segment: Callable[[int, int], bool],
    size: Size,
    grid: WorkingGrid,
    workers: Workers,
) -> tuple[np.ndarray, np.ndarray]:
    """Owner query of every target pixel ``[H, W]`` (int32), and which queries become segments ``[K]`` (bool).

    ``masks``: ``[K, h, w]`` mask logits of the kept queries, ``scores``: ``[K]``. As in semantic segmentation,
    the first decisions are taken per logit window: the sigmoid of a window's extreme logits, weighted by the
    score, bounds the query's weighted probability at every working-grid pixel that reads the window. A cell
    whose four corners read windows where the same query leads by more than ``TOL`` belongs to that query
    whole; exact weighted probabilities are computed only at the corners of the other cells (a query's mask
    usually saturates away from its border, so those are few), which decide most of them the same way, and
    they are resampled exactly at the target pixels of the cells left.
    """
    num, (h, w) = len(masks), masks.shape[1:]
    cells = cells_to(size)
    low, high = grid.window_range(sigmoid(masks.copy()))  # [K, h * w]
    low *= scores[:, None]
    high *= scores[:, None]
    best, lead, rival = leaders(low, high, FLOAT32_MIN, workers)
    sure, lowest = agreeing_cells(cells, grid, best, lead - rival, TOL)
    points = cells.corners(~sure)
    weighted = sigmoid(grid.sample(masks, points))  # [K, n], at the working-grid points
    weighted *= scores[:, None]
    owner = cells.certified_argmax(
        weighted,
        weighted,
        np.arange(num, dtype=np.int32),
        FLOAT32_MIN,
        TOL,
        lambda at, _: weighted[:, np.searchsorted(points, at)],
        decided=(sure, lowest, points),
        exact=True,
        workers=workers,
    )

    # HF's segment test needs how many pixels each query owns (exact, from the owner map) and how many reach
    # mask_threshold: bounds from the windows often settle the test; otherwise the count is made exact.
    owned = np.bincount(owner.reshape(-1), minlength=num)
    segment = np.zeros(num, bool)
    owning = np.flatnonzero(owned > 0)
    bounds = cells.count_bounds(
        low[owning].reshape(-1, h, w), high[owning].reshape(-1, h, w), mask_threshold, TOL, grid.windows
    )
    for i, k in enumerate(owning):

        def settled(lo: int, hi: int, k: int = k) -> bool:
            return hi == 0 or (lo > 0 and is_segment(owned[k], lo) == is_segment(owned[k], hi))

        if bounds is None or not settled(bounds[0][i], bounds[1][i]):  # pixel counts made exact where needed
            reached = cells.count_reaching(
                low[k].reshape(h, w),
                high[k].reshape(h, w),
                scores[k],
                mask_threshold,
                TOL,
                lambda at, k=k: sigmoid(grid.sample(masks[k : k + 1], at))[0],
                via=grid.windows,
                settled=settled,
            )
        else:
            reached = (int(bounds[0][i]), int(bounds[1][i]))
        segment[k] = is_segment(int(owned[k]), reached[1])
    return owner, segment
