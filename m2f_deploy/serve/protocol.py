"""What travels between ``m2f-serve`` and its clients: tensor names, dtypes, and the (de)coding of results (no torch).

One request holds B encoded images (``image``, BYTES ``[B, 1]``: a PNG, JPEG, ... file's bytes) and, per image,
the task and thresholds of :meth:`~m2f_deploy.runtime.Segmenter.predict`. One response holds, per image:

- ``segmentation``: INT64 ``[B, H, W]``, each map padded with -1 to the largest image of the request;
- ``size``: INT64 ``[B, 2]``, each image's own height and width (the client crops the padding away);
- ``segments_info``: BYTES ``[B, 1]``, the JSON list of segments (``[]`` for semantic);
- ``error``: BYTES ``[B, 1]``, empty, or the one-line error of that image (not an image, unknown task, ...).

A bad image is answered in ``error`` rather than by failing the call: Triton's dynamic batcher merges requests
of different clients into one call, and one client's bad image must not fail the others' requests. A request
that Triton itself refuses (more images than ``max_batch_size``, a missing input) fails with Triton's error.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from m2f_deploy.errors import InputError

MODEL_NAME = "m2f"
"""The model's name on the server (``m2f-serve --model-name`` changes it)."""
TASKS = ("semantic", "instance", "panoptic")
THRESHOLDS = ("threshold", "mask_threshold", "overlap_mask_area_threshold")
DEFAULTS = {"threshold": 0.5, "mask_threshold": 0.5, "overlap_mask_area_threshold": 0.8}
"""Segmenter.predict's defaults; the client always sends all three."""

INPUTS = ("image", "task", *THRESHOLDS)
OUTPUTS = ("segmentation", "size", "segments_info", "error")
SEGMENTATION_DTYPES = {"semantic": np.int64, "instance": np.float32, "panoptic": np.int32}
"""The dtype ``Segmenter.predict`` gives each task's map (sent as INT64, cast back by the client); a panoptic map
without segments (-1 everywhere) is float32, as transformers gives it."""
PAD = -1


def decode_image(data: bytes, name: str = "image") -> Any:
    """The encoded image ``data`` decoded as :func:`~m2f_deploy.runtime.images.load_image` decodes a file.

    (EXIF rotation applied, alpha composited on white, RGB.) Raises :class:`InputError` naming ``name``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    from m2f_deploy.processing.images import pil_rgb

    if not data:
        raise InputError(f"{name}: empty (no image bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{name}: corrupt, truncated or oversized image ({e})") from None
    if image.width == 0 or image.height == 0:
        raise InputError(f"{name}: image has no pixels")
    return pil_rgb(image)


def encode_results(task: str, results: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``Segmenter.predict`` results of one request -> (padded INT64 maps, sizes, segments_info JSON strings)."""
    maps = [r if task == "semantic" else r["segmentation"] for r in results]
    sizes = np.array([m.shape for m in maps], dtype=np.int64).reshape(-1, 2)
    height, width = (sizes.max(axis=0) if len(maps) else (0, 0))
    out = np.full((len(maps), height, width), PAD, dtype=np.int64)
    for i, m in enumerate(maps):
        out[i, : m.shape[0], : m.shape[1]] = m
    infos = ["[]" if task == "semantic" else json.dumps(r["segments_info"]) for r in results]
    return out, sizes, infos


def decode_result(task: str, segmentation: np.ndarray, size: Sequence[int], segments_info: str) -> Any:
    """One image's response -> the structure ``Segmenter.predict`` returns for ``task``."""
    h, w = int(size[0]), int(size[1])
    seg = np.ascontiguousarray(segmentation[:h, :w])
    # a panoptic map without segments is transformers' float -1 map; with segments its ids are int32 from 0
    dtype = np.float32 if task == "panoptic" and seg.size and seg.min() < 0 else SEGMENTATION_DTYPES[task]
    seg = seg.astype(dtype)
    if task == "semantic":
        return seg
    return {"segmentation": seg, "segments_info": json.loads(segments_info)}


def as_text(value: Any) -> str:
    """A BYTES tensor element (bytes, or numpy's bytes/object) as text."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0]
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def check_task(task: str) -> str:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return task


def check_thresholds(values: dict[str, float]) -> dict[str, float]:
    for key, value in values.items():
        if not (np.isfinite(value) and 0.0 <= value <= 1.0):
            raise InputError(f"{key} must be a number in [0, 1], got {value}")
    return values
