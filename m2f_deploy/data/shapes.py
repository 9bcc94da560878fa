"""A seeded synthetic panoptic dataset: landscapes of sky, ground and water with coloured shapes in front.

Made for a small Mask2Former (masks at stride 4) trained for half an hour on a CPU, so every cue is large and
redundant. Stuff ("sky", "ground", "water") lies in horizontal bands with wavy boundaries, each with its own
colour and texture (a sky gradient with clouds, speckled earth, rippled water). Things ("circle", "square",
"triangle", "star"), 1 to 5 per image, have a circumradius of 14-40 px at 160 px (scaled with the image's
shorter side), are rotated at random, and each class has its own colour family and texture (red with a
highlight, yellow checkerboard, green stripes, plain purple), so the class shows in a few pixels, not only in
the outline. A dark 2-px outline separates touching instances. Later things occlude earlier ones, often placed
next to an earlier one so that they touch or overlap, but each keeps at least 40 % of its pixels; things may be
cropped by the image border (at most half).

Sample ``i`` of a dataset with seed ``s`` is ``generate_sample((s, i))``: a training script can draw samples
on the fly and keep a held-out seed for validation. ``write_dataset`` writes a folder in COCO formats
(panoptic PNGs and json, instances json with RLE masks, semantic label PNGs);
:func:`m2f_deploy.data.coco_folder.load_dataset` reads it back. numpy and Pillow only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from m2f_deploy import coco
from m2f_deploy.errors import InputError

CLASSES: list[dict[str, Any]] = [
    {"id": 0, "name": "sky", "isthing": 0, "supercategory": "stuff", "color": [110, 160, 225]},
    {"id": 1, "name": "ground", "isthing": 0, "supercategory": "stuff", "color": [125, 100, 65]},
    {"id": 2, "name": "water", "isthing": 0, "supercategory": "stuff", "color": [35, 85, 125]},
    {"id": 3, "name": "circle", "isthing": 1, "supercategory": "shape", "color": [215, 45, 40]},
    {"id": 4, "name": "square", "isthing": 1, "supercategory": "shape", "color": [240, 195, 35]},
    {"id": 5, "name": "triangle", "isthing": 1, "supercategory": "shape", "color": [60, 200, 75]},
    {"id": 6, "name": "star", "isthing": 1, "supercategory": "shape", "color": [185, 70, 215]},
]
"""COCO panoptic categories; ids are a model's label ids (``id2label``)."""

SKY, GROUND, WATER, CIRCLE, SQUARE, TRIANGLE, STAR = range(7)
IGNORE = 255
"""Semantic label of pixels without a segment (the generator leaves none)."""
DEFAULT_SIZE = (160, 160)
GENERATOR_VERSION = 1
"""Written into the dataset's json ``info``; raised whenever the same seed starts giving different images."""

_REFERENCE_SIDE = 160  # sizes below are in pixels of a 160-px image
_RADIUS = (14.0, 40.0)
_THINGS = (1, 5)
_MIN_VISIBLE = 0.4  # share of its in-image pixels an occluded thing keeps
_MIN_IN_IMAGE = 0.5  # share of a thing's area inside the image
_MIN_AREA = 150  # pixels a thing keeps at least
_NEXT_TO_ANOTHER = 0.4  # chance that a thing is placed against an earlier one
_PLACEMENT_TRIES = 20
_OUTLINE = 2  # px, darkened
_STAR_INNER = 0.45  # inner / outer radius


@dataclass(frozen=True)
class Sample:
    """One image and its annotations.

    ``image`` ``[H, W, 3]`` uint8; ``panoptic`` ``[H, W]`` int32 segment ids (0: no segment); ``segments``: COCO
    panoptic ``segments_info`` (``id``, ``category_id``, ``iscrowd``, ``area``, ``bbox`` [x, y, w, h]);
    ``semantic`` ``[H, W]`` uint8 category ids (``IGNORE`` where there is no segment).
    """

    image: np.ndarray
    panoptic: np.ndarray
    segments: list[dict[str, Any]]
    semantic: np.ndarray

    @property
    def category_of(self) -> dict[int, int]:
        """Segment id -> category id (``instance_id_to_semantic_id`` for ``ImageProcessor.preprocess``)."""
        return {s["id"]: s["category_id"] for s in self.segments}


@dataclass(frozen=True)
class _Thing:
    category: int
    mask: np.ndarray  # [H, W] bool: the whole shape inside the image
    colour: np.ndarray  # [H, W, 3] float32: its look where it is drawn
    centre: tuple[float, float]  # (y, x)
    radius: float


# -- generation --------------------------------------------------------------------------------------------------


def generate_sample(seed: int | Sequence[int] | np.random.Generator, size: tuple[int, int] = DEFAULT_SIZE) -> Sample:
    """One sample of ``size`` (H, W); the same ``seed`` (an int, a sequence of ints, or a Generator to draw
    from) gives the same sample. ``generate_sample((s, i))`` is image ``i`` of ``write_dataset(..., seed=s)``."""
    height, width = size
    if height < 32 or width < 32:
        raise InputError(f"size must be at least 32 x 32, got {tuple(size)}")
    rng = np.random.default_rng(seed)
    grid = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5  # [2, H, W] pixel centres (y, x)
    stuff = _stuff_layout(rng, height, width)
    image = _stuff_colours(rng, stuff, grid)
    things, owner = _place_things(rng, grid, min(height, width) / _REFERENCE_SIDE)
    for thing in things:
        image[thing.mask] = thing.colour[thing.mask]
        image[thing.mask & ~_erode(thing.mask, _OUTLINE)] *= 0.5
    image = image * rng.uniform(0.92, 1.08) + rng.normal(0.0, 3.0, image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    panoptic, segments = _segments(stuff, owner, [t.category for t in things])
    semantic = np.full((height, width), IGNORE, np.uint8)
    for segment in segments:
        semantic[panoptic == segment["id"]] = segment["category_id"]
    return Sample(image, panoptic, segments, semantic)


def _stuff_layout(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``[H, W]`` uint8 stuff classes: sky above a wavy horizon, then ground and/or water bands."""
    x = np.arange(width, dtype=np.float32) + 0.5
    horizon = height * rng.uniform(0.3, 0.55) + rng.uniform(-0.15, 0.15) * (x - width / 2)
    horizon += _wave(rng, x, 0.06 * height)
    below = [[GROUND], [WATER], [GROUND, WATER], [WATER, GROUND]][rng.integers(4)]
    y = np.arange(height, dtype=np.float32)[:, None] + 0.5
    layout = np.where(y < horizon, SKY, below[-1]).astype(np.uint8)
    if len(below) == 2:
        shore = horizon + (height - horizon) * rng.uniform(0.3, 0.7) + _wave(rng, x, 0.05 * height)
        layout[(y >= horizon) & (y < shore)] = below[0]
    return layout


def _wave(rng: np.random.Generator, x: np.ndarray, amplitude: float) -> np.ndarray:
    """A smooth irregular curve over ``x`` ``[W]``: three sinusoids of random phase, amplitude about ``amplitude``."""
    span = float(x[-1] - x[0]) + 1.0
    curve = np.zeros_like(x)
    for k in (1, 2, 4):
        phase, cycles = rng.uniform(0, 2 * np.pi), k * rng.uniform(0.5, 1.5)
        curve += amplitude * rng.uniform(0.3, 1.0) / k * np.sin(2 * np.pi * cycles * x / span + phase)
    return curve


def _stuff_colours(rng: np.random.Generator, layout: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` float32: each stuff class's texture where ``layout`` has it."""
    height, width = layout.shape
    y = grid[0] / height  # [H, W] in 0..1
    image = np.zeros((height, width, 3), np.float32)
    # sky: deep blue at the top, paler down, white clouds
    top, low = _jitter(rng, (60, 110, 200), 15), _jitter(rng, (165, 200, 240), 10)
    sky = top + (low - top) * np.clip(y / 0.6, 0, 1)[..., None]
    clouds = np.clip((_texture(rng, (height, width), 24) - 0.5) * 2.0, 0, 0.85)[..., None]
    sky += (np.float32(240) - sky) * clouds
    # ground: brown, blotchy and speckled
    ground = _jitter(rng, (125, 100, 65), 12) + 18 * _texture(rng, (height, width), 12)[..., None]
    ground += rng.normal(0.0, 14.0, (height, width, 1))
    # water: dark blue-teal with horizontal ripples
    period = rng.uniform(5.0, 8.0)
    ripple = np.sin(2 * np.pi * (grid[0] / period + 0.6 * _texture(rng, (height, width), 20)))
    water = _jitter(rng, (35, 85, 125), 10) + 16 * ripple[..., None] + rng.normal(0.0, 5.0, (height, width, 1))
    for label, texture in ((SKY, sky), (GROUND, ground), (WATER, water)):
        image[layout == label] = texture[layout == label]
    return image


def _place_things(rng: np.random.Generator, grid: np.ndarray, scale: float) -> tuple[list[_Thing], np.ndarray]:
    """1-5 things in drawing order, each try kept only when every earlier thing stays visible enough; and which
    thing shows at each pixel, ``[H, W]`` int32 (0: none, k: ``things[k - 1]``)."""
    things: list[_Thing] = []
    owner = np.zeros(grid.shape[1:], np.int32)
    for _ in range(rng.integers(_THINGS[0], _THINGS[1] + 1)):
        for _ in range(_PLACEMENT_TRIES):
            thing, full_area = _random_thing(rng, grid, scale, things)
            if thing.mask.sum() < max(_MIN_IN_IMAGE * full_area, _MIN_AREA * scale**2):
                continue
            trial = np.where(thing.mask, len(things) + 1, owner)
            visible = np.bincount(trial.ravel(), minlength=len(things) + 2)[1:-1]
            shown = [max(_MIN_VISIBLE * t.mask.sum(), _MIN_AREA * scale**2) for t in things]
            if all(v >= s for v, s in zip(visible, shown)):
                things.append(thing)
                owner = trial
                break
    return things, owner


def _random_thing(
    rng: np.random.Generator, grid: np.ndarray, scale: float, others: Sequence[_Thing]
) -> tuple[_Thing, float]:
    """A thing of random class, size, rotation and place (often against one of ``others``), and its full area."""
    height, width = grid.shape[1:]
    category = int(rng.integers(CIRCLE, STAR + 1))
    radius = rng.uniform(*_RADIUS) * scale
    if others and rng.random() < _NEXT_TO_ANOTHER:
        other = others[rng.integers(len(others))]
        angle, distance = rng.uniform(0, 2 * np.pi), (radius + other.radius) * rng.uniform(0.55, 1.0)
        centre = (other.centre[0] + distance * np.sin(angle), other.centre[1] + distance * np.cos(angle))
    else:
        centre = (rng.uniform(0.08, 0.92) * height, rng.uniform(0.08, 0.92) * width)
    rotation = rng.uniform(0, 2 * np.pi)
    cos, sin = np.cos(rotation), np.sin(rotation)
    dy, dx = (grid[0] - centre[0]) / radius, (grid[1] - centre[1]) / radius
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos  # [H, W] the shape's own axes, in radii
    if category == CIRCLE:
        mask, full_area = dx**2 + dy**2 <= 1.0, math.pi * radius**2
    else:
        corners = {SQUARE: 4, TRIANGLE: 3, STAR: 10}[category]
        first = np.pi / 4 if category == SQUARE else np.pi / 2  # square: sides along u and v; others: a tip up
        angles = first + 2 * np.pi * np.arange(corners) / corners
        reach = np.where(np.arange(corners) % 2, _STAR_INNER, 1.0) if category == STAR else np.ones(corners)
        polygon = np.stack([reach * np.cos(angles), reach * np.sin(angles)], axis=1)  # [K, 2] (u, v)
        mask, full_area = _inside(u, v, polygon), _polygon_area(polygon) * radius**2
    colour = _thing_colours(rng, category, u, v)
    return _Thing(category, mask, colour, (float(centre[0]), float(centre[1])), float(radius)), full_area


def _thing_colours(rng: np.random.Generator, category: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` float32: the class's colour family, varied per instance, times the class's texture."""
    base = _jitter(rng, CLASSES[category]["color"], 18)
    if category == CIRCLE:  # a highlight up-left, darker towards the rim
        light = 1.2 - 0.5 * np.sqrt((u + 0.35) ** 2 + (v + 0.35) ** 2)
    elif category == SQUARE:  # a 3 x 3 checkerboard (the square spans -1/sqrt(2)..1/sqrt(2) along u and v)
        cells = np.floor(u * 3 / math.sqrt(2) + 1.5) + np.floor(v * 3 / math.sqrt(2) + 1.5)
        light = np.where(cells % 2 == 0, 1.0, 0.72)
    elif category == TRIANGLE:  # stripes parallel to a side
        light = np.where(np.sin(2 * np.pi * 3.0 * v) > 0, 1.0, 0.7)
    else:  # plain
        light = np.ones_like(u)
    return (base * light[..., None]).astype(np.float32)


def _segments(
    stuff: np.ndarray, owner: np.ndarray, categories: Sequence[int]
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Panoptic ids ``[H, W]`` int32 and segments: one per visible stuff class (ids from 1), then the things."""
    panoptic = np.zeros(stuff.shape, np.int32)
    regions = [(label, (owner == 0) & (stuff == label)) for label in (SKY, GROUND, WATER)]
    regions += [(category, owner == k) for k, category in enumerate(categories, start=1)]
    segments = []
    for label, region in regions:
        if region.any():
            segment_id = len(segments) + 1
            panoptic[region] = segment_id
            area, box = int(region.sum()), coco.bbox(region)
            segments.append({"id": segment_id, "category_id": label, "iscrowd": 0, "area": area, "bbox": box})
    return panoptic, segments


# -- small helpers -----------------------------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, colour: Sequence[int], spread: float) -> np.ndarray:
    """``colour`` with each channel moved by up to ``spread`` (uniform), as float32 ``[3]``."""
    return np.clip(np.asarray(colour, np.float32) + rng.uniform(-spread, spread, 3), 0, 255).astype(np.float32)


def smooth_noise(
    rng: np.random.Generator,
    size: tuple[int, int],
    grid: tuple[int, int],
    lead: tuple[int, ...] = (),
    *,
    normal: bool = False,
    cubic: bool = True,
) -> np.ndarray:
    """``[*lead, H, W]`` float32 smooth noise: random values on a coarse ``grid`` (rows, columns) upsampled to
    ``size`` (H, W) by Pillow, bicubic (or bilinear: ``cubic=False``), one map per index of ``lead``.

    The grid values are uniform in 0..1 (bicubic overshoots that range a little), or standard normal with
    ``normal``. The shapes' textures and the fake logits of :mod:`m2f_deploy.testing.logits` both use it.
    """
    height, width = size
    shape = (int(np.prod(lead, dtype=np.int64)), *grid)
    coarse = (rng.standard_normal(shape) if normal else rng.random(shape)).astype(np.float32)
    resample = Image.Resampling.BICUBIC if cubic else Image.Resampling.BILINEAR
    fine = [np.asarray(Image.fromarray(c).resize((width, height), resample)) for c in coarse]
    return np.stack(fine).reshape(*lead, height, width)


def _texture(rng: np.random.Generator, size: tuple[int, int], cell: int) -> np.ndarray:
    """``[H, W]`` float32 in about 0..1: uniform noise on ``cell``-pixel cells, bicubically upsampled."""
    return smooth_noise(rng, size, (size[0] // cell + 2, size[1] // cell + 2))


def _inside(u: np.ndarray, v: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule: which points ``(u, v)`` ``[H, W]`` lie inside ``polygon`` ``[K, 2]``."""
    inside = np.zeros(u.shape, bool)
    for (u1, v1), (u2, v2) in zip(polygon, np.roll(polygon, -1, axis=0)):
        if v1 == v2:
            continue
        crosses = (v1 > v) != (v2 > v)
        inside ^= crosses & (u < u1 + (v - v1) * (u2 - u1) / (v2 - v1))
    return inside


def _polygon_area(polygon: np.ndarray) -> float:
    u, v = polygon[:, 0], polygon[:, 1]
    return float(abs(np.dot(u, np.roll(v, -1)) - np.dot(v, np.roll(u, -1))) / 2)


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` ``[H, W]`` shrunk by ``steps`` pixels (4-neighbourhood; outside the image counts as inside)."""
    eroded = mask.copy()
    for _ in range(steps):
        padded = np.pad(eroded, 1, mode="edge")
        eroded = eroded & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return eroded


# -- writing -----------------------------------------------------------------------------------------------------


def write_dataset(
    folder: str | os.PathLike,
    n: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = DEFAULT_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``n`` samples to ``folder`` (which must not exist, or be empty); returns its path.

    Layout: ``images/NNNNNN.png``, ``panoptic/NNNNNN.png`` (COCO panoptic: id = R + 256 G + 256^2 B),
    ``semantic/NNNNNN.png`` (category ids, 255: none), ``panoptic.json`` (COCO panoptic), ``instances.json``
    (COCO instances of the things, compressed RLE). Image ids are the indices 0..n-1. Everything is written to a
    temporary folder beside ``folder`` and renamed at the end: an interrupted run leaves nothing that looks
    finished. ``progress(done, n)`` is called after each sample.
    """
    folder = Path(folder)
    if n < 1:
        raise InputError(f"a dataset needs at least one sample, got n={n}")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise InputError(f"{folder} already exists and is not an empty folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        _write_samples(staging, n, seed, size, progress)
        staging.chmod(0o755)  # mkdtemp's 0o700 would hide the dataset from other users
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def _write_samples(
    folder: Path, n: int, seed: int, size: tuple[int, int], progress: Callable[[int, int], None] | None
) -> None:
    for part in ("images", "panoptic", "semantic"):
        (folder / part).mkdir()
    images, panoptic, instances = [], [], []
    for index in range(n):
        sample = generate_sample((seed, index), size)
        name = f"{index:06d}.png"
        Image.fromarray(sample.image).save(folder / "images" / name)
        Image.fromarray(coco.id_to_rgb(sample.panoptic)).save(folder / "panoptic" / name)
        Image.fromarray(sample.semantic).save(folder / "semantic" / name)
        images.append({"id": index, "file_name": name, "height": size[0], "width": size[1]})
        panoptic.append({"image_id": index, "file_name": name, "segments_info": sample.segments})
        for segment in sample.segments:
            if CLASSES[segment["category_id"]]["isthing"]:
                instances.append(
                    {
                        "id": len(instances) + 1,  # COCOeval needs ids from 1
                        "image_id": index,
                        "category_id": segment["category_id"],
                        "segmentation": coco.coco_rle(sample.panoptic == segment["id"]),
                        "area": segment["area"],
                        "bbox": segment["bbox"],
                        "iscrowd": 0,
                    }
                )
        if progress is not None:
            progress(index + 1, n)
    info = {
        "description": "m2f_deploy synthetic shapes",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "size": list(size),
        "count": n,
    }
    things = [c for c in CLASSES if c["isthing"]]
    documents = {
        "panoptic.json": {"info": info, "images": images, "annotations": panoptic, "categories": CLASSES},
        "instances.json": {"info": info, "images": images, "annotations": instances, "categories": things},
    }
    for name, document in documents.items():
        (folder / name).write_text(json.dumps(document, separators=(",", ":")) + "\n", encoding="utf-8")
