"""Reading image files for the runtime: one clear error per file that cannot be used."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from m2f_deploy.errors import InputError
from m2f_deploy.processing.images import pil_rgb

log = logging.getLogger("m2f_deploy")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif"}


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at ``path``, fully decoded and in RGB (EXIF rotation applied, alpha composited on white).

    Raises :class:`InputError` naming the file when it is missing, not an image, truncated or corrupt.
    """
    from PIL import ImageOps

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncation and corruption show here, not later
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise InputError(f"{path}: corrupt or truncated image ({e})") from None
    if image.width == 0 or image.height == 0:
        raise InputError(f"{path}: image has no pixels")
    return pil_rgb(image)


def find_images(inputs: list[Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted). A missing input, or none, is an error."""
    out: list[Path] = []
    empty: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                empty.append(item)
            out += found
        elif item.exists():
            out.append(item)
        else:
            raise InputError(f"{item}: no such file or folder")
    if not out:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, inputs))}")
    for item in empty:
        log.warning("%s: no images in this folder", item)
    return out
