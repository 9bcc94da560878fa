"""Read a dataset folder in COCO formats, as ``m2f-validate`` takes it: the synthetic shapes (``write_dataset``) or
any other data converted to the same layout (numpy and Pillow only).

Layout: ``panoptic.json`` (COCO panoptic: categories with ``id``, ``name``, ``isthing``; images; annotations with
``segments_info``), ``instances.json`` (COCO instances), ``images/``, ``panoptic/`` (COCO panoptic PNGs: id = R +
256 G + 256^2 B) and ``semantic/`` (category ids, 255: none), one PNG each per image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from m2f_deploy import coco
from m2f_deploy.errors import InputError
from m2f_deploy.utils import parse_json_object

# -- reading -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One image of a dataset folder: its id, size, file paths and COCO panoptic ``segments_info``."""

    image_id: int
    height: int
    width: int
    image_path: Path
    panoptic_path: Path
    semantic_path: Path
    segments: tuple[Mapping[str, Any], ...]

    def image(self) -> np.ndarray:
        """``[H, W, 3]`` uint8."""
        return _read_png(self.image_path, "RGB", (self.height, self.width))

    def panoptic(self) -> np.ndarray:
        """``[H, W]`` int32 segment ids (0: none), decoded from the COCO panoptic PNG."""
        return coco.rgb_to_id(_read_png(self.panoptic_path, "RGB", (self.height, self.width))).astype(np.int32)

    def semantic(self) -> np.ndarray:
        """``[H, W]`` uint8 category ids (255: none)."""
        return _read_png(self.semantic_path, "L", (self.height, self.width))

    def ground_truth(self) -> dict[str, Any]:
        """``{"segmentation", "segments_info"}`` as :class:`m2f_deploy.evaluation.PanopticEvaluator` takes it."""
        return {"segmentation": self.panoptic(), "segments_info": [dict(s) for s in self.segments]}


@dataclass(frozen=True)
class Dataset:
    """A dataset folder in the layout above: its categories, records and COCO instances file."""

    folder: Path
    categories: tuple[Mapping[str, Any], ...]
    records: tuple[Record, ...]
    instances_json: Path

    @property
    def id2label(self) -> dict[int, str]:
        return {int(c["id"]): str(c["name"]) for c in self.categories}

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]


def load_dataset(folder: str | os.PathLike) -> Dataset:
    """Read and check a dataset folder's json files and that every listed PNG exists (PNGs are read lazily).

    Raises ``InputError`` naming the file when something is missing or malformed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such dataset folder")
    panoptic_json = folder / "panoptic.json"
    document = _read_json(panoptic_json)
    categories = _objects(document, "categories", ("id", "name", "isthing"), panoptic_json)
    images = _objects(document, "images", ("id", "file_name", "height", "width"), panoptic_json)
    annotations = _objects(document, "annotations", ("image_id", "file_name", "segments_info"), panoptic_json)
    known = {c["id"] for c in categories}
    by_image = {a["image_id"]: a for a in annotations}
    records = []
    for image in images:
        annotation = by_image.get(image["id"])
        if annotation is None:
            raise InputError(f"{panoptic_json}: image {image['id']} has no annotation")
        if not (_integers(image, ("id", "height", "width")) and _strings((image, annotation), "file_name")):
            raise InputError(
                f"{panoptic_json}: image {image['id']}: id, height, width must be integers and file_name a string"
            )
        segments = annotation["segments_info"]
        if not isinstance(segments, list) or not all(_has(s, ("id", "category_id")) for s in segments):
            raise InputError(
                f"{panoptic_json}: segments_info of image {image['id']} must be a list of objects "
                "with id and category_id"
            )
        unknown = {s["category_id"] for s in segments} - known
        if unknown:
            raise InputError(f"{panoptic_json}: image {image['id']} has segments of unknown categories {unknown}")
        paths = [
            folder / "images" / image["file_name"],
            folder / "panoptic" / annotation["file_name"],
            folder / "semantic" / annotation["file_name"],
        ]
        for path in paths:
            if not path.is_file():
                raise InputError(f"{path}: missing (listed in {panoptic_json})")
        records.append(Record(image["id"], image["height"], image["width"], *paths, tuple(segments)))
    instances_json = folder / "instances.json"
    instances = _read_json(instances_json)
    for key in ("images", "annotations", "categories"):
        _objects(instances, key, (), instances_json)
    return Dataset(folder, tuple(categories), tuple(records), instances_json)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read it ({err})") from None
    return parse_json_object(text, str(path), InputError)


def _has(entry: Any, fields: Sequence[str]) -> bool:
    return isinstance(entry, dict) and all(field in entry for field in fields)


def _integers(entry: Mapping[str, Any], fields: Sequence[str]) -> bool:
    return all(isinstance(entry[field], int) and not isinstance(entry[field], bool) for field in fields)


def _strings(entries: Sequence[Mapping[str, Any]], field: str) -> bool:
    return all(isinstance(entry[field], str) for entry in entries)


def _objects(document: Mapping[str, Any], key: str, fields: Sequence[str], path: Path) -> list[dict[str, Any]]:
    """``document[key]``: a list of objects that each have ``fields``; otherwise an ``InputError`` naming ``path``."""
    entries = document.get(key)
    if not isinstance(entries, list) or not all(_has(e, fields) for e in entries):
        need = f" with {', '.join(fields)}" if fields else ""
        raise InputError(f"{path}: '{key}' must be a list of objects{need}")
    return entries


def _read_png(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """The PNG at ``path`` as an array; ``InputError`` naming it when unreadable, of another mode or size."""
    try:
        with Image.open(path) as picture:
            picture.load()
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the image ({err})") from None
    if picture.mode != mode:
        raise InputError(f"{path}: expected a {mode} image, got mode {picture.mode}")
    if (picture.height, picture.width) != size:
        raise InputError(f"{path}: expected {size[0]} x {size[1]} pixels, got {picture.height} x {picture.width}")
    return np.asarray(picture)
