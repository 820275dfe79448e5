"""Loading user-supplied images safely.

Every image that reaches the model goes through `load_image`: it refuses files that the client
should not be able to name, decodes the whole file (so truncation is caught here rather than deep
inside the processor), applies the EXIF orientation and returns an RGB image. Any failure becomes
an `ImageInputError` whose message names the input, so the HTTP client learns which of its files
was bad and the server stays healthy.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from PIL import Image, ImageOps

# 50 megapixels is far above anything the model can use (images are resized to at most
# 3456 x 384 / 1152 x 1152 tiles) yet small enough that decoding cannot exhaust memory.
MAX_IMAGE_PIXELS = 50_000_000

ALLOW_LOCAL_FILES_ENV = "DEEPSEEK_VL2_ALLOW_LOCAL_FILES"


class ImageInputError(ValueError):
    """An input image was refused or could not be decoded."""


def local_files_allowed() -> bool:
    """Whether inputs may name arbitrary files on this machine (off for the HTTP service)."""
    return os.environ.get(ALLOW_LOCAL_FILES_ENV, "").strip().lower() in {"1", "true", "yes"}


def _is_inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_upload_location(path: Path, input_name: str) -> None:
    """Refuse a path that does not lie in the temporary directory.

    Cog downloads URL and data: inputs into the temporary directory, but passes any other string
    through unchanged as a local path; without this check an HTTP client could make the server
    read (and echo back, via the grounding image) any file it can open.
    """
    # resolve() follows symlinks, so a link in /tmp pointing elsewhere is refused too.
    resolved = Path(path).resolve()
    temp_dir = Path(tempfile.gettempdir()).resolve()
    if not _is_inside(resolved, temp_dir):
        raise ImageInputError(
            f"{input_name} must be given as an http(s):// URL or a data: URI; "
            f"local file paths on the server are refused ({path}). "
            f"Set {ALLOW_LOCAL_FILES_ENV}=1 to allow local files (only for trusted callers)."
        )


def _decode(path: Path, max_pixels: int) -> Image.Image:
    # Pillow only warns (and errors at twice its own limit) about huge images; promote the
    # warning so an oversized upload is refused instead of being decoded.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            width, height = opened.size
            # Image.open reads only the header, so this check runs before any pixel is decoded.
            if width * height > max_pixels:
                raise ImageInputError(
                    f"image is {width}x{height} = {width * height} pixels, "
                    f"more than the limit of {max_pixels}"
                )
            # Force a full decode now: a truncated file fails here, not later in the model.
            opened.load()
            upright = ImageOps.exif_transpose(opened)
    # RGBA loses its alpha channel without compositing, exactly as the reference pipeline does.
    return upright.convert("RGB")


def load_image(
    path: str | os.PathLike[str],
    input_name: str,
    *,
    allow_local_files: bool,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Decode the image at `path` as an upright RGB image.

    `input_name` (e.g. "image2") is used in error messages. With `allow_local_files` false, only
    files inside the temporary directory (where Cog puts downloaded inputs) are accepted.
    """
    file_path = Path(path)
    if not allow_local_files:
        check_upload_location(file_path, input_name)
    try:
        if file_path.stat().st_size == 0:
            raise ImageInputError("the file is empty")
        return _decode(file_path, max_pixels)
    except Exception as error:  # Pillow raises many unrelated types for bad files.
        reason = str(error) or type(error).__name__
        raise ImageInputError(f"{input_name} could not be read as an image: {reason}") from error
