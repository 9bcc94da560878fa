"""Run-length encoding in the format HF's ``convert_segmentation_to_rle`` returns.

Not pycocotools' compressed RLE (that one is :func:`m2f_deploy.coco.coco_rle`): HF flattens row-major and lists ``[start, length, start, length, ...]`` with
1-based starts, one list per distinct value of the segmentation map (background ``-1`` included), values in
ascending order.
"""

from __future__ import annotations

import numpy as np


def binary_mask_to_rle(mask: np.ndarray) -> list[int]:
    """Runs of the nonzero pixels of ``mask`` ``[H, W]``: ``[start_1, length_1, start_2, length_2, ...]``."""
    flat = np.asarray(mask).reshape(-1) != 0
    edges = np.flatnonzero(np.diff(flat.astype(np.int8), prepend=0, append=0)) + 1  # run starts and ends, 1-based
    runs = edges.copy()
    runs[1::2] -= edges[0::2]
    return runs.tolist()


def segmentation_to_rle(segmentation: np.ndarray) -> list[list[int]]:
    """One run list per distinct value of ``segmentation`` ``[H, W]``, in ascending order of the values."""
    return [binary_mask_to_rle(segmentation == value) for value in np.unique(segmentation)]
