"""The ROI JPEG decoder (``_roijpeg``, behind ``decode_augment_into``) against cropping a full
decode: the same pixels for every crop box, DCT scale and chroma subsampling, written into a
caller's buffer; a buffer too small or a truncated JPEG is refused with ValueError."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg

from dataflow.datasets import photo_jpegs
from dataflow.decode import image
from dataflow.decode.image import ImageAugment, crop_box, decode_augment_into, sample_draws

pytestmark = pytest.mark.skipif(image._roijpeg is None, reason="the C extension is not built")


def full_decode_crop(data: bytes, box: tuple[int, int, int, int], denominator: int) -> np.ndarray:
    top, left, height, width = box
    full = simplejpeg.decode_jpeg(data, colorspace="RGB")
    if denominator > 1:
        h, w = full.shape[:2]
        full = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-h // denominator),
                                      min_width=-(-w // denominator))  # fmt: skip
    t, l_ = top // denominator, left // denominator
    return full[t : t + -(-height // denominator), l_ : l_ + -(-width // denominator)]


@pytest.mark.parametrize("subsampling", ["444", "422", "420"])
def test_the_crop_is_the_full_decode_cropped(subsampling: str) -> None:
    photos = [data for _, data in photo_jpegs(6, seed=3, long_side=520)]
    if subsampling != "420":  # re-encode (4:2:2: fancy upsampling across the crop's edges)
        pixels = [simplejpeg.decode_jpeg(p) for p in photos]
        photos = [simplejpeg.encode_jpeg(p, 90, colorsubsampling=subsampling) for p in pixels]
    rng = np.random.default_rng(0)
    checked = 0
    for data in photos:
        height, width = image.jpeg_size(data)
        for _ in range(12):
            crop_h, crop_w = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            for denominator in (1, 2):
                scratch = np.empty(4 << 20, np.uint8)
                rows, cols, stride, shift = image._roijpeg.decode_crop_into(
                    scratch, data, top, left, crop_h, crop_w, denominator
                )
                got = scratch[: rows * stride * 3].reshape(rows, stride, 3)[:, shift : shift + cols]
                want = full_decode_crop(data, (top, left, crop_h, crop_w), denominator)
                assert got.shape == want.shape
                np.testing.assert_array_equal(got, want)
                checked += 1
    assert checked == 6 * 12 * 2


def test_decode_augment_into_matches_the_full_decode_resized() -> None:
    augment = ImageAugment(size=64)
    photos = [data for _, data in photo_jpegs(8, seed=5)]
    draws = sample_draws(0, 0, np.arange(len(photos)))
    out = np.empty((64, 64, 3), np.uint8)
    want = np.empty_like(out)
    for data, uniforms in zip(photos, draws.tolist(), strict=True):
        decode_augment_into(data, augment, uniforms, out)
        height, width = image.jpeg_size(data)
        top, left, crop_h, crop_w, flip = crop_box(height, width, augment, uniforms)
        denominator = image._dct_scale(crop_h, crop_w, 64)
        region = full_decode_crop(data, (top, left, crop_h, crop_w), denominator)
        image._resize_into(np.ascontiguousarray(region), want, flip)
        np.testing.assert_array_equal(out, want)


def test_a_buffer_too_small_or_a_truncated_jpeg_is_refused() -> None:
    (_, data), = photo_jpegs(1, seed=7)  # fmt: skip
    height, width = image.jpeg_size(data)
    with pytest.raises(ValueError, match="too small"):
        image._roijpeg.decode_crop_into(np.empty(100, np.uint8), data, 0, 0, height, width, 1)
    with pytest.raises(ValueError, match="undecodable JPEG"):
        image._roijpeg.decode_crop_into(np.empty(4 << 20, np.uint8), data[: len(data) // 2],
                                        0, 0, height, width, 1)  # fmt: skip
    with pytest.raises(ValueError, match="bad crop box"):
        image._roijpeg.decode_crop_into(np.empty(16, np.uint8), data, -1, 0, 1, 1, 1)
    with pytest.raises(TypeError):  # read-only memory is not a place to write pixels
        image._roijpeg.decode_crop_into(bytes(4 << 20), data, 0, 0, height, width, 1)
