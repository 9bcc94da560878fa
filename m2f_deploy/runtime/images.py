"""Reading image files for the runtime: one clear error per file that cannot be used."""

from __future__ import annotations

import errno
import logging
import os
import stat
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from m2f_deploy.errors import InputError
from m2f_deploy.processing.images import pil_rgb

log = logging.getLogger("m2f_deploy")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".gif"}
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
"""The default pixel limit of :func:`load_image` (``m2f-predict --max-pixels``): Pillow's ``MAX_IMAGE_PIXELS``
(89,478,485, about 0.25 GB of RGB), beyond which Pillow itself warns of a decompression bomb."""


def load_image(path: str | os.PathLike, *, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """The image at ``path``, fully decoded, upright and in RGB (see ``processing.images.pil_rgb``: EXIF rotation
    applied, alpha composited on white, 16-bit and float gray scaled to 8 bits; a multi-frame file gives its first
    frame, with a warning).

    Raises :class:`InputError` naming the file when it is missing, not a regular file (a FIFO would block), not an
    image, truncated or corrupt, or larger than ``max_pixels`` (None: no limit of ours; Pillow still refuses twice
    its ``MAX_IMAGE_PIXELS``), which is checked from the header before any pixel is decoded.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path}: no such file" + (" (a dangling link)" if path.is_symlink() else "")) from None
    except OSError as e:  # a symlink loop (ELOOP), no permission on the folder
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise InputError(f"{path}: {kind}; give image files")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            with Image.open(path) as image:
                pixels = image.width * image.height
                if max_pixels is not None and pixels > max_pixels:
                    raise InputError(
                        f"{path}: {image.width}x{image.height} = {pixels:,} pixels is over the limit of "
                        f"{max_pixels:,} (--max-pixels; a decompression bomb?)"
                    )
                frames = getattr(image, "n_frames", 1)
                image.load()  # decode now: truncation and corruption show here, not later
                image = pil_rgb(image, str(path))
    except InputError:
        raise
    except Image.DecompressionBombError as e:  # over twice Pillow's MAX_IMAGE_PIXELS
        raise InputError(f"{path}: refused by Pillow as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image Pillow can read") from None
    except PermissionError:
        raise InputError(f"{path}: cannot read (permission denied)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise InputError(f"{path}: corrupt or truncated image ({e})") from None
    if image.width == 0 or image.height == 0:
        raise InputError(f"{path}: image has no pixels")
    if frames > 1 and path.suffix.lower() not in (".jpg", ".jpeg"):  # a JPEG's extra frames: MPO thumbnails
        log.warning("%s: %d frames; the first is used", path, frames)
    return image


def find_images(inputs: list[Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted). A missing input, or none, is an error.

    Entries of a folder that cannot be images are skipped with a warning naming them: non-regular files (FIFOs,
    sockets, devices: reading one would block), dangling links and link loops.
    """
    out: list[Path] = []
    empty: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = []
            for p in sorted(item.iterdir()):
                if p.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                problem = _not_a_file(p)
                if problem:
                    log.warning("%s: skipped: %s", p, problem)
                else:
                    found.append(p)
            if not found:
                empty.append(item)
            out += found
        elif item.exists():
            out.append(item)  # given by name: load_image reports it if it is not an image file
        else:
            raise InputError(f"{item}: {_not_a_file(item) if item.is_symlink() else 'no such file or folder'}")
    if not out:
        raise InputError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, inputs))}")
    for item in empty:
        log.warning("%s: no images in this folder", item)
    return out


def _not_a_file(path: Path) -> str:
    """Why ``path`` cannot be an image file, or an empty string."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a dangling link" if path.is_symlink() else "no such file"
    except OSError as e:
        return "a link loop" if e.errno == errno.ELOOP else f"cannot read ({e.strerror or e})"
    if stat.S_ISDIR(mode):
        return "a folder"
    if not stat.S_ISREG(mode):
        return "not a regular file (a FIFO, socket or device)"
    return ""
