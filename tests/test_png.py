"""segtorch's PNG encoder (`inference/png.py`): what libpng (OpenCV) and Pillow read back is the array written,
with either deflate backend; bad arrays are refused."""
import io
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from segtorch.inference import png


@pytest.fixture(params=["isal", "zlib"])
def deflate(request, monkeypatch):
    if request.param == "isal":
        isal_zlib = pytest.importorskip("isal.isal_zlib")
        monkeypatch.setattr(png, "_deflate", png._deflate_isal)
        monkeypatch.setattr(png, "_crc32", isal_zlib.crc32)
    else:
        monkeypatch.setattr(png, "_deflate", png._deflate_zlib)
        monkeypatch.setattr(png, "_crc32", zlib.crc32)
    return request.param


def _arrays():
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    return {
        "labels uint8": rng.integers(0, 150, (41, 29), dtype=np.uint8),
        "labels uint16": rng.integers(0, 65536, (23, 31), dtype=np.uint16),  # > 256 classes, both bytes used
        "rgb": picture,
        "rgb, a strided view": picture[::2, ::-1],
        "one row": rng.integers(0, 256, (1, 17, 3), dtype=np.uint8),
        "one column": rng.integers(0, 256, (19, 1), dtype=np.uint8),
    }


@pytest.mark.parametrize("name", list(_arrays()))
def test_readers_get_back_the_array(name, deflate):
    array = _arrays()[name]
    data = png.encode_png(array)
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # Pillow checks every chunk's CRC
        back = np.array(im)
    if array.dtype == np.uint16:
        assert im.mode.startswith("I")
        back = back.astype(np.uint16)
    np.testing.assert_array_equal(back, array)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # libpng, BGR order
    expected = array[..., ::-1] if array.ndim == 3 else array
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded.reshape(expected.shape), expected)


def test_maps_compress(deflate):
    """Rows repeating (a label or colour map) become zero rows after the filter: a few percent of raw."""
    rng = np.random.default_rng(1)
    blocks = np.kron(rng.integers(0, 6, (6, 8)), np.ones((80, 80), np.int64)).astype(np.uint8)
    colours = np.take(rng.integers(0, 256, (6, 3), dtype=np.uint8), blocks, axis=0)
    for array in (blocks, colours):
        assert len(png.encode_png(array)) < 0.03 * array.nbytes


@pytest.mark.parametrize("array", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8),
                                   np.zeros((4, 4, 3), np.uint16), np.zeros((0, 4), np.uint8),
                                   np.zeros(4, np.uint8)])
def test_refuses_what_png_cannot_hold_here(array):
    with pytest.raises(ValueError, match="cannot write a .* as PNG"):
        png.encode_png(array)
