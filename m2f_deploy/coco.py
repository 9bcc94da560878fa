"""COCO panoptic and instance formats: PNG id encoding, segment records, RLE annotations (numpy + Pillow only).

Category ids are the model's label ids (``id2label`` keys), so results and labels line up without a mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger("m2f_deploy")


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """Segment ids ``[H, W]`` -> COCO panoptic PNG colours ``[H, W, 3]`` uint8 (id = R + 256 G + 256^2 B)."""
    ids = np.asarray(ids, np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG colours ``[H, W, 3]`` -> segment ids ``[H, W]`` int64."""
    rgb = np.asarray(rgb, np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


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


def bbox(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, width, height]`` of a binary mask ``[H, W]`` (zeros when empty)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def categories(id2label: Mapping[int, str], stuff_ids: Sequence[int] = ()) -> list[dict[str, Any]]:
    """COCO categories; ``isthing`` is 0 for ``stuff_ids`` (e.g. the labels fused in panoptic results), else 1."""
    stuff = set(stuff_ids)
    return [{"id": k, "name": name, "isthing": int(k not in stuff)} for k, name in sorted(id2label.items())]


def panoptic_record(result: Mapping[str, Any]) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A panoptic post-process result -> (segment id map ``[H, W]`` int64, 0 = void; COCO ``segments_info``).

    With ``label_ids_to_fuse``, HF lists a fused segment once per query (one record is kept) and numbers later
    segments on from the fused id, so two segments of different classes can share an id and thus pixels: the
    first one's class is kept, with a warning, since the map cannot tell them apart.
    """
    ids = np.asarray(result["segmentation"])
    ids = np.zeros(ids.shape, np.int64) if ids.dtype.kind == "f" else ids.astype(np.int64)  # float -1: nothing
    records: dict[int, dict[str, Any]] = {}
    for info in result["segments_info"]:
        first = records.get(info["id"])
        if first is None:
            records[info["id"]] = {
                "id": info["id"],
                "category_id": info["label_id"],
                "iscrowd": 0,
                "score": info["score"],
            }
        elif first["category_id"] != info["label_id"]:
            log.warning(
                "segment id %d is shared by classes %d and %d (transformers' numbering after fused labels); "
                "recorded as class %d", info["id"], first["category_id"], info["label_id"], first["category_id"]
            )  # fmt: skip
    out = []
    for seg_id, record in records.items():
        mask = ids == seg_id
        area = int(mask.sum())
        if area:
            out.append({**record, "area": area, "bbox": bbox(mask)})
    return ids, out


def instance_annotations(result: Mapping[str, Any], image_id: int, first_id: int = 1) -> list[dict[str, Any]]:
    """An instance result with binary maps (``return_binary_maps=True``) -> COCO annotations with compressed RLE."""
    masks = np.asarray(result["segmentation"])
    infos = result["segments_info"]
    if not infos:
        return []
    if masks.ndim != 3 or len(masks) != len(infos):
        raise ValueError("instance annotations need the result of return_binary_maps=True")
    out = []
    for k, (mask, info) in enumerate(zip(masks > 0, infos)):
        out.append({
            "id": first_id + k, "image_id": image_id, "category_id": info["label_id"], "segmentation": coco_rle(mask),
            "area": int(mask.sum()), "bbox": bbox(mask), "iscrowd": 0, "score": info["score"],
        })  # fmt: skip
    return out
