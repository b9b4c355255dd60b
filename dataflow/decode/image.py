"""CPU image decode + augment: random-resized-crop, flip, written straight into a batch slot.

Per sample: pick the crop on the JPEG header's size (torchvision's RandomResizedCrop rule:
up to 10 tries of area ∈ ``scale`` and log-uniform aspect ∈ ``ratio``, else the central
crop), then decode *only the crop* (the ``_roijpeg`` C extension on libjpeg-turbo: rows
above it skipped without inverse DCT, columns outside cut at iMCU boundaries, nothing below
it decoded) at the smallest DCT scale (1/8 … 1) that keeps the crop at least as large as
the output, and resize with OpenCV (bilinear; area when shrinking by > 2×) into the
preallocated ``uint8`` HWC slot of the batch, mirrored when the flip says so. Pixels are
identical to cropping a full decode; a random-resized crop costs ~60 % of a full decode
(measured: 359 µs vs 592 µs on ~33 KB photos). The crop goes into a per-thread scratch
buffer rather than a fresh block per image: 492 against 536 µs per image with the resize.
A JPEG with a restart marker per row of blocks (``add_row_restarts``, at conversion) is cut
at the crop's first row, so not even the Huffman codes above it are read: 406 → 392 µs for
the same crops on the benchmark's photos, whose tops lie 16 % down on average; those rows
decode cheaper than the rest (the same crops moved to the top: 329 µs).
Without the extension, simplejpeg decodes the whole image. Non-JPEGs decode through
Pillow. CMYK and YCCK JPEGs come out RGB on every path, converted as Pillow converts them.
The randomness is counter-based uniforms hashed from (seed, epoch, sample id) —
``sample_draws``, vectorised per batch — so a sample gets the same crop whichever rank or
thread decodes it, and after a resume.

Trade-off: damage in a JPEG below or beside the crop (and, with row restarts, above it)
goes unnoticed, as it is never decoded; conversion's check that every image decodes and the
per-sample checksums are the guards against bad bytes. The decoders and OpenCV release
the GIL, so a thread pool decodes in parallel without pickling images between processes.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from dataflow.formats.codec import check_pixels, decode_image, is_jpeg

_roijpeg: Any
try:  # the optional C extension (setup.py): decode only the crop
    _roijpeg = importlib.import_module("dataflow.decode._roijpeg")
except ImportError:  # pragma: no cover - built wherever libjpeg-turbo's headers exist
    _roijpeg = None

cv2: Any
try:
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from our pool; OpenCV's own would oversubscribe
except ImportError:  # pragma: no cover - opencv-python-headless is a dependency
    cv2 = None


@dataclass(frozen=True, kw_only=True)
class ImageAugment:
    size: int = 224
    """Output height and width."""
    scale: tuple[float, float] = (0.08, 1.0)
    """Crop area as a fraction of the image (training); ignored when ``train`` is False."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Crop aspect ratio range."""
    flip: bool = True
    """Mirror horizontally with probability 1/2 (training)."""
    train: bool = True
    """False: deterministic evaluation transform (resize shorter side, central crop)."""

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"image size must be >= 1, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {self.ratio}")


def jpeg_size(data: bytes | memoryview) -> tuple[int, int]:
    """(height, width) from a JPEG header without decoding."""
    import simplejpeg

    height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    check_pixels(int(height), int(width))
    return int(height), int(width)


_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


def dali_image_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) of a JPEG or PNG that DALI should decode, from its header; None for
    other formats (the CPU decoders take those). Raises ``ValueError`` for a file whose end
    is visibly missing: DALI decodes a truncated image with a warning and grey fill."""
    head = bytes(data[:24])
    if is_jpeg(head):
        if b"\xff\xd9" not in bytes(data[-1024:]):
            raise ValueError("truncated JPEG: no end-of-image marker")
        return jpeg_size(data)
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        if b"IEND" not in bytes(data[-12:]):
            raise ValueError("truncated PNG: no IEND chunk")
        height, width = int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")
        check_pixels(height, width)
        return height, width
    return None


def can_add_row_restarts() -> bool:
    """Whether ``add_row_restarts`` can run here (the C extension is built)."""
    return _roijpeg is not None


def add_row_restarts(data: bytes) -> bytes:
    """The same JPEG with a restart marker at every row of blocks, for conversion.

    The DCT coefficients are copied, not re-encoded, so every decoder gives the same pixels;
    Huffman tables are re-optimised, which pays for the markers (1.1 % smaller on the
    benchmark photos); APPn and COM segments (EXIF, ICC) are kept; a progressive JPEG comes
    out baseline. ~2 ms for a 44 KB photo. With the markers, ``decode_augment_into`` starts
    decoding a crop at the row of blocks holding the pixel row above it, not at the top of
    the image. A JPEG
    that has them already comes back unchanged. Raises ``ValueError`` for declared
    dimensions over the pixel limit (before libjpeg allocates anything) and for damaged
    data: every entropy-coded byte is read, libjpeg's warnings count as errors.
    """
    if _roijpeg is None:
        raise RuntimeError("add_row_restarts needs the _roijpeg C extension (see setup.py)")
    jpeg_size(data)
    result: bytes = _roijpeg.add_row_restarts(data)
    return result


DRAWS: Final = 42
"""Uniform numbers one sample's augmentation consumes: 10 crop tries × 4, a flip, a spare."""

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, vectorised: a well-mixed uint64 per input uint64."""
    with np.errstate(over="ignore"):
        z = values + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_draws(seed: int, epoch: int, sample_ids: np.ndarray) -> np.ndarray:
    """(len(sample_ids), DRAWS) uniforms in [0, 1), a pure function of (seed, epoch, id).

    Counter-based (a hash of the counter, like Philox), so a whole batch's draws cost one
    vectorised call (~1 µs per sample instead of ~12 µs for seeding a generator per
    sample), and a sample's crop does not depend on which rank, step or thread decodes it.
    """
    with np.errstate(over="ignore"):
        key = _splitmix64(np.asarray([seed * 1_000_003 + epoch], dtype=np.uint64))[0]
        ids = np.asarray(sample_ids, dtype=np.uint64)[:, None] * np.uint64(DRAWS)
        counters = ids + np.arange(DRAWS, dtype=np.uint64)[None, :]
        bits = _splitmix64(counters ^ key)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def crop_box(
    height: int, width: int, augment: ImageAugment, draws: Sequence[float]
) -> tuple[int, int, int, int, bool]:
    """(top, left, crop height, crop width, flip) for one sample, from its DRAWS uniforms."""
    flip = augment.flip and draws[40] < 0.5
    if not augment.train:
        side = min(height, width) * 0.875  # the customary 224/256 central crop
        crop_h = crop_w = max(1, round(side))
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w, False
    area = height * width
    low_scale, high_scale = augment.scale
    log_low, log_high = math.log(augment.ratio[0]), math.log(augment.ratio[1])
    for attempt in range(10):
        u = draws[4 * attempt : 4 * attempt + 4]
        target = area * (low_scale + (high_scale - low_scale) * u[0])
        aspect = math.exp(log_low + (log_high - log_low) * u[1])
        crop_w = round(math.sqrt(target * aspect))
        crop_h = round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(u[2] * (height - crop_h + 1))
            left = int(u[3] * (width - crop_w + 1))
            return top, left, crop_h, crop_w, flip
    aspect_now = width / height
    if aspect_now < augment.ratio[0]:
        crop_w, crop_h = width, round(width / augment.ratio[0])
    elif aspect_now > augment.ratio[1]:
        crop_h, crop_w = height, round(height * augment.ratio[1])
    else:
        crop_h, crop_w = height, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w, flip


def _dct_scale(crop_h: int, crop_w: int, size: int) -> int:
    """Largest denominator d in (8, 4, 2, 1) with the crop still >= size after 1/d."""
    for denominator in (8, 4, 2):
        if crop_h // denominator >= size and crop_w // denominator >= size:
            return denominator
    return 1


_SCRATCH = threading.local()


def _scratch(nbytes: int) -> np.ndarray:
    """This thread's buffer for decoded crops, at least ``nbytes`` (grown, never shrunk): the
    decoder writes into it instead of returning a fresh block per image."""
    buffer: np.ndarray | None = getattr(_SCRATCH, "buffer", None)
    if buffer is None or buffer.size < nbytes:
        buffer = np.empty(max(nbytes, 1 << 20), np.uint8)
        _SCRATCH.buffer = buffer
    return buffer


def _resize_into(region: np.ndarray, out: np.ndarray, flip: bool) -> None:
    size_h, size_w = out.shape[:2]
    if cv2 is not None:
        shrink = region.shape[0] > 2 * size_h and region.shape[1] > 2 * size_w
        interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        if region.shape[0] == size_h and region.shape[1] == size_w:
            out[...] = region
        else:
            cv2.resize(region, (size_w, size_h), dst=out, interpolation=interpolation)
        if flip:
            cv2.flip(out, 1, dst=out)  # in place; numpy's overlapping [:, ::-1] copy is 50× slower
        return
    from PIL import Image  # pragma: no cover - fallback without OpenCV

    image = Image.fromarray(np.ascontiguousarray(region)).resize((size_w, size_h))
    out[...] = np.asarray(image)[:, ::-1] if flip else np.asarray(image)


def decode_augment_into(
    data: bytes | memoryview, augment: ImageAugment, draws: Sequence[float], out: np.ndarray
) -> None:
    """Decode ``data``, crop, resize and flip into ``out`` (uint8, size × size × 3).

    Raises ``ValueError`` for data that is not a complete, decodable image.
    """
    if is_jpeg(data):
        try:
            height, width = jpeg_size(data)
        except ValueError as error:
            raise ValueError(f"undecodable JPEG header: {error}") from None
        top, left, crop_h, crop_w, flip = crop_box(height, width, augment, draws)
        denominator = _dct_scale(crop_h, crop_w, augment.size)
        if _roijpeg is not None:
            rows = -(-crop_h // denominator)
            scratch = _scratch(rows * (-(-crop_w // denominator) + 34) * 3)
            try:
                rows, cols, stride, shift = _roijpeg.decode_crop_into(
                    scratch, data, top, left, crop_h, crop_w, denominator
                )
            except ValueError as error:
                raise ValueError(str(error)) from None
            region = scratch[: rows * stride * 3].reshape(rows, stride, 3)[:, shift : shift + cols]
            _resize_into(region, out, flip)
            return
        scaled = (-(-height // denominator), -(-width // denominator))
        image = decode_image(data, min_size=None if denominator == 1 else scaled)
        factor_h, factor_w = image.shape[0] / height, image.shape[1] / width
        region = image[
            int(top * factor_h) : max(int(top * factor_h) + 1, int((top + crop_h) * factor_h)),
            int(left * factor_w) : max(int(left * factor_w) + 1, int((left + crop_w) * factor_w)),
        ]
        _resize_into(region, out, flip)
        return
    image = decode_image(data)
    top, left, crop_h, crop_w, flip = crop_box(image.shape[0], image.shape[1], augment, draws)
    _resize_into(image[top : top + crop_h, left : left + crop_w], out, flip)
