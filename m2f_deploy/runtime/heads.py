"""Results from a fused-head graph (``m2f-export --heads ...``): its outputs turned into the post-processes' Python
structures, each cut back to its image's size (numpy only, no torch).

The graph returns maps at its output size (the input canvas by default, ``metadata["heads"]["output_size"]``);
here each image's part of the canvas (its ``pixel_mask``, scaled to the output size) is cropped and resized to the
image's own size by nearest neighbour. The raw path resizes logits instead (crop, then bilinear, then decide), so
on an image whose size is not the canvas's the two can differ along segment borders; on an image that fills the
canvas at its own size they are the same. The graph's outputs and metadata keys are described in
:mod:`m2f_deploy.export.heads`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from m2f_deploy.errors import InputError
from m2f_deploy.processing.postprocess.resample import nearest
from m2f_deploy.processing.rle import segmentation_to_rle


def fused_head(meta: dict[str, Any]) -> str | None:
    """The task the artifact's graph returns results for, or None for a logits graph."""
    heads = meta.get("fused_heads") or []
    return heads[0] if heads else None


def head_inputs(
    meta: dict[str, Any],
    batch: int,
    *,
    threshold: float | None = None,
    mask_threshold: float | None = None,
    overlap_mask_area_threshold: float | None = None,
    label_ids_to_fuse: Collection[int] | None = None,
) -> dict[str, np.ndarray]:
    """The head's extra graph inputs for a batch (None: the default recorded in the metadata)."""
    given = {
        "threshold": threshold, "mask_threshold": mask_threshold, "overlap_threshold": overlap_mask_area_threshold,
        "fuse_labels": label_ids_to_fuse,
    }  # fmt: skip
    num_labels = len(meta["id2label"])
    out = {}
    for name, spec in meta["heads"]["inputs"].items():
        value = given.get(name)
        if spec["dtype"] == "bool":
            mask = np.zeros((batch, num_labels), bool)
            for label in value or ():
                if not 0 <= int(label) < num_labels:
                    raise InputError(f"label_ids_to_fuse: {label} is not a label id (0..{num_labels - 1})")
                mask[:, int(label)] = True
            out[name] = mask
        else:
            out[name] = np.full((batch,), spec["default"] if value is None else value, np.float32)
    return out


def _cut(maps: np.ndarray, region: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """``maps`` ``[..., H, W]`` cropped to ``region`` (rows, cols) and resized (nearest) to ``size``."""
    rh, rw = region
    maps = maps[..., :rh, :rw]
    if (rh, rw) != tuple(size):
        maps = maps[..., nearest(rh, size[0]), :][..., nearest(rw, size[1])]
    return maps


def regions(meta: dict[str, Any], pixel_mask: np.ndarray | None, batch: int) -> list[tuple[int, int]]:
    """Each image's part of the head's output: its valid rows and columns of the canvas, scaled to the output."""
    out_h, out_w = meta["heads"]["output_size"]
    canvas_h, canvas_w = meta["heads"]["canvas"]
    if pixel_mask is None:
        return [(out_h, out_w)] * batch
    result = []
    for mask in pixel_mask[:batch]:
        vh, vw = int(mask.any(1).sum()), int(mask.any(0).sum())
        result.append((max(1, round(vh * out_h / canvas_h)), max(1, round(vw * out_w / canvas_w))))
    return result


def decode(
    meta: dict[str, Any],
    outputs: dict[str, np.ndarray],
    *,
    target_sizes: Sequence[Sequence[int]] | np.ndarray | None = None,
    pixel_mask: np.ndarray | None = None,
    label_ids_to_fuse: Collection[int] | None = None,
    return_coco_annotation: bool = False,
    return_binary_maps: bool = False,
) -> list[Any]:
    """Per image, the structure the post-process of the same task returns (see ``ImageProcessor``)."""
    task = fused_head(meta)
    first = next(iter(outputs.values()))
    batch = len(first)
    cuts = regions(meta, pixel_mask, batch)
    out_size = tuple(meta["heads"]["output_size"])
    sizes = [tuple(int(v) for v in s) for s in target_sizes] if target_sizes is not None else [out_size] * batch
    if target_sizes is None:
        cuts = [out_size] * batch
    if task == "semantic":
        return [_cut(outputs["semantic_map"][i], cuts[i], sizes[i]).astype(np.int64) for i in range(batch)]
    if task == "instance":
        if return_coco_annotation and return_binary_maps:
            raise InputError("return_coco_annotation and return_binary_maps cannot both be True")
        return [_instance(outputs, i, cuts[i], sizes[i], return_coco_annotation, return_binary_maps)
                for i in range(batch)]  # fmt: skip
    if task == "panoptic":
        fuse = set() if label_ids_to_fuse is None else {int(x) for x in label_ids_to_fuse}
        return [_panoptic(outputs, i, cuts[i], sizes[i], fuse) for i in range(batch)]
    raise InputError(f"unknown fused head {task!r} in the metadata")


def _instance(outputs: dict, i: int, cut: tuple[int, int], size: tuple[int, int], coco: bool, binary: bool) -> dict:
    valid = outputs["instance_valid"][i].astype(bool)
    kept = np.flatnonzero(valid)
    segmentation = _cut(outputs["instance_map"][i], cut, size).astype(np.float32)
    segments = [
        {"id": rank, "label_id": int(outputs["instance_labels"][i, j]), "was_fused": False,
         "score": round(float(outputs["instance_scores"][i, j]), 6)}
        for rank, j in enumerate(kept)
    ]  # fmt: skip
    if coco:
        segmentation = segmentation_to_rle(segmentation)
    if binary and len(kept):
        segmentation = _cut(outputs["instance_masks"][i][kept], cut, size).astype(np.float32)
    return {"segmentation": segmentation, "segments_info": segments}


def hf_segment_ids(segment_ids: np.ndarray, labels: np.ndarray, fuse: set[int]) -> tuple[dict[int, int], list[int]]:
    """HF's numbering of the segments the graph found: graph id -> HF id, and the HF id per existing query.

    HF's loop sets its counter back to a fused label's first id when that label repeats (see
    :mod:`m2f_deploy.export.heads`); this replays that loop over the (at most K) queries.
    """
    mapping: dict[int, int] = {}
    per_query: list[int] = []
    current, memory = 0, {}
    for graph_id, label in zip(segment_ids.tolist(), labels.tolist()):
        if graph_id <= 0:
            continue
        if label in memory:
            current = memory[label]
        else:
            current += 1
        if label in fuse:
            memory[label] = current
        mapping.setdefault(graph_id, current)
        per_query.append(current)
    return mapping, per_query


def _panoptic(outputs: dict, i: int, cut: tuple[int, int], size: tuple[int, int], fuse: set[int]) -> dict:
    labels = outputs["panoptic_labels"][i]
    if not (labels >= 0).any():  # nothing kept: HF's float map of -1
        return {"segmentation": np.zeros(size, np.float32) - 1, "segments_info": []}
    ids = outputs["panoptic_segment_ids"][i]
    mapping, hf_ids = hf_segment_ids(ids, labels, fuse)
    segmentation = _cut(outputs["panoptic_map"][i], cut, size).astype(np.int32)
    if any(g != h for g, h in mapping.items()):
        table = np.zeros(int(ids.max()) + 1, np.int32)
        for g, h in mapping.items():
            table[g] = h
        segmentation = table[segmentation]
    scores = outputs["panoptic_scores"][i]
    segments = [
        {"id": hf_id, "label_id": int(labels[k]), "was_fused": int(labels[k]) in fuse, "score": round(float(scores[k]), 6)}
        for hf_id, k in zip(hf_ids, np.flatnonzero(ids > 0))
    ]  # fmt: skip
    return {"segmentation": segmentation, "segments_info": segments}
