"""Field codecs: byte round trips per kind, pickle only on request, and strict image checks
that catch truncated and random data."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dataflow.datasets import photo_jpegs
from dataflow.formats import codec
from dataflow.formats.codec import PickleRefusedError


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return photo_jpegs(1, seed=7, long_side=96)[0][1]


@pytest.fixture(scope="module")
def png(jpeg: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(codec.decode_image(jpeg)).save(buffer, format="PNG")
    return buffer.getvalue()


ROUND_TRIPS: list[tuple[str, Any, bytes | None]] = [
    ("bytes", b"\x00\xffraw", b"\x00\xffraw"),
    ("int", 7, b"7"),
    ("int", -(2**70), str(-(2**70)).encode()),
    ("float", 0.1, b"0.1"),
    ("float", float("inf"), b"inf"),
    ("str", "naïve ☕", "naïve ☕".encode()),
    ("json", {"a": [1, 2.5, None], "é": "ü"}, '{"a":[1,2.5,null],"é":"ü"}'.encode()),
    ("tokens", np.array([0, -5, 2**40], np.int64), None),
    ("tokens", np.array([], np.uint16), None),
    ("npy", np.arange(12, dtype=np.float32).reshape(3, 4), None),
    ("npy", np.array(3.5), None),
]


@pytest.mark.parametrize(("kind", "value", "stored"), ROUND_TRIPS)
def test_round_trip(kind: str, value: Any, stored: bytes | None) -> None:
    data = codec.encode(kind, value)
    if stored is not None:
        assert data == stored
    for source in (data, memoryview(data)):
        decoded = codec.decode(kind, source)
        if isinstance(value, np.ndarray):
            assert decoded.dtype == value.dtype and decoded.shape == value.shape
            np.testing.assert_array_equal(decoded, value)
        else:
            assert decoded == value and type(decoded) is type(value)


def test_image_round_trip(jpeg: bytes) -> None:
    assert codec.decode("image", codec.encode("image", jpeg)) == jpeg
    with pytest.raises(TypeError, match="needs bytes"):
        codec.encode("image", np.zeros((2, 2, 3), np.uint8))


def test_encoded_passes_through() -> None:
    stored = codec.Encoded(b"42")
    assert codec.encode("int", stored) == b"42"
    assert type(codec.encode("int", stored)) is bytes


def test_encode_refusals() -> None:
    with pytest.raises(TypeError, match="1-D integer"):
        codec.encode("tokens", np.zeros((2, 2), np.int64))
    with pytest.raises(TypeError, match="1-D integer"):
        codec.encode("tokens", np.array([1.0]))
    with pytest.raises(TypeError, match="pickle"):
        codec.encode("npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="unknown field kind"):
        codec.encode("yaml", 1)
    with pytest.raises(ValueError, match="unknown field kind"):
        codec.decode("yaml", b"1")
    with pytest.raises(ValueError):
        codec.decode("int", b"  ")


def test_pickle_only_when_allowed() -> None:
    value = {"tuple": (1, 2), "set": {3}}
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        codec.encode("pickle", value)
    data = codec.encode("pickle", value, allow_pickle=True)
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        codec.decode("pickle", data)
    assert codec.decode("pickle", data, allow_pickle=True) == value
    # Bytes copied from an existing shard are refused the same way.
    with pytest.raises(PickleRefusedError):
        codec.encode("pickle", codec.Encoded(data))
    assert codec.encode("pickle", codec.Encoded(data), allow_pickle=True) == data
    assert issubclass(PickleRefusedError, ValueError)


def test_npy_with_object_array_is_not_unpickled() -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for kind in ("npy", "tokens"):
        with pytest.raises(ValueError, match="allow_pickle"):
            codec.decode(kind, buffer.getvalue())


def test_decode_image_shapes(jpeg: bytes, png: bytes) -> None:
    image = codec.decode_image(jpeg)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert max(image.shape[:2]) == 96
    np.testing.assert_array_equal(codec.decode_image(png), image)
    small = codec.decode_image(jpeg, min_size=(10, 10))
    assert 10 <= small.shape[0] < image.shape[0] and 10 <= small.shape[1] < image.shape[1]
    gray = io.BytesIO()
    Image.fromarray(image[:, :, 0]).save(gray, format="PNG")
    assert codec.decode_image(gray.getvalue()).shape == image.shape


def test_check_image_accepts_real_images(jpeg: bytes, png: bytes) -> None:
    codec.check_image(jpeg)
    codec.check_image(png)
    codec.check_image(memoryview(jpeg))


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_jpeg_refused(jpeg: bytes, cut: float) -> None:
    truncated = jpeg[: int(len(jpeg) * cut)]
    with pytest.raises(ValueError, match="undecodable JPEG"):
        codec.decode_image(truncated)
    with pytest.raises(ValueError):
        codec.check_image(truncated)


def test_truncated_png_refused(png: bytes) -> None:
    with pytest.raises(ValueError, match="undecodable image"):
        codec.decode_image(png[: len(png) // 2])


def test_random_bytes_refused() -> None:
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for data in (noise, b"\xff\xd8\xff" + noise, b"", b"\x89PNG\r\n\x1a\n" + noise):
        with pytest.raises(ValueError):
            codec.decode_image(data)
        with pytest.raises(ValueError):
            codec.check_image(data)


@pytest.mark.parametrize(
    ("extension", "kind"),
    [
        ("jpg", "image"),
        ("left.PNG", "image"),
        ("cls", "int"),
        ("txt", "str"),
        ("json", "json"),
        ("seg.npy", "npy"),
        ("pyd", "pickle"),
        ("weird", "bytes"),
    ],
)
def test_kind_for_extension(extension: str, kind: str) -> None:
    assert codec.kind_for_extension(extension) == kind


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (True, "int"),
        (3, "int"),
        (1.5, "float"),
        ("s", "str"),
        (b"b", "bytes"),
        (np.arange(3), "tokens"),
        (np.ones((2, 2)), "npy"),
        ([1, 2], "tokens"),
        ([1, True], "json"),
        ([], "json"),
        ({"a": 1}, "json"),
    ],
)
def test_kind_for_value(value: Any, kind: str) -> None:
    assert codec.kind_for_value(value) == kind


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(jpeg: bytes) -> None:
    """A few hundred bytes of header must not allocate gigabytes (found by the shard fuzzer:
    a 30,000 × 30,000 PNG hit PIL's bomb error, a 65,500² JPEG took 12 GB and 30 s)."""
    from support.fuzz import _jpeg_with_size, _png_bomb

    over_ours = (_png_bomb(10_000, 10_000), _jpeg_with_size(jpeg, 65_500, 65_500))
    over_pils = (_png_bomb(30_000, 30_000), _png_bomb(2**31 - 1, 1))
    for data in (*over_ours, *over_pils, _jpeg_with_size(jpeg, 0, 64)):
        for decode in (codec.decode_image, codec.check_image):
            with pytest.raises(ValueError) as caught:
                decode(data)
            if data in over_ours:
                assert "over the 67,108,864-pixel limit" in str(caught.value)


def test_json_nested_too_deeply_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        codec.decode("json", b"[" * 200_000)
