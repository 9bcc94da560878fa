"""Run-length encoding in the format HF's ``convert_segmentation_to_rle`` returns.

Not pycocotools' compressed RLE: HF flattens row-major and lists ``[start, length, start, length, ...]`` with
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


def coco_rle(mask: np.ndarray) -> dict[str, object]:
    """COCO's compressed RLE of a binary mask ``[H, W]``: ``{"size": [H, W], "counts": str}``, as pycocotools'
    ``mask.encode`` writes it (column-major runs starting with zeros; each count as 5-bit groups in ASCII from
    48, the counts after the second stored as differences to the count two before)."""
    mask = np.asarray(mask) != 0
    height, width = mask.shape
    flat = mask.reshape(-1, order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts.insert(0, 0)  # runs start with zeros
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return {"size": [height, width], "counts": "".join(chars)}
