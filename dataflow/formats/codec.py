"""Field kinds and their byte encodings inside shards — with no pickle unless asked for.

A field has a *kind* that says how its value is stored and decoded:

============  ==========================================  ===================================
kind          tar member bytes                            Python value
============  ==========================================  ===================================
image         the encoded file as is (JPEG, PNG, WebP…)   bytes (decode with ``decode_image``)
bytes         as is                                       bytes
int           ASCII decimal (WebDataset ``.cls`` style)   int
float         ASCII ``repr``                              float
str           UTF-8                                       str
json          UTF-8 JSON                                  dict / list / scalar
tokens        ``.npy`` (NumPy format, ``allow_pickle=False``)  1-D integer ndarray
npy           ``.npy``                                    ndarray
pickle        pickle — decoded only when a config opts in  any
============  ==========================================  ===================================

Images are decoded by simplejpeg (libjpeg-turbo) when they are JPEG and by Pillow otherwise;
``strict`` decoding turns libjpeg's "premature end of data" warnings into errors, so a
truncated JPEG is caught instead of padded with grey. CMYK and YCCK JPEGs are decoded to
CMYK and converted with Pillow's formula (``cmyk_to_rgb``), the one the ROI decoder uses too,
so every path gives the same pixels (TurboJPEG's own conversion is one level off Pillow's).
"""

from __future__ import annotations

import io
import json
import threading
from typing import Any, Final

import numpy as np

KINDS: Final = ("image", "bytes", "int", "float", "str", "json", "tokens", "npy", "pickle")

_IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "jxl"}
)
_EXTENSION_KINDS = {
    "cls": "int",
    "cls2": "int",
    "index": "int",
    "label": "int",
    "id": "int",
    "txt": "str",
    "text": "str",
    "caption": "str",
    "json": "json",
    "npy": "npy",
    "tokens": "tokens",
    "pickle": "pickle",
    "pkl": "pickle",
    "pyd": "pickle",
    "pth": "pickle",
}


NUMPY_LOAD_LOCK = threading.Lock()

MAX_IMAGE_PIXELS = 1 << 26
"""Images declaring more pixels (67 M: 8,192 × 8,192) are refused before decoding: a few
hundred bytes of PNG or JPEG header can otherwise ask for gigabytes. Raise it for data that
really holds larger images."""


def check_pixels(height: int, width: int) -> None:
    """Raise ``ValueError`` for declared dimensions that are empty or over the limit."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image declares {width} × {height} pixels")
    if height * width > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"image declares {width} × {height} = {height * width:,} pixels, over the "
            f"{MAX_IMAGE_PIXELS:,}-pixel limit (dataflow.formats.codec.MAX_IMAGE_PIXELS)"
        )


"""Serialises ``np.load``: it parses .npy headers with ``ast.literal_eval``, and CPython
3.11's AST validator is not thread-safe ("SystemError: AST constructor recursion depth
mismatch", python/cpython#106905, fixed in later releases); the loader's threads hit it."""


class Encoded(bytes):
    """Member bytes already in their stored encoding (copied from an existing shard)."""


class PickleRefusedError(ValueError):
    """A pickle-encoded field met a config that has not opted in."""


def kind_for_extension(extension: str) -> str:
    """The kind WebDataset conventions imply for a member extension (last dotted part)."""
    last = extension.lower().rsplit(".", 1)[-1]
    if last in _IMAGE_EXTENSIONS:
        return "image"
    return _EXTENSION_KINDS.get(last, "bytes")


def kind_for_value(value: Any) -> str:
    """Kind inferred from a Python value read from JSONL or a table."""
    if isinstance(value, bool):
        return "int"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytes"
    if isinstance(value, np.ndarray):
        return "tokens" if value.ndim == 1 and value.dtype.kind in "iu" else "npy"
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        return "tokens"
    return "json"


def encode(kind: str, value: Any, *, allow_pickle: bool = False) -> bytes:
    """The tar member bytes for ``value`` of ``kind``."""
    if isinstance(value, Encoded):
        if kind == "pickle" and not allow_pickle:
            raise PickleRefusedError("pickle encoding is off; set allow_pickle to opt in")
        return bytes(value)
    if kind in ("image", "bytes"):
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"a {kind} field needs bytes, got {type(value).__name__}")
        return bytes(value)
    if kind == "int":
        return str(int(value)).encode()
    if kind == "float":
        return repr(float(value)).encode()
    if kind == "str":
        return str(value).encode("utf-8")
    if kind == "json":
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if kind in ("tokens", "npy"):
        array = np.asarray(value)
        if kind == "tokens" and (array.ndim != 1 or array.dtype.kind not in "iu"):
            raise TypeError(f"a tokens field needs a 1-D integer array, got {array.dtype}")
        if array.dtype == object:
            raise TypeError("object arrays would need pickle; store numbers or use json")
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()
    if kind == "pickle":
        if not allow_pickle:
            raise PickleRefusedError("pickle encoding is off; set allow_pickle to opt in")
        import pickle

        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    raise ValueError(f"unknown field kind {kind!r}; known kinds: {', '.join(KINDS)}")


def decode(kind: str, data: bytes | memoryview, *, allow_pickle: bool = False) -> Any:
    """The Python value of member bytes of ``kind`` (images stay encoded bytes)."""
    if kind in ("image", "bytes"):
        return bytes(data)
    if kind == "int":
        return int(bytes(data).strip() or b"x")
    if kind == "float":
        return float(bytes(data).strip())
    if kind == "str":
        return bytes(data).decode("utf-8")
    if kind == "json":
        try:
            return json.loads(bytes(data).decode("utf-8"))
        except RecursionError:
            raise ValueError("JSON nested too deeply to decode") from None
    if kind in ("tokens", "npy"):
        with NUMPY_LOAD_LOCK:
            return np.load(io.BytesIO(bytes(data)), allow_pickle=False)
    if kind == "pickle":
        if not allow_pickle:
            raise PickleRefusedError(
                "this field is pickle-encoded and pickle can run code; "
                "set allow_pickle = true only for data you trust"
            )
        import pickle

        return pickle.loads(bytes(data))
    raise ValueError(f"unknown field kind {kind!r}; known kinds: {', '.join(KINDS)}")


def is_jpeg(data: bytes | memoryview) -> bool:
    return bytes(data[:3]) == b"\xff\xd8\xff"


def cmyk_to_rgb(ink: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB ``uint8`` from (H, W, 4) CMYK as libjpeg decodes it, as Pillow converts it.

    Adobe's convention (Photoshop's; Pillow, OpenCV and TurboJPEG assume it for every CMYK
    JPEG) stores ink inverted, so with ``c`` and ``k`` the stored values
    R = k - round((255 - c) · k / 255), bit for bit Pillow's ``convert("RGB")`` and the
    ``_roijpeg`` decoder's ``cmyk_row_to_rgb``.
    """
    key = ink[..., 3:4].astype(np.uint32)
    product = (255 - ink[..., :3].astype(np.uint32)) * key + 128
    return (key - (((product >> 8) + product) >> 8)).astype(np.uint8)


_SIXTEEN_BIT_MODES: Final = frozenset({"I;16", "I;16B", "I;16L", "I"})


def _sixteen_bit_to_rgb(levels: np.ndarray) -> np.ndarray:
    """A 16-bit greyscale image as RGB ``uint8``: the high byte of each level (v >> 8), as
    Pillow and libpng reduce 16-bit RGB. Pillow's ``convert("RGB")`` clips these at 255
    instead, which turns most of a 16-bit image white."""
    high = (np.clip(levels.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
    return np.repeat(high[..., None], 3, axis=2)


def decode_image(
    data: bytes | memoryview, *, min_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode to an RGB ``uint8`` array of shape (H, W, 3).

    Alpha is dropped (the colour channels as stored, not composited on a background: what
    Pillow's ``convert("RGB")`` does); 16-bit levels keep their high byte; greyscale and
    palette images are expanded to three equal channels.

    ``min_size=(height, width)`` lets libjpeg-turbo decode a JPEG at a reduced DCT scale
    (1/2, 1/4, 1/8) that still covers that size: far fewer pixels to produce.
    Raises ``ValueError`` for data that is not a complete, decodable image.
    """
    if is_jpeg(data):
        import simplejpeg

        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
            check_pixels(int(height), int(width))
            ink = colorspace in ("CMYK", "YCCK")
            scaled = {} if min_size is None else {"min_height": min_size[0],
                                                  "min_width": min_size[1]}  # fmt: skip
            pixels = simplejpeg.decode_jpeg(
                data, colorspace="CMYK" if ink else "RGB", strict=True, **scaled
            )
            return cmyk_to_rgb(pixels) if ink else pixels
        except (ValueError, RuntimeError) as error:
            raise ValueError(f"undecodable JPEG: {error}") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            check_pixels(image.height, image.width)
            image.load()
            if image.mode in _SIXTEEN_BIT_MODES:
                return _sixteen_bit_to_rgb(np.asarray(image))
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as error:  # fmt: skip
        raise ValueError(f"undecodable image: {error}") from None


def check_image(data: bytes | memoryview) -> None:
    """Raise ``ValueError`` unless ``data`` decodes completely; cheapest complete check.

    JPEGs are decoded at 1/8 DCT scale: every entropy-coded byte is still parsed (so
    truncation and corruption are found) at a small fraction of the full decode cost.
    """
    decode_image(data, min_size=(1, 1))
