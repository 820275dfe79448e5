"""deepseek_vl2.inputs.images: decoding user images safely, with errors that name the input."""

from __future__ import annotations

import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepseek_vl2.inputs.images import (
    ALLOW_LOCAL_FILES_ENV, MAX_IMAGE_PIXELS, ImageInputError, load_image, local_files_allowed,
)  # fmt: skip

FIXTURE_IMAGES = Path(__file__).parent.parent / "fixtures" / "images"


@pytest.fixture(autouse=True)
def upload_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make tmp_path the temporary directory (where Cog puts uploads), wherever the repo lies."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _copy_fixture(name: str, directory: Path) -> Path:
    target = directory / name
    target.write_bytes((FIXTURE_IMAGES / name).read_bytes())
    return target


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a single tiny data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_decodes_a_jpeg_as_rgb(tmp_path: Path) -> None:
    image = load_image(_copy_fixture("vqa_1.jpg", tmp_path), "image1", allow_local_files=False)
    assert image.mode == "RGB"
    assert image.size == Image.open(FIXTURE_IMAGES / "vqa_1.jpg").size


def test_applies_exif_orientation(tmp_path: Path) -> None:
    # Stored 400x200 with Orientation=6 (rotate 90 degrees clockwise to display).
    assert Image.open(FIXTURE_IMAGES / "exif_rot.jpg").size == (400, 200)
    image = load_image(_copy_fixture("exif_rot.jpg", tmp_path), "image1", allow_local_files=False)
    assert image.size == (200, 400)


def test_rgba_drops_alpha_without_compositing(tmp_path: Path) -> None:
    original = Image.open(FIXTURE_IMAGES / "logo.png")
    assert original.mode == "RGBA"
    image = load_image(_copy_fixture("logo.png", tmp_path), "image1", allow_local_files=False)
    assert image.mode == "RGB"
    expected = np.asarray(original.convert("RGBA"))[..., :3]
    assert np.array_equal(np.asarray(image), expected)


def test_grayscale_becomes_equal_channels(tmp_path: Path) -> None:
    original = np.asarray(Image.open(FIXTURE_IMAGES / "gray_300x500.png"))
    image = load_image(
        _copy_fixture("gray_300x500.png", tmp_path), "image1", allow_local_files=False
    )
    pixels = np.asarray(image)
    assert pixels.shape == (500, 300, 3)
    for channel in range(3):
        assert np.array_equal(pixels[..., channel], original)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"this is a text file, not an image\n", "cannot identify image file"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, ""),  # JPEG magic then garbage
    ],
    ids=["empty", "text", "corrupt"],
)
def test_unreadable_files_are_refused_with_the_input_name(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "upload.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageInputError, match="^image2 could not be read as an image: ") as error:
        load_image(path, "image2", allow_local_files=False)
    assert reason in str(error.value)


def test_truncated_file_is_detected(tmp_path: Path) -> None:
    data = (FIXTURE_IMAGES / "vqa_1.jpg").read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageInputError, match="image3 could not be read as an image: .*truncated"):
        load_image(path, "image3", allow_local_files=False)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(20_000, 20_000))
    assert 20_000 * 20_000 > MAX_IMAGE_PIXELS
    with pytest.raises(ImageInputError, match="image1 could not be read as an image: .*limit"):
        load_image(path, "image1", allow_local_files=False)


def test_pixel_limit_is_configurable(tmp_path: Path) -> None:
    path = _copy_fixture("gray_300x500.png", tmp_path)
    with pytest.raises(ImageInputError, match="300x500 = 150000 pixels"):
        load_image(path, "image1", allow_local_files=False, max_pixels=149_999)
    assert load_image(path, "image1", allow_local_files=False, max_pixels=150_000).size == (
        300,
        500,
    )


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ImageInputError, match="image1 could not be read as an image"):
        load_image(tmp_path / "absent.png", "image1", allow_local_files=False)


def test_local_files_outside_the_temp_dir_are_refused() -> None:
    with pytest.raises(ImageInputError, match="image1 must be given as an http"):
        load_image(FIXTURE_IMAGES / "vqa_1.jpg", "image1", allow_local_files=False)


def test_symlink_out_of_the_temp_dir_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "innocent.jpg"
    link.symlink_to(FIXTURE_IMAGES / "vqa_1.jpg")
    with pytest.raises(ImageInputError, match="local file paths on the server are refused"):
        load_image(link, "image1", allow_local_files=False)


def test_local_files_are_read_when_allowed() -> None:
    image = load_image(FIXTURE_IMAGES / "tiny_20x10.png", "image1", allow_local_files=True)
    assert image.size == (20, 10)


@pytest.mark.parametrize(
    ("value", "allowed"), [("1", True), ("true", True), ("0", False), ("", False)]
)
def test_allow_local_files_switch(
    monkeypatch: pytest.MonkeyPatch, value: str, allowed: bool
) -> None:
    monkeypatch.setenv(ALLOW_LOCAL_FILES_ENV, value)
    assert local_files_allowed() is allowed
