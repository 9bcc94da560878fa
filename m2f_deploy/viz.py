"""Overlays with a legend for the three tasks' results (numpy + Pillow; no torch).

    overlay = viz.draw_panoptic(image, result, id2label)        # a PIL image: segments tinted, outlined, legend
    overlay = viz.draw_semantic(image, label_map, id2label)
    overlay = viz.draw_instance(image, result, id2label)        # result from return_binary_maps=True

Colours are fixed per class (the same class has the same hue in every image); the instances of one class get
shades of it, so touching instances stay apart. The legend, right of the image, lists the segments by area.
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from m2f_deploy.errors import InputError

LEGEND_ROWS = 24
_GOLDEN = 0.618033988749895


def class_colour(label: int, shade: int = 0) -> tuple[int, int, int]:
    """A saturated colour per class id (golden-ratio hues); ``shade`` > 0 varies its brightness."""
    hue = (label * _GOLDEN) % 1.0
    value = 0.95 - 0.35 * ((shade * _GOLDEN) % 1.0) if shade else 0.95
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _rgb(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise InputError(f"image must be [H, W, 3] RGB, got {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.dtype.kind == "f" and array.max() <= 1 else 1), 0, 255).astype(np.uint8)
    return array[..., :3]


def overlay(
    image: Any,
    segment_map: np.ndarray,
    segments: Sequence[tuple[int, tuple[int, int, int], str]],
    *,
    alpha: float = 0.55,
    legend: bool = True,
) -> Image.Image:
    """Tint each segment of ``segment_map`` ``[H, W]`` (ids) with its colour, outline it, and add a legend.

    ``segments``: ``(id, colour, caption)``; ids not listed stay as they are. The image is the map's size.
    """
    rgb = _rgb(image)
    segment_map = np.asarray(segment_map)
    if rgb.shape[:2] != segment_map.shape:
        raise InputError(f"image is {rgb.shape[1]}x{rgb.shape[0]} but the segmentation is "
                         f"{segment_map.shape[1]}x{segment_map.shape[0]}")  # fmt: skip
    out = rgb.astype(np.float32)
    edges = np.zeros(segment_map.shape, bool)
    edges[1:] |= segment_map[1:] != segment_map[:-1]
    edges[:, 1:] |= segment_map[:, 1:] != segment_map[:, :-1]
    areas = []
    for seg_id, colour, caption in segments:
        inside = segment_map == seg_id
        area = int(inside.sum())
        if area == 0:
            continue
        out[inside] = (1 - alpha) * out[inside] + alpha * np.asarray(colour, np.float32)
        out[inside & edges] = np.asarray(colour, np.float32) * 0.5
        areas.append((area, colour, caption))
    picture = Image.fromarray(out.round().astype(np.uint8))
    if not legend:
        return picture
    return _with_legend(picture, sorted(areas, key=lambda a: -a[0]))


def _with_legend(picture: Image.Image, rows: list[tuple[int, tuple[int, int, int], str]]) -> Image.Image:
    font = ImageFont.load_default()
    line = 14
    shown = rows[:LEGEND_ROWS]
    captions = [caption for _, _, caption in shown] + (
        [f"+ {len(rows) - len(shown)} more"] if len(rows) > len(shown) else []
    )
    if not captions:
        captions = ["(no segments)"]
    text_width = max(int(ImageDraw.Draw(picture).textlength(c, font=font)) for c in captions)
    width = 10 + 12 + 6 + text_width + 10
    height = max(picture.height, 10 + line * len(captions) + 6)
    canvas = Image.new("RGB", (picture.width + width, height), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = picture.width + 10
    for i, caption in enumerate(captions):
        y = 10 + i * line
        if i < len(shown):
            draw.rectangle([x, y + 1, x + 11, y + 11], fill=shown[i][1], outline=(0, 0, 0))
        draw.text((x + 18, y), caption, fill=(0, 0, 0), font=font)
    return canvas


def _label(id2label: Mapping[int, str], label: int) -> str:
    return id2label.get(label, f"class {label}")


def _segments(infos: Sequence[Mapping[str, Any]], id2label: Mapping[int, str]) -> list:
    """``(id, colour, "label score")`` per segment; instances of one class in shades of its colour.

    HF lists a fused panoptic segment once per query that joined it: one entry per id is kept.
    """
    rows, seen, count = [], set(), {}
    for info in infos:
        if info["id"] in seen:
            continue
        seen.add(info["id"])
        label = info["label_id"]
        shade = count[label] = count.get(label, -1) + 1
        rows.append((info["id"], class_colour(label, shade), f"{_label(id2label, label)} {info['score']:.2f}"))
    return rows


def draw_semantic(image: Any, labels: np.ndarray, id2label: Mapping[int, str], **kwargs: Any) -> Image.Image:
    """Overlay of a semantic map ``[H, W]`` (class ids)."""
    labels = np.asarray(labels)
    segments = [(int(c), class_colour(int(c)), _label(id2label, int(c))) for c in np.unique(labels) if c >= 0]
    return overlay(image, labels, segments, **kwargs)


def draw_panoptic(image: Any, result: Mapping[str, Any], id2label: Mapping[int, str], **kwargs: Any) -> Image.Image:
    """Overlay of a panoptic result ``{"segmentation" [H, W], "segments_info"}``; captions "label score"."""
    segmentation = np.asarray(result["segmentation"])
    segments = _segments(result["segments_info"], id2label)
    if segmentation.dtype.kind == "f":  # HF's "nothing found" map is float -1
        segmentation = segmentation.astype(np.int64)
    return overlay(image, segmentation, segments, **kwargs)


def draw_instance(image: Any, result: Mapping[str, Any], id2label: Mapping[int, str], **kwargs: Any) -> Image.Image:
    """Overlay of an instance result: binary maps ``[N, H, W]`` (``return_binary_maps=True``) or an id map ``[H, W]``.

    Binary maps are painted in order, so a later instance covers an earlier one where they overlap.
    """
    segmentation = np.asarray(result["segmentation"])
    infos = result["segments_info"]
    if segmentation.ndim == 3:
        ids = np.full(segmentation.shape[1:], -1, np.int64)
        for mask, info in zip(segmentation, infos):
            ids[mask > 0] = info["id"]
        segmentation = ids
    else:
        segmentation = segmentation.astype(np.int64)
    segments = _segments(infos, id2label)
    return overlay(image, segmentation, segments, **kwargs)
