"""Restart markers at every row of blocks: the lossless copy conversion makes
(``add_row_restarts``) and the ROI decoder's cut of the stream above the crop.

The copy must decode to the source's pixels and keep its metadata; a crop of the copy must
equal the full decode's crop for every box, DCT scale and sampling, and must not read the
rows above it (shown by damaging them); a stream whose markers are not where its header
says is decoded whole, as before; and no damage anywhere may crash the decoder.
"""

from __future__ import annotations

import contextlib
import io
import random

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from dataflow.datasets import photo_jpegs
from dataflow.decode import image
from dataflow.decode.image import ImageAugment, add_row_restarts, decode_augment_into, sample_draws

pytestmark = pytest.mark.skipif(image._roijpeg is None, reason="the C extension is not built")


def sources() -> dict[str, bytes]:
    """Real photos in the encodings a dataset holds: 4:2:0, 4:2:2, 4:4:4, greyscale, and a
    progressive one with EXIF and an ICC profile; sizes not multiples of the block row."""
    photos = [data for _, data in photo_jpegs(3, seed=11, long_side=517)]
    pixels = [simplejpeg.decode_jpeg(p) for p in photos]
    found = {f"photo-{n}": p for n, p in enumerate(photos)}
    for sampling in ("422", "444"):
        found[sampling] = simplejpeg.encode_jpeg(pixels[0], 88, colorsubsampling=sampling)
    grey = pixels[1].mean(axis=2, keepdims=True).astype(np.uint8)
    found["grey"] = simplejpeg.encode_jpeg(grey, 85, colorspace="GRAY")
    exif = Image.Exif()
    exif[0x010F] = "shardflow test camera"
    out = io.BytesIO()
    icc = b"\x00" * 128 + b"test icc"
    Image.fromarray(pixels[2][:333]).save(out, format="JPEG", quality=90, progressive=True,
                                          exif=exif, icc_profile=icc)  # fmt: skip
    found["progressive+exif+icc"] = out.getvalue()
    return found


def crop(data: bytes, top: int, left: int, height: int, width: int, denominator: int) -> np.ndarray:
    scratch = np.empty(4 << 20, np.uint8)
    rows, cols, stride, shift = image._roijpeg.decode_crop_into(
        scratch, data, top, left, height, width, denominator
    )
    return scratch[: rows * stride * 3].reshape(rows, stride, 3)[:, shift : shift + cols].copy()


def mcu_width(data: bytes) -> int:
    """Pixels per MCU across, from the frame header: 8 × the largest horizontal sampling
    factor, or 8 for one component (its scan is not interleaved)."""
    at = data.index(b"\xff\xc0") + 4
    components = data[at + 5]
    factors = [data[at + 7 + 3 * c] >> 4 for c in range(components)]
    return 8 if components == 1 else 8 * max(factors)


def restart_interval(data: bytes) -> int:
    at = data.find(b"\xff\xdd\x00\x04")
    return -1 if at < 0 else int.from_bytes(data[at + 4 : at + 6], "big")


def test_the_copy_decodes_to_the_same_pixels_and_keeps_the_metadata() -> None:
    for name, data in sources().items():
        copy = add_row_restarts(data)
        height, width = image.jpeg_size(data)
        assert restart_interval(copy) == -(-width // mcu_width(copy)), name  # one per row
        assert image.jpeg_size(copy) == (height, width)
        np.testing.assert_array_equal(simplejpeg.decode_jpeg(copy), simplejpeg.decode_jpeg(data))
        assert add_row_restarts(copy) == copy, name  # already has them: unchanged
    original = Image.open(io.BytesIO(sources()["progressive+exif+icc"]))
    copied = Image.open(io.BytesIO(add_row_restarts(sources()["progressive+exif+icc"])))
    assert copied.getexif()[0x010F] == "shardflow test camera"
    assert copied.info["icc_profile"] == original.info["icc_profile"]
    assert original.info.get("progressive") and not copied.info.get("progressive")


def test_a_crop_of_the_copy_is_the_full_decode_cropped() -> None:
    rng = np.random.default_rng(1)
    checked = 0
    for name, data in sources().items():
        copy = add_row_restarts(data)
        height, width = image.jpeg_size(data)
        for denominator in (1, 2, 4, 8):
            whole = simplejpeg.decode_jpeg(
                data, colorspace="RGB", min_height=-(-height // denominator),
                min_width=-(-width // denominator),
            )  # fmt: skip
            for _ in range(10):
                crop_h = int(rng.integers(1, height // 2 + 1))
                crop_w = int(rng.integers(1, width + 1))
                top = int(rng.integers(height // 3, height - crop_h + 1))  # mostly cut above
                left = int(rng.integers(0, width - crop_w + 1))
                got = crop(copy, top, left, crop_h, crop_w, denominator)
                t, l_ = top // denominator, left // denominator
                want = whole[t : t + -(-crop_h // denominator), l_ : l_ + -(-crop_w // denominator)]
                assert got.shape == want.shape, (name, denominator)
                np.testing.assert_array_equal(got, want, err_msg=f"{name} 1/{denominator}")
                checked += 1
    assert checked == len(sources()) * 4 * 10


def test_the_rows_above_the_crop_are_not_read() -> None:
    (_, data), = photo_jpegs(1, seed=12, long_side=512)  # fmt: skip
    copy = bytearray(add_row_restarts(data))
    height, width = image.jpeg_size(data)
    scan = copy.index(b"\xff\xda")
    scan += 2 + int.from_bytes(copy[scan + 2 : scan + 4], "big")
    first_marker = copy.index(b"\xff\xd0", scan)  # the end of the first MCU row
    copy[scan:first_marker] = bytes(len(copy[scan:first_marker]))  # its Huffman codes destroyed
    damaged = bytes(copy)
    bottom = (height // 2, 0, height - height // 2, width)
    np.testing.assert_array_equal(crop(damaged, *bottom, 1), crop(data, *bottom, 1))
    with pytest.raises(ValueError, match="undecodable JPEG"):
        crop(damaged, 0, 0, 16, width, 1)


def test_a_stream_whose_markers_do_not_match_its_header_is_decoded_whole() -> None:
    pixels = simplejpeg.decode_jpeg(photo_jpegs(1, seed=13, long_side=400)[0][1])
    height, width = pixels.shape[:2]
    every_three_blocks = io.BytesIO()  # intervals that do not start every row: no cut
    Image.fromarray(pixels).save(every_three_blocks, format="JPEG", restart_marker_blocks=3)
    data = every_three_blocks.getvalue()
    assert restart_interval(data) == 3
    box = (height - 40, 8, 30, width - 16)
    np.testing.assert_array_equal(crop(data, *box, 1), simplejpeg.decode_jpeg(data)[
        box[0] : box[0] + box[2], box[1] : box[1] + box[3]])  # fmt: skip
    copy = bytearray(add_row_restarts(data))  # now one per row; then one marker misnumbered
    assert restart_interval(bytes(copy)) == -(-width // mcu_width(bytes(copy)))
    markers = [n for n in range(len(copy) - 1) if copy[n] == 0xFF and 0xD0 <= copy[n + 1] <= 0xD7]
    copy[markers[2] + 1] = 0xD0 + (copy[markers[2] + 1] + 1) % 8
    with pytest.raises(ValueError, match="undecodable JPEG"):  # libjpeg's own complaint
        crop(bytes(copy), *box, 1)


def test_damaged_restart_jpegs_never_crash_the_decoder() -> None:
    """A fuzzer in miniature: 1,500 damaged copies, each through the crop the loader would
    take and the conversion copy; the outcome must be pixels or ValueError."""
    photos = [add_row_restarts(data) for _, data in photo_jpegs(5, seed=14, long_side=300)]
    rng = random.Random(0)
    augment = ImageAugment(size=32, scale=(0.05, 0.3))
    out = np.empty((32, 32, 3), np.uint8)
    outcomes = {"pixels": 0, "ValueError": 0}
    for case in range(1500):
        data = bytearray(rng.choice(photos))
        scan = data.index(b"\xff\xda")
        kind = case % 5
        if kind == 0:  # bytes flipped in the coded data
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(scan, len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1:  # a marker made up, renumbered or removed
            at = rng.randrange(scan, len(data) - 1)
            data[at : at + 2] = bytes(
                [0xFF, rng.choice([0xD0 + rng.randrange(8), 0x00, 0xD9, 0xDD])]
            )
        elif kind == 2:  # the header's fields: DRI, SOF height and sampling, SOS count
            at = rng.randrange(2, scan + 10)
            data[at] = rng.randrange(256)
        elif kind == 3:
            del data[rng.randrange(scan, len(data)) :]
        else:  # a run of 0xFF fill bytes or zeros
            at = rng.randrange(scan, len(data))
            data[at:at] = bytes([rng.choice([0xFF, 0x00])]) * rng.randint(1, 40)
        draws = sample_draws(case, 0, np.arange(1))[0].tolist()
        try:
            decode_augment_into(bytes(data), augment, draws, out)
            outcomes["pixels"] += 1
        except ValueError:
            outcomes["ValueError"] += 1
        with contextlib.suppress(ValueError):
            add_row_restarts(bytes(data))
    assert outcomes["pixels"] > 100 and outcomes["ValueError"] > 100, outcomes
