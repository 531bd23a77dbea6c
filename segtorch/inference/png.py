"""PNG encoding of label maps, colour maps and pictures, fast enough to keep up with the model.

Every row gets PNG's "up" filter (the difference from the row above: zero where a map repeats row after row,
small on photographs), then deflate at level 1 by ISA-L (the ``isal`` package) where it is installed, else by
zlib with run-length matching. On 640x480 (2-core Zen 5): a photograph's overlay 2.2 ms (OpenCV's encoder at
its fastest settings 5.8 ms; zlib here about the same), a colour map 0.15 ms (1.3), a label map 0.07 ms (0.4).
Overlays and colour maps come out the size of OpenCV's files within 5%; label maps ~1.5x, ~2.5% of raw.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np


def _deflate_zlib(data) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
    return packer.compress(data) + packer.flush()


def _deflate_isal(data) -> bytes:
    return isal_zlib.compress(data, 1)


try:
    from isal import isal_zlib
    _deflate, _crc32 = _deflate_isal, isal_zlib.crc32  # its CRC: 0.01 ms on 800 KB, zlib's 0.1 ms
except ImportError:  # a platform without isal's wheels: the standard library's zlib, 3-8x slower
    _deflate, _crc32 = _deflate_zlib, zlib.crc32

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_UP = 2
_GRAY, _RGB = 0, 2  # PNG colour types


def _chunk(kind: bytes, data: bytes) -> tuple[bytes, ...]:
    return struct.pack(">I", len(data)), kind, data, struct.pack(">I", _crc32(data, _crc32(kind)))


def encode_png(array: np.ndarray) -> bytes:
    """The PNG file of an H x W uint8/uint16 (gray) or H x W x 3 uint8 (RGB) array."""
    array = np.asarray(array)
    gray = array.ndim == 2
    if not (gray or (array.ndim == 3 and array.shape[2] == 3)) or array.dtype not in (np.uint8, np.uint16) \
            or (array.dtype == np.uint16 and not gray) or 0 in array.shape:
        raise ValueError(f"cannot write a {array.dtype} array of shape {array.shape} as PNG: give H x W uint8 or "
                         "uint16, or H x W x 3 uint8 RGB")
    height, width = array.shape[:2]
    depth = 8 * array.dtype.itemsize
    if depth == 16:
        array = array.astype(">u2")  # PNG stores samples big-endian
    rows = np.ascontiguousarray(array).view(np.uint8).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = rows[0]  # the row above the first is zeros
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as the filter is defined
    header = struct.pack(">IIBBBBB", width, height, depth, _GRAY if gray else _RGB, 0, 0, 0)
    return b"".join((_SIGNATURE, *_chunk(b"IHDR", header), *_chunk(b"IDAT", _deflate(filtered)),
                     *_chunk(b"IEND", b"")))
