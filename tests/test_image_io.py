"""Reading images: formats as the toolbox reads them, EXIF orientation of files, errors that name the file."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from segtorch.inference import ImageReadError, read_image


RNG = np.random.default_rng(5)
RGB = RNG.integers(0, 256, (29, 41, 3), dtype=np.uint8)


def _toolbox_read(path: Path) -> np.ndarray:
    """What the toolbox's dataset reader sees, in RGB."""
    return cv2.imread(str(path))[..., ::-1]


def test_read_formats_like_the_toolbox(tmp_path):
    cases = {}
    Image.fromarray(RGB).save(tmp_path / "rgb.png"); cases["rgb.png"] = RGB
    Image.fromarray(RGB[..., 0]).save(tmp_path / "gray.png"); cases["gray.png"] = np.repeat(RGB[..., :1], 3, 2)
    rgba = np.dstack([RGB, RNG.integers(0, 256, RGB.shape[:2], dtype=np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png"); cases["rgba.png"] = RGB  # alpha dropped
    pal = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "palette.png"); cases["palette.png"] = np.asarray(pal.convert("RGB"))
    g16 = RNG.integers(0, 65536, RGB.shape[:2], dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "gray16.png"), g16); cases["gray16.png"] = np.repeat((g16 >> 8)[..., None], 3, 2)
    c16 = RNG.integers(0, 65536, RGB.shape, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), c16[..., ::-1]); cases["rgb16.png"] = (c16 >> 8).astype(np.uint8)
    Image.fromarray(RGB).save(tmp_path / "image.jpg", quality=90); cases["image.jpg"] = None
    for name, expected in cases.items():
        got = read_image(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (*RGB.shape[:2], 3) and got.flags.c_contiguous, name
        assert np.array_equal(got, _toolbox_read(tmp_path / name)), name
        if expected is not None:
            assert np.array_equal(got, expected), name
        assert np.array_equal(read_image(str(tmp_path / name)), got)
        assert np.array_equal(read_image((tmp_path / name).read_bytes()), got), name


def _exif_jpeg(path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(RGB).save(path, quality=95, exif=exif.tobytes())


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_read_applies_exif_orientation(tmp_path, orientation):
    path = tmp_path / "rotated.jpg"
    _exif_jpeg(path, orientation)
    got = read_image(path)
    expected_shape = RGB.shape if orientation == 3 else (RGB.shape[1], RGB.shape[0], 3)
    assert got.shape == expected_shape
    assert np.array_equal(got, _toolbox_read(path))
    from PIL import ImageOps

    pil = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    # a PIL image is taken as it is (issue 35.6: its tag may be stale); bytes get the orientation as files do
    assert np.array_equal(read_image(Image.open(path)), np.asarray(Image.open(path).convert("RGB")))
    assert np.array_equal(read_image(path.read_bytes()), got)
    assert np.abs(got.astype(int) - pil).max() <= 2  # same picture, whichever JPEG decoder


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("not an image at all\n")
    with pytest.raises(ImageReadError, match=r"notes\.jpg: not an image file"):
        read_image(tmp_path / "notes.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.png: empty file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)
    Image.fromarray(RGB).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.jpg: corrupt or truncated"):
        read_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(data[: len(data) // 2])
    Image.fromarray(RGB).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png: corrupt or truncated"):
        read_image(tmp_path / "cut.png")
    for err in (FileNotFoundError, ImageReadError):  # one line each
        try:
            read_image(tmp_path / ("missing.png" if err is FileNotFoundError else "cut.png"))
        except err as e:
            assert "\n" not in str(e)


def test_read_accepts_jpeg_with_trailing_bytes(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.jpg", quality=90)
    (tmp_path / "b.jpg").write_bytes((tmp_path / "a.jpg").read_bytes() + b"trailing metadata")
    assert np.array_equal(read_image(tmp_path / "b.jpg"), read_image(tmp_path / "a.jpg"))


def test_read_pil_and_array_inputs():
    assert np.array_equal(read_image(Image.fromarray(RGB)), RGB)
    assert np.array_equal(read_image(Image.fromarray(RGB).convert("RGBA")), RGB)
    assert np.array_equal(read_image(Image.fromarray(RGB[..., 1])), np.repeat(RGB[..., 1:2], 3, 2))
    pal = Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    assert np.array_equal(read_image(pal), np.asarray(pal.convert("RGB")))
    g16 = RNG.integers(0, 65536, (7, 9), dtype=np.uint16)
    assert np.array_equal(read_image(Image.fromarray(g16)), np.repeat((g16 >> 8)[..., None].astype(np.uint8), 3, 2))
    assert np.array_equal(read_image(RGB), RGB)
    assert np.array_equal(read_image(RGB[..., 0]), np.repeat(RGB[..., :1], 3, 2))
    assert np.array_equal(read_image(RGB[..., :1]), np.repeat(RGB[..., :1], 3, 2))
    assert np.array_equal(read_image(np.dstack([RGB, RGB[..., :1]])), RGB)
    assert np.array_equal(read_image(g16), np.repeat((g16 >> 8)[..., None], 3, 2).astype(np.uint8))
    with pytest.raises(ImageReadError, match="float"):
        read_image(RGB.astype(np.float32) / 255)
    with pytest.raises(ImageReadError, match="shape"):
        read_image(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="cannot read an image"):
        read_image(12)


