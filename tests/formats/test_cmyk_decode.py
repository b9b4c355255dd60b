"""CMYK and YCCK JPEGs (Photoshop's Adobe-inverted convention) and greyscale ones decode to
RGB ``uint8`` in every path: the ROI decoder in C (with and without a restart-marker cut), the
full decode without it, the evaluation centre crop, ``verify --decode``, DALI's CPU decoder
and the loader end to end. The reference is Pillow's ``convert("RGB")``: CMYK fixtures are
written by Pillow (4:4:4, Adobe marker, stored as CMYK), YCCK ones by simplejpeg (libjpeg-
turbo's TurboJPEG turns CMYK pixels into a YCCK JPEG, Adobe transform 2, 4:2:0)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.datasets import photo_jpegs
from dataflow.decode import image
from dataflow.decode.image import ImageAugment, crop_box, decode_augment_into, sample_draws
from dataflow.formats import codec
from dataflow.pipeline import DataConfig, Loader
from dataflow.verify import verify_dataset

# Our CMYK → RGB is Pillow's formula; YCCK → CMYK, the IDCT and the chroma upsampling are
# libjpeg-turbo's in both (measured: identical pixels here). A grey level of slack allows for
# another libjpeg-turbo build under Pillow than under the decoders.
TOLERANCE = 1


def _pillow_rgb(data: bytes, scale: int = 1) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as opened:
        if scale > 1:  # Pillow's draft mode: libjpeg's DCT scaling, as the decoders use
            opened.draft(opened.mode, (-(-opened.width // scale), -(-opened.height // scale)))
        return np.asarray(opened.convert("RGB"))


def _cmyk_pixels(data: bytes) -> np.ndarray:
    return np.ascontiguousarray(
        np.asarray(Image.fromarray(codec.decode_image(data)).convert("CMYK"))
    )


def _as_cmyk(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_cmyk_pixels(data), "CMYK").save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def _as_ycck(data: bytes) -> bytes:
    # TurboJPEG stores the values it is given; Adobe's convention (which every reader
    # assumes) stores ink inverted, as Pillow's writer does for the CMYK fixtures.
    inverted = np.ascontiguousarray(255 - _cmyk_pixels(data))
    return simplejpeg.encode_jpeg(inverted, 92, colorspace="CMYK", colorsubsampling="420")


def _as_grey(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(codec.decode_image(data)).convert("L").save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


CONVERSIONS = {"cmyk": _as_cmyk, "ycck": _as_ycck, "grey": _as_grey}


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [data for _, data in photo_jpegs(4, seed=11, long_side=200)]


@pytest.fixture(scope="module", params=list(CONVERSIONS))
def converted(request: pytest.FixtureRequest, photos: list[bytes]) -> tuple[str, list[bytes]]:
    return request.param, [CONVERSIONS[request.param](data) for data in photos]


def test_the_fixtures_are_what_they_say(
    converted: tuple[str, list[bytes]], photos: list[bytes]
) -> None:
    kind, jpegs = converted
    colorspace = {"cmyk": "CMYK", "ycck": "YCCK", "grey": "Gray"}[kind]
    for data, photo in zip(jpegs, photos, strict=True):
        assert simplejpeg.decode_jpeg_header(data)[2] == colorspace
        with Image.open(io.BytesIO(data)) as opened:
            assert opened.mode == ("L" if kind == "grey" else "CMYK")
            assert kind == "grey" or opened.info["adobe_transform"] == (2 if kind == "ycck" else 0)
        # the same picture as the photo it came from (not, say, all ink)
        original = codec.decode_image(photo).astype(np.int16)
        if kind == "grey":
            original = original.mean(axis=2, keepdims=True)
        assert np.abs(_pillow_rgb(data) - original).mean() < 6


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.abs(got.astype(np.int16) - want).max() <= TOLERANCE


@pytest.mark.skipif(image._roijpeg is None, reason="the C extension is not built")
@pytest.mark.parametrize("restarts", [False, True], ids=["whole", "cut-at-restart"])
def test_roi_crops_equal_pillows_rgb_cropped(
    converted: tuple[str, list[bytes]], restarts: bool
) -> None:
    rng = np.random.default_rng(1)
    for data in converted[1]:
        if restarts:  # a restart marker per row of blocks: crops low enough are cut there
            data = image.add_row_restarts(data)
        height, width = image.jpeg_size(data)
        for denominator in (1, 2):
            reference = _pillow_rgb(data, denominator)
            for _ in range(6):
                crop_h = int(rng.integers(1, height // 2 + 1))
                crop_w = int(rng.integers(1, width + 1))
                top = int(rng.integers(height // 3, height - crop_h + 1))
                left = int(rng.integers(0, width - crop_w + 1))
                scratch = np.empty(1 << 20, np.uint8)
                rows, cols, stride, shift = image._roijpeg.decode_crop_into(
                    scratch, data, top, left, crop_h, crop_w, denominator
                )
                got = scratch[: rows * stride * 3].reshape(rows, stride, 3)[:, shift : shift + cols]
                t, l_ = top // denominator, left // denominator
                assert_close(got, reference[t : t + rows, l_ : l_ + cols])


@pytest.mark.parametrize("extension", [True, False], ids=["roi", "full-decode"])
@pytest.mark.parametrize("train", [True, False], ids=["random-crop", "centre-crop"])
def test_decode_augment_into_gives_pillows_pixels(
    converted: tuple[str, list[bytes]],
    extension: bool,
    train: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if extension and image._roijpeg is None:
        pytest.skip("the C extension is not built")
    if not extension:  # the path taken where the extension could not be built
        monkeypatch.setattr(image, "_roijpeg", None)
    size = 112  # over half the 200-pixel photos: always decoded at full DCT scale, as Pillow
    augment = ImageAugment(size=size, train=train)
    draws = sample_draws(0, 0, np.arange(len(converted[1])))
    out = np.empty((size, size, 3), np.uint8)
    want = np.empty_like(out)
    for data, uniforms in zip(converted[1], draws.tolist(), strict=True):
        decode_augment_into(data, augment, uniforms, out)
        reference = _pillow_rgb(data)
        top, left, crop_h, crop_w, flip = crop_box(*reference.shape[:2], augment, uniforms)
        assert image._dct_scale(crop_h, crop_w, size) == 1
        region = reference[top : top + crop_h, left : left + crop_w]
        image._resize_into(np.ascontiguousarray(region), want, flip)
        assert_close(out, want)


def test_codec_decode_image_gives_pillows_pixels(converted: tuple[str, list[bytes]]) -> None:
    for data in converted[1]:
        assert_close(codec.decode_image(data), _pillow_rgb(data))
        height, width = image.jpeg_size(data)
        half = codec.decode_image(data, min_size=(-(-height // 2), -(-width // 2)))
        assert_close(half, _pillow_rgb(data, 2))
        codec.check_image(data)


def test_dali_cpu_decodes_them_like_pillow(converted: tuple[str, list[bytes]]) -> None:
    pytest.importorskip("nvidia.dali")
    from dataflow.decode.dali import DaliImageDecoder

    jpegs = converted[1]
    size = 64
    decoder = DaliImageDecoder(max_batch=len(jpegs), size=size, threads=1)
    boxes = []
    for data in jpegs:
        assert image.dali_image_size(data) is not None
        height, width = image.jpeg_size(data)
        boxes.append((0, 0, height, width, False))
    got = decoder.decode(jpegs, boxes)
    assert isinstance(got, np.ndarray)
    for decoded, data in zip(got, jpegs, strict=True):
        resized = Image.fromarray(_pillow_rgb(data)).resize((size, size), Image.Resampling.BILINEAR)
        assert np.abs(decoded.astype(np.int16) - np.asarray(resized)).mean() < 2.0


@pytest.fixture(scope="module")
def mixed_dataset(photos: list[bytes], tmp_path_factory: pytest.TempPathFactory) -> str:
    """An image folder of RGB, CMYK, YCCK and grey JPEGs, converted (each one validated)."""
    source = tmp_path_factory.mktemp("mixed-source")
    for kind, convert_one in [("rgb", bytes), *CONVERSIONS.items()]:
        folder = source / kind
        folder.mkdir()
        for number, data in enumerate(photos):
            (folder / f"{number}.jpg").write_bytes(convert_one(data))
    output = tmp_path_factory.mktemp("mixed") / "shards"
    report = convert(ConvertConfig(input=str(source), output=str(output), workers=1),
                     progress=False)  # fmt: skip
    assert report.skipped == 0 and report.samples == 4 * len(photos)
    return str(output)


def test_verify_decode_passes_them(mixed_dataset: str) -> None:
    report = verify_dataset(mixed_dataset, decode=True, progress=False)
    assert report.ok, report.problems


@pytest.mark.parametrize(
    "backend",
    ["cpu", "dali", pytest.param("dali-gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])],
)  # fmt: skip
@pytest.mark.parametrize("pipeline", ["train", "eval"])
def test_the_loader_delivers_every_one(mixed_dataset: str, backend: str, pipeline: str) -> None:
    if backend != "cpu":
        pytest.importorskip("nvidia.dali")
    on_gpu = {"decode_device": "gpu", "device": "cuda"} if backend == "dali-gpu" else {}
    config = DataConfig(url=mixed_dataset, global_batch=8, image_size=32, image_pipeline=pipeline,
                        flip=False, decode_backend=backend.split("-")[0], decode_workers=1,
                        **on_gpu)  # type: ignore[arg-type]  # fmt: skip
    images: dict[str, np.ndarray] = {}
    for batch in Loader(config, rank=0, world_size=1):
        for key, valid, pixels in zip(batch["__key__"], batch["__valid__"], batch["image"],
                                      strict=True):  # fmt: skip
            if valid:
                images[key] = pixels.cpu().numpy()
    assert len(images) == 16 and all(p.dtype == np.uint8 for p in images.values())
    if pipeline == "eval":  # the same centre crop of each photo, whatever its colour space
        for key, pixels in images.items():
            kind, number = key.split("/")
            original = images[f"rgb/{number}"].astype(np.int16)
            if kind == "grey":
                original = original.mean(axis=2, keepdims=True)
                assert (pixels.max(axis=2) - pixels.min(axis=2)).max() <= 1  # grey stays grey
            assert np.abs(pixels - original).mean() < 6, key
