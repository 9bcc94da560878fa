"""The options of HF's ``preprocessor_config.json`` for Mask2Former: parsed, validated, written back.

Keys and defaults are HF's. Legacy keys that HF 4.x configs (and the hub checkpoints) still carry are mapped as HF
4.x mapped them: ``max_size`` (the longest edge), ``size_divisibility`` (``size_divisor``), ``reduce_labels``
(``do_reduce_labels``); given together with its new name, the new name wins (as transformers 5 does: it reads the
new names only; 4.x let the legacy key win); an integer ``size`` means the shortest edge, with the longest edge at
``max_size`` or 1333 (HF 4.x's default; HF 5 keeps only the shortest edge and then cannot resize). Other keys (HF's
machinery such as ``processor_class`` or ``do_pad``, or anything unknown) are kept and written back untouched;
``image_processor_type`` is always written as ``Mask2FormerImageProcessor``.

One option is ours: ``canvas`` (``{"height": H, "width": W}``), the fixed input size of a static-shape engine.
Each image is resized to fit it (aspect ratio kept), then padded to it; ``size`` and ``size_divisor`` do not
apply, and the canvas must be a multiple of ``size_divisor`` itself.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

from m2f_deploy.utils import did_you_mean

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
_LEGACY_LONGEST_EDGE = 1333
_SIZE_KEYS = ({"height", "width"}, {"shortest_edge", "longest_edge"}, {"max_height", "max_width"})
_LEGACY = {"max_size", "size_divisibility", "reduce_labels"}
# Keys HF writes that do not change Mask2Former's preprocessing here: kept as they are.
_PASSED_THROUGH = {
    "processor_class",
    "feature_extractor_type",
    "do_pad",
    "default_to_square",
    "crop_size",
    "do_center_crop",
    "data_format",
    "input_data_format",
    "device",
    "return_tensors",
    "disable_grouping",
    "image_seq_length",
}
_DROPPED = {"image_processor_type", "_max_size", "_processor_class"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Mask2Former preprocessing options (HF's names and defaults, plus ``canvas``)."""

    do_resize: bool = True
    size: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"shortest_edge": 800, "longest_edge": _LEGACY_LONGEST_EDGE}
    )
    size_divisor: int = 32
    resample: int = 2  # PIL.Image.Resampling.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    image_std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    ignore_index: int | None = None
    do_reduce_labels: bool = False
    num_labels: int | None = None
    do_convert_rgb: bool | None = None  # accepted for HF compatibility; non-RGB images are always converted
    pad_size: tuple[int, int] | None = None
    canvas: tuple[int, int] | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_FIELDS = {f.name for f in dataclasses.fields(Settings)} - {"extra"}


def parse(
    options: Mapping[str, Any], base: Settings | None = None, *, error: type[Exception], strict: bool
) -> Settings:
    """``base`` (default: HF's defaults) updated with ``options``.

    Unknown keys raise ``error`` when ``strict``; otherwise they are kept (with a warning when they look like a
    misspelled option). Invalid values raise ``error``.
    """
    options = dict(options)
    values = {f: getattr(base or Settings(), f) for f in _FIELDS}
    extra = dict(base.extra) if base else {}

    max_size = options.pop("max_size", None)
    if "size_divisibility" in options:
        options.setdefault("size_divisor", options.pop("size_divisibility"))
    if "reduce_labels" in options:
        options.setdefault("do_reduce_labels", options.pop("reduce_labels"))
    if max_size is not None:
        max_size = _integer(error, "max_size", max_size, minimum=1)
        shortest = values["size"].get("shortest_edge", 800)
        options.setdefault("size", {"shortest_edge": shortest, "longest_edge": max_size})

    for key, value in options.items():
        if key in _FIELDS:
            values[key] = value
        elif key in _PASSED_THROUGH:
            extra[key] = value
        elif key in _DROPPED:
            continue
        else:
            hint = did_you_mean(key, sorted(_FIELDS | _LEGACY), cutoff=0.75)
            if strict:
                raise error(f"unknown option {key!r}{hint}")
            if hint:
                warnings.warn(f"unknown preprocessor option {key!r}{hint}; kept as is", stacklevel=3)
            extra[key] = value

    for key in ("do_resize", "do_rescale", "do_normalize", "do_reduce_labels"):
        values[key] = _boolean(error, key, values[key])
    if values["do_convert_rgb"] is not None:
        values["do_convert_rgb"] = _boolean(error, "do_convert_rgb", values["do_convert_rgb"])
    values["size"] = _size(error, values["size"], max_size)
    values["size_divisor"] = _integer(error, "size_divisor", values["size_divisor"] or 0, minimum=0)
    values["resample"] = _integer(error, "resample", values["resample"], minimum=0)
    if values["resample"] > 5:
        raise error(f"resample must be a Pillow filter 0..5 (2: bilinear), got {values['resample']}")
    values["rescale_factor"] = _number(error, "rescale_factor", values["rescale_factor"])
    for key in ("image_mean", "image_std"):
        values[key] = _triple(error, key, values[key])
    if 0 in values["image_std"]:
        raise error(f"image_std must not contain 0, got {values['image_std']}")
    for key in ("ignore_index", "num_labels"):
        if values[key] is not None:
            values[key] = _integer(error, key, values[key])
    for key in ("pad_size", "canvas"):
        if values[key] is not None:
            values[key] = _height_width(error, key, values[key])
    divisor, canvas = values["size_divisor"], values["canvas"]
    if canvas is not None and divisor and (canvas[0] % divisor or canvas[1] % divisor):
        raise error(f"canvas {canvas} must be a multiple of size_divisor={divisor} in both directions")
    return Settings(**values, extra=extra)


def to_dict(settings: Settings) -> dict[str, Any]:
    """The settings as the keys of a ``preprocessor_config.json`` that transformers loads back."""
    out: dict[str, Any] = dict(settings.extra)
    out.update(
        do_resize=settings.do_resize,
        size=dict(settings.size),
        size_divisor=settings.size_divisor,
        resample=settings.resample,
        do_rescale=settings.do_rescale,
        rescale_factor=settings.rescale_factor,
        do_normalize=settings.do_normalize,
        image_mean=list(settings.image_mean),
        image_std=list(settings.image_std),
        do_reduce_labels=settings.do_reduce_labels,
    )
    for key in ("ignore_index", "num_labels", "do_convert_rgb"):
        if getattr(settings, key) is not None:
            out[key] = getattr(settings, key)
    for key in ("pad_size", "canvas"):
        value = getattr(settings, key)
        if value is not None:
            out[key] = {"height": value[0], "width": value[1]}
    out["image_processor_type"] = "Mask2FormerImageProcessor"
    return out


# -- validation --------------------------------------------------------------------------------------------------


def _boolean(error: type[Exception], key: str, value: Any) -> bool:
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise error(f"{key} must be true or false, got {value!r}")


def _integer(error: type[Exception], key: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise error(f"{key} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise error(f"{key} must be at least {minimum}, got {value}")
    return value


def _number(error: type[Exception], key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise error(f"{key} must be a number, got {value!r}")
    if not math.isfinite(float(value)):  # NaN (which JSON readers accept) would make every output NaN
        raise error(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _triple(error: type[Exception], key: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (_number(error, key, value),) * 3
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise error(f"{key} must be one number or three (R, G, B), got {value!r}")
    return tuple(_number(error, key, v) for v in value)


def _height_width(error: type[Exception], key: str, value: Any) -> tuple[int, int]:
    if isinstance(value, Mapping):
        if set(value) != {"height", "width"}:
            raise error(f"{key} must have the keys 'height' and 'width', got {sorted(value)}")
        value = (value["height"], value["width"])
    elif isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise error(f"{key} must be (height, width) or {{'height': H, 'width': W}}, got {value!r}")
    return (_integer(error, key, value[0], minimum=1), _integer(error, key, value[1], minimum=1))


def _size(error: type[Exception], value: Any, max_size: int | None) -> dict[str, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"shortest_edge": value, "longest_edge": max_size or _LEGACY_LONGEST_EDGE}
    elif isinstance(value, (list, tuple)):
        height, width = _height_width(error, "size", value)
        value = {"height": height, "width": width}
    if not isinstance(value, Mapping) or set(value) not in _SIZE_KEYS:
        raise error(
            "size must be {'shortest_edge', 'longest_edge'}, {'height', 'width'} or {'max_height', 'max_width'} "
            f"(or an integer shortest edge), got {value!r}"
        )
    return {key: _integer(error, f"size[{key!r}]", v, minimum=1) for key, v in value.items()}
