"""Reading image files for the runtime: one clear error per file that cannot be used."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from m2f_deploy.errors import InputError
from m2f_deploy.processing.images import pil_rgb


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
