"""Images and segmentation maps in, channel-first numpy arrays out, sized and resized as HF's Pillow backend does.

HF's ``Mask2FormerImageProcessor`` (its Pillow variant, which transformers also falls back to without
torchvision) converts each image to a channel-first array, resizes it with Pillow through a uint8 image, then
rescales and normalizes it in numpy. The same steps are taken here with the same arithmetic, so results are
identical. Where HF would fail, we accept more: grayscale (2-D) arrays, 1- and 4-channel images and non-RGB
Pillow modes are converted to RGB the way HF converts them with ``do_convert_rgb=True`` (white behind
transparency), and segmentation maps may hold ids above 255. Where we differ on purpose: a PIL image is taken as a
viewer shows it (its EXIF orientation applied, as for a path), and 16-bit and float Pillow modes are scaled to
8 bits as a decoder would (Pillow's own conversion clips them: an all-white or all-black picture).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from m2f_deploy.errors import ConfigError, InputError

_Size = tuple[int, int]


def _is_array_like(item: Any) -> bool:
    return isinstance(item, np.ndarray) or hasattr(item, "__array__")


def flat_list(items: Any, what: str, image_ndim: int) -> list[Any]:
    """A flat list of single images (or maps) from one item, a batch array, or (nested) lists, as HF flattens.

    An array with ``image_ndim + 1`` dimensions is a batch (``[B, ...]``); images are ``image_ndim``-dimensional.
    """
    if isinstance(items, (list, tuple)):
        out: list[Any] = []
        for item in items:
            if isinstance(item, (list, tuple)):
                out.extend(flat_list(item, what, image_ndim))
            elif _is_array_like(item) and np.ndim(item) == image_ndim + 1:
                out.extend(np.asarray(item))
            else:
                out.append(item)
    elif _is_array_like(items) and np.ndim(items) == image_ndim + 1:
        out = list(np.asarray(items))
    else:
        out = [items]
    if not out:
        raise InputError(f"{what} is empty")
    return out


def _check_dtype(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype.kind not in "buif":
        raise InputError(f"{name} has dtype {array.dtype}; expected unsigned/signed integers, floats or bool")
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return array


def channels_last_flag(input_data_format: Any) -> bool | None:
    """``True`` for ``"channels_last"``, ``False`` for ``"channels_first"``, ``None`` (infer) for ``None``."""
    if input_data_format is None:
        return None
    value = getattr(input_data_format, "value", input_data_format)
    if value not in ("channels_first", "channels_last"):
        raise InputError(f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}")
    return value == "channels_last"


def to_channels_first(array: np.ndarray, name: str, channels_last: bool | None, counts: Sequence[int]) -> np.ndarray:
    """``[C, H, W]`` from a 3-D array; the channel axis is given or inferred as HF infers it (first wins a tie)."""
    if channels_last is None:
        if array.shape[0] in counts and array.shape[-1] in counts and array.shape[0] != array.shape[-1]:
            # e.g. [1, W, 3]: one RGB row, or a gray W x 3 picture? HF takes the first axis; a guess, so refused
            raise InputError(
                f"{name} has shape {array.shape}: its channel axis could be the first or the last; "
                "pass input_data_format='channels_last' or 'channels_first'"
            )
        if array.shape[0] in counts:
            channels_last = False
        elif array.shape[-1] in counts:
            channels_last = True
        else:
            raise InputError(
                f"{name} has shape {array.shape}: cannot find a channel axis of size {'/'.join(map(str, counts))} "
                "first or last"
            )
    return np.moveaxis(array, -1, 0) if channels_last else array


_EXIF_ORIENTATION = 0x0112
_HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def upright(image: Image.Image) -> Image.Image:
    """``image`` as a viewer shows it: its EXIF orientation applied (``ImageOps.exif_transpose``), else itself.

    The one EXIF rule of the package: image files (``runtime.images.load_image``) and PIL images given to the
    processor or :class:`~m2f_deploy.runtime.Segmenter` alike. Arrays carry no EXIF and are taken as they are.
    """
    from PIL import ImageOps

    if image.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1):  # 0 is invalid: treated as "as stored", as Pillow does
        return image
    return ImageOps.exif_transpose(image)


def pil_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """``image`` upright (:func:`upright`) in RGB mode: white behind transparency (as HF's ``do_convert_rgb=True``).

    Modes Pillow's ``convert`` would get wrong are converted as a decoder would: 16-bit gray (``I;16*``, and
    ``I`` holding 0..65535, as 16-bit PNGs and TIFFs open) is scaled to 8 bits (v / 257, rounded), float gray
    (``F``, e.g. a float TIFF) holding [0, 1] is scaled by 255; other ``I`` or ``F`` values are refused, as are
    modes with no RGB conversion. CMYK uses Pillow's conversion (no colour management); a multi-frame image gives
    the frame it is on (a file: the first). Raises :class:`InputError` naming ``name``.
    """
    try:
        image = upright(image)
        if image.mode == "RGB":
            return image
        if image.mode in _HIGH_BIT_DEPTH or image.mode == "F":
            array, transparent = np.asarray(image), image.info.get("transparency")
            image = Image.fromarray(_gray_to_uint8(array, image.mode, name))
            if isinstance(transparent, int):  # a 16-bit PNG's tRNS gray value: kept as alpha, as for 8 bits
                image.putalpha(Image.fromarray(np.where(array == transparent, 0, 255).astype(np.uint8)))
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA"))
        return image.convert("RGB")
    except InputError:
        raise
    except (OSError, ValueError, SyntaxError, TypeError, KeyError) as err:  # no conversion, corrupt EXIF
        raise InputError(f"{name}: cannot read this {image.mode} image as RGB ({err})") from None


def _gray_to_uint8(array: np.ndarray, mode: str, name: str) -> np.ndarray:
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if mode == "F":
        if not np.isfinite(array).all():
            raise InputError(f"{name}: float image (mode F) holds NaN or infinite values")
        if low < 0 or high > 1:
            raise InputError(f"{name}: float image (mode F) with values in [{low:g}, {high:g}]; expected [0, 1]")
        return np.round(array.astype(np.float64) * 255).astype(np.uint8)
    if low < 0 or high > 65535:
        raise InputError(f"{name}: 32-bit integer image with values in [{low}, {high}]; expected 16-bit 0..65535")
    return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 257)


def to_rgb(image: Any, name: str, channels_last: bool | None) -> np.ndarray:
    """One image as a ``[3, H, W]`` array, dtype as given (bool becomes uint8)."""
    if isinstance(image, Image.Image):
        array = np.moveaxis(np.asarray(pil_rgb(image, name)), -1, 0)
    elif _is_array_like(image):
        array = _check_dtype(np.asarray(image), name)
        if array.ndim == 2:
            array = array[None]
        elif array.ndim == 3:
            array = to_channels_first(array, name, channels_last, (1, 3, 4))
        else:
            raise InputError(f"{name} has shape {array.shape}; expected [H, W], [H, W, C] or [C, H, W]")
        array = _to_three_channels(array, name)
    else:
        raise InputError(f"{name} is a {type(image).__name__}; expected a PIL image or a numpy array")
    if array.shape[1] == 0 or array.shape[2] == 0:
        raise InputError(f"{name} has no pixels: shape {tuple(array.shape)}")
    return array


def _to_three_channels(array: np.ndarray, name: str) -> np.ndarray:
    channels = array.shape[0]
    if channels == 3:
        return array
    if channels == 1:
        return np.repeat(array, 3, axis=0)
    if channels == 4:  # blend onto white, as HF's convert_to_rgb does for arrays
        integer = np.issubdtype(array.dtype, np.integer)
        if not integer and (array.min() < 0 or array.max() > 1):
            raise InputError(f"{name}: a float RGBA image must hold values in [0, 1]")
        white = 255 if integer else 1.0
        alpha = array[3:4] / white
        blended = alpha * array[:3] + (1 - alpha) * white
        return np.round(blended).astype(array.dtype) if integer else blended.astype(array.dtype)
    raise InputError(f"{name} has {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")


# -- sizes -------------------------------------------------------------------------------------------------------


def resized_size(size_hw: _Size, size: Mapping[str, int], size_divisor: int) -> _Size:
    """HF's output size for an image of ``size_hw``: by the ``size`` rule, then rounded up to ``size_divisor``."""
    height, width = size_hw
    if "shortest_edge" in size:
        out = _shortest_longest(height, width, size["shortest_edge"], size["longest_edge"])
    elif "max_height" in size:
        scale = min(size["max_height"] / height, size["max_width"] / width)
        out = (int(height * scale), int(width * scale))
    else:
        out = (size["height"], size["width"])
    if size_divisor > 0:
        out = tuple(int(math.ceil(edge / size_divisor) * size_divisor) for edge in out)
    if min(out) < 1:
        raise InputError(f"an image of size {size_hw} would be resized to {out}; its aspect ratio is too extreme")
    return out


def _shortest_longest(height: int, width: int, shortest: int, longest: int) -> _Size:
    """Shortest edge to ``shortest``, unless that makes the longest edge exceed ``longest`` (HF's arithmetic)."""
    short, long = float(min(height, width)), float(max(height, width))
    unrounded = None  # the shortest edge before rounding, when the longest edge is the limit
    if long / short * shortest > longest:
        unrounded = longest * short / long
        shortest = int(round(unrounded))
    if min(height, width) == shortest:
        return height, width
    base = shortest if unrounded is None else unrounded
    if width < height:
        return int(base * height / width), shortest
    return shortest, int(base * width / height)


def fitted_size(size_hw: _Size, canvas: _Size) -> _Size:
    """The largest size with ``size_hw``'s aspect ratio (rounded down) that fits ``canvas``."""
    (height, width), (ch, cw) = size_hw, canvas
    if ch * width <= cw * height:  # the height is the limit
        return ch, max(1, min(cw, width * ch // height))
    return max(1, min(ch, height * cw // width)), cw


# -- pixels ------------------------------------------------------------------------------------------------------


def resize_rgb(image: np.ndarray, size_hw: _Size, resample: int, name: str) -> np.ndarray:
    """Resize ``[3, h, w]`` with Pillow through uint8, as HF does (floats in [0, 1] are scaled to 0..255 and back)."""
    scaled = False
    if image.dtype != np.uint8:
        if np.allclose(image, image.astype(np.int64)):
            if image.min() < 0 or image.max() > 255:
                raise InputError(f"{name} has values in [{image.min()}, {image.max()}]; expected 0..255 or 0..1")
        elif image.min() >= 0 and image.max() <= 1:
            image = (image.astype(np.float64) * 255).astype(np.float32)
            scaled = True
        else:  # transformers refuses these too (to_pil_image: outside [0, 1], cannot be converted to uint8)
            raise InputError(f"{name} has fractional values in [{image.min()}, {image.max()}]; expected whole numbers "
                             "0..255 or floats in 0..1")  # fmt: skip
        image = image.astype(np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(np.moveaxis(image, 0, -1)))
    resized = np.moveaxis(np.asarray(pil.resize((size_hw[1], size_hw[0]), resample=resample)), -1, 0)
    return (resized.astype(np.float64) * (1 / 255)).astype(np.float32) if scaled else resized


def rescale_and_normalize(
    image: np.ndarray,
    rescale_factor: float | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> np.ndarray:
    """HF's rescale (in float64, stored as float32), then normalize (in the image's float type); float32 out."""
    if rescale_factor is not None:
        image = (image.astype(np.float64) * rescale_factor).astype(np.float32)
    if mean is not None:
        if not np.issubdtype(image.dtype, np.floating):
            image = image.astype(np.float32)
        mean_ = np.asarray(mean, dtype=image.dtype)[:, None, None]
        std_ = np.asarray(std, dtype=image.dtype)[:, None, None]
        image = (image - mean_) / std_
    return image.astype(np.float32, copy=False)


# -- segmentation maps -------------------------------------------------------------------------------------------


def to_label_map(item: Any, name: str) -> np.ndarray:
    """One segmentation map as a 2-D integer array."""
    if isinstance(item, Image.Image):
        array = np.asarray(item)
    elif _is_array_like(item):
        array = np.asarray(item)
    else:
        raise InputError(f"{name} is a {type(item).__name__}; expected a PIL image or a numpy array")
    if array.ndim != 2:
        raise InputError(f"{name} has shape {array.shape}; a segmentation map is one channel [H, W]")
    array = _check_dtype(array, name)
    if array.dtype.kind == "f":
        if (array != np.round(array)).any():
            raise InputError(f"{name} holds non-integer values; segmentation maps hold class or instance ids")
        array = array.astype(np.int64)
    if 0 in array.shape:
        raise InputError(f"{name} has no pixels: shape {array.shape}")
    return array


def resize_label_map(labels: np.ndarray, size_hw: _Size, name: str) -> np.ndarray:
    """Nearest-neighbour resize with Pillow (the pixels HF's uint8 route picks, without its 255 limit)."""
    info = np.iinfo(np.int32)
    if labels.min() < info.min or labels.max() > info.max:
        raise InputError(f"{name} holds ids outside the int32 range")
    pil = Image.fromarray(labels.astype(np.int32))
    return np.asarray(pil.resize((size_hw[1], size_hw[0]), resample=Image.Resampling.NEAREST))


def binary_masks(
    labels: np.ndarray,
    instance_id_to_semantic_id: Mapping[int, int] | None,
    ignore_index: int | None,
    do_reduce_labels: bool,
    name: str,
) -> tuple[np.ndarray, np.ndarray]:
    """One mask per id in ``labels`` ``[H, W]``: masks ``[N, H, W]`` float32 and their class ids ``[N]`` int64.

    HF's rules: with ``do_reduce_labels`` every id drops by one and 0 becomes ``ignore_index``; ``ignore_index``
    gets no mask; with ``instance_id_to_semantic_id`` the map holds instance ids, mapped to class ids (by the
    id before reduction, the class reduced too).
    """
    if do_reduce_labels:
        if ignore_index is None:
            raise ConfigError("do_reduce_labels needs ignore_index (the id that 0 becomes)")
        labels = np.where(labels == 0, ignore_index, labels.astype(np.int64) - 1)
    ids = np.unique(labels)
    if ignore_index is not None:
        ids = ids[ids != ignore_index]
    masks = (labels[None] == ids[:, None, None]).astype(np.float32)
    if instance_id_to_semantic_id is None:
        return masks, ids.astype(np.int64)
    shift = 1 if do_reduce_labels else 0
    try:
        classes = [instance_id_to_semantic_id[int(i) + shift] - shift for i in ids]
    except KeyError as err:
        raise InputError(f"instance_id_to_semantic_id has no entry for instance id {err.args[0]} of {name}") from None
    return masks, np.asarray(classes, dtype=np.int64).reshape(-1)
