"""Fields decoded by kind (dataflow/pipeline/fields.py) and the image pipelines, through the
loader on shards written with ``ShardWriter``: CMYK, greyscale, 16-bit and RGBA images and
WebP under every ``image_pipeline``; str, JSON, npy, int, wav and flac fields; registered
decoders and their precedence; a decoder that raises follows on_bad_sample."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from dataflow import ShardWriter
from dataflow.datasets import photo_jpegs
from dataflow.errors import BadSampleError
from dataflow.formats import codec
from dataflow.pipeline import DataConfig, Loader
from dataflow.pipeline.fields import (
    FieldDecoders,
    decode_audio,
    register_decoder,
    unregister_decoder,
)

from . import user_transforms

RATE = 8000
HEIGHT, WIDTH = 48, 64


def _encode(image: Image.Image, format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def _audio(samples: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, RATE, format=format, subtype="PCM_16")
    return buffer.getvalue()


def _images() -> dict[str, tuple[str, bytes, np.ndarray]]:
    """key → (extension, encoded bytes, the RGB uint8 pixels it must decode to)."""
    photo = next(iter(photo_jpegs(1, seed=3, long_side=200)))[1]
    rgb = np.asarray(Image.open(io.BytesIO(photo)).convert("RGB"))[:HEIGHT, :WIDTH].copy()
    cmyk = _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=92)
    grey = _encode(Image.fromarray(rgb).convert("L"), "JPEG", quality=92)
    levels = (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) * 21).astype(np.uint16)
    rgba = np.concatenate([rgb, np.full((HEIGHT, WIDTH, 1), 40, np.uint8)], axis=2)
    lossless_webp = _encode(Image.fromarray(rgb), "WEBP", lossless=True)

    def pillow_rgb(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    high_bytes = np.repeat((levels >> 8).astype(np.uint8)[..., None], 3, axis=2)
    return {
        "rgb": ("png", _encode(Image.fromarray(rgb), "PNG"), rgb),
        "cmyk": ("jpg", cmyk, pillow_rgb(cmyk)),
        "grey": ("jpg", grey, pillow_rgb(grey)),
        "png16": ("png", _encode(Image.fromarray(levels), "PNG"), high_bytes),
        "rgba": ("png", _encode(Image.fromarray(rgba), "PNG"), rgb),  # alpha dropped
        "webp": ("webp", lossless_webp, rgb),
    }


IMAGES = _images()
SIGNAL = np.sin(np.arange(400) / 7.0).astype(np.float32) * 0.5
STEREO = np.stack([SIGNAL, -SIGNAL], axis=1)


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Six images of six kinds, each sample also holding one field of every other kind."""
    output = str(tmp_path_factory.mktemp("kinds") / "ds")
    with ShardWriter(output, max_shard_samples=4) as writer:
        for number, (key, (extension, data, _)) in enumerate(IMAGES.items()):
            writer.write({
                "__key__": key, extension: data, "cls": number, "txt": f"caption {key}",
                "json": {"key": key, "n": [number]}, "npy": np.full((2, 3), number, np.int32),
                "wav": _audio(SIGNAL, "WAV"), "flac": _audio(STEREO, "FLAC"),
                "bin": bytes([number]) * 3,
            })  # fmt: skip
    return output


def loader(url: str, **options: Any) -> Loader:
    given = {k: options.pop(k) for k in ("collate", "sample_transform") if k in options}
    config = DataConfig(url=url, global_batch=6, image_size=32, shuffle=False, flip=False,
                        decode_workers=2, **options)  # fmt: skip
    return Loader(config, rank=0, world_size=1, **given)


def samples_of(url: str, **options: Any) -> dict[str, dict[str, Any]]:
    """key → the sample dict a transform would see."""
    run = loader(url, collate=user_transforms.samples_as_batch, **options)
    batches = list(run)
    run.close()
    return {s["__key__"]: s for b in batches for s in b["samples"]}


@pytest.mark.parametrize("pipeline", ["train", "eval", "decode", "none"])
def test_every_image_kind_under_every_pipeline(every_kind: str, pipeline: str) -> None:
    samples = samples_of(every_kind, image_pipeline=pipeline)
    assert sorted(samples) == sorted(IMAGES)
    for key, (_, data, pixels) in IMAGES.items():
        image = samples[key]["image"]
        if pipeline == "none":
            assert image == data, key
            continue
        assert isinstance(image, np.ndarray) and image.dtype == np.uint8, key
        if pipeline == "decode":
            assert image.shape == (HEIGHT, WIDTH, 3), key
            assert np.abs(image.astype(int) - pixels).max() <= 1, key  # libjpeg builds: ±1
        else:
            assert image.shape == (32, 32, 3), key
    if pipeline == "eval":  # the same centre crop of pixels that decode alike
        reference = samples["rgb"]["image"]
        assert np.array_equal(samples["rgba"]["image"], reference)  # alpha dropped
        assert np.array_equal(samples["webp"]["image"], reference)
        cmyk = samples["cmyk"]["image"].astype(int)  # a lossy JPEG of the same pixels
        assert np.abs(cmyk - reference).mean() < 4


def test_the_fast_path_batch_is_the_collated_samples(every_kind: str) -> None:
    """Without a transform, the batch is default_collate of the samples a transform sees."""
    for pipeline in ("train", "eval", "decode", "none"):
        fast = loader(every_kind, image_pipeline=pipeline)
        batches = list(fast)
        fast.close()
        via_transform = loader(every_kind, image_pipeline=pipeline,
                               sample_transform=user_transforms.identity)  # fmt: skip
        again = list(via_transform)
        via_transform.close()
        assert len(batches) == len(again) == 1
        want, got = batches[0], again[0]
        assert sorted(want) == sorted(got), pipeline
        for name, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, got[name]), (pipeline, name)
            elif name in ("wav", "flac"):
                assert all(
                    np.array_equal(a[0], b[0]) for a, b in zip(value, got[name], strict=True)
                )
            elif pipeline == "decode" and name == "image":
                assert all(np.array_equal(a, b) for a, b in zip(value, got[name], strict=True))
            else:
                assert value == got[name], (pipeline, name)


def test_fields_are_decoded_by_kind(every_kind: str) -> None:
    run = loader(every_kind)
    batch = next(iter(run))
    run.close()
    keys = batch["__key__"]
    numbers = {key: number for number, key in enumerate(IMAGES)}
    assert batch["image"].shape == (6, 32, 32, 3) and batch["image"].dtype == torch.uint8
    assert batch["label"].tolist() == [numbers[k] for k in keys]
    assert batch["txt"] == [f"caption {k}" for k in keys]
    assert batch["json"] == [{"key": k, "n": [numbers[k]]} for k in keys]
    assert batch["npy"].shape == (6, 2, 3) and batch["npy"].dtype == torch.int32  # stacked
    assert batch["npy"][:, 0, 0].tolist() == [numbers[k] for k in keys]
    assert batch["bin"] == [bytes([numbers[k]]) * 3 for k in keys]
    for mono, rate in batch["wav"]:
        assert rate == RATE and mono.dtype == np.float32 and mono.shape == SIGNAL.shape
        assert np.abs(mono - SIGNAL).max() <= 1 / 32768  # PCM_16
    for stereo, rate in batch["flac"]:
        assert rate == RATE and stereo.shape == STEREO.shape
        assert np.abs(stereo - STEREO).max() <= 1 / 32768


@pytest.fixture
def registry() -> Iterator[list[str]]:
    """Names a test registers; unregistered afterwards (the registry is process-wide)."""
    names: list[str] = []
    yield names
    for name in names:
        unregister_decoder(name)


def test_a_registered_decoder_and_its_precedence(every_kind: str, registry: list[str]) -> None:
    registry += ["bytes", "bin", "json", "image", "png"]
    register_decoder("bytes", lambda data: ("by kind", len(data)))
    register_decoder(".BIN", lambda data: ("by extension", data[:1]))  # names are normalised
    register_decoder("json", lambda data: "json replaced")
    register_decoder("image", lambda data: "image by kind")
    register_decoder("png", lambda data: "png by extension")
    samples = samples_of(every_kind, image_pipeline="decode")
    assert samples["rgb"]["bin"] == ("by extension", b"\x00")  # extension before kind
    assert samples["rgb"]["wav"] == ("by kind", len(_audio(SIGNAL, "WAV")))  # before built-in
    assert samples["rgb"]["json"] == "json replaced"
    assert samples["rgb"]["image"] == "png by extension"
    assert samples["cmyk"]["image"] == "image by kind"
    # "train" crops while decoding: registered image decoders do not apply.
    cropped = samples_of(every_kind)
    assert all(s["image"].shape == (32, 32, 3) for s in cropped.values())


def test_a_decoder_that_raises_follows_the_policy(every_kind: str, registry: list[str]) -> None:
    def refuse_number_two(data: bytes) -> bytes:
        if data == b"\x02" * 3:
            raise RuntimeError("this decoder refuses sample 2")
        return data

    registry.append("bin")
    register_decoder("bin", refuse_number_two)
    with pytest.raises(
        BadSampleError,
        match=r"sample 'grey'.*registered for 'bin' \(.*refuse_number_two\) "
        r"raised RuntimeError: this decoder refuses sample 2",
    ) as caught:
        list(loader(every_kind))
    assert caught.value.shard is not None and caught.value.shard.endswith(".tar")
    skipping = loader(every_kind, on_bad_sample="skip", max_skip_fraction=0.5, drop_last=False)
    keys = [k for b in skipping for k in b["__key__"]]
    assert "grey" not in keys and len(set(keys)) == 5
    assert [key for _, key, _ in skipping.state_dict()["skipped"]] == ["grey"]


def test_decoder_arguments_are_checked(registry: list[str]) -> None:
    with pytest.raises(ValueError, match="needs an extension or a kind"):
        register_decoder(" ", bytes)
    with pytest.raises(TypeError, match="is not callable"):
        register_decoder("bin", "not a function")  # type: ignore[arg-type]


def test_audio_and_images_decode_without_the_loader(tmp_path: Path) -> None:
    samples, rate = decode_audio(_audio(STEREO, "FLAC"))
    assert rate == RATE and samples.dtype == np.float32 and samples.shape == (400, 2)
    with pytest.raises(ValueError, match="undecodable audio"):
        decode_audio(b"RIFF but not audio")
    decoders = FieldDecoders([("txt", "str"), ("wav", "bytes"), ("png", "image")])
    assert decoders.decode("txt", memoryview(b"caption")) == "caption"
    assert decoders.decode_cell("txt", "already a str") == "already a str"
    _, png, pixels = IMAGES["png16"]
    assert np.array_equal(decoders.decode_image("png", png, "decode"), pixels)
    assert decoders.decode_image("png", png, "none") == png
    assert np.array_equal(codec.decode_image(png), pixels)
