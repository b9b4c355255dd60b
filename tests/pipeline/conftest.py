"""Datasets for the loader tests, converted once for the package (read-only: tests that
damage data make their own copy)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dataflow.formats.codec import decode_image

from .loader_support import CorruptDataset, convert_folder, flip_bytes


@pytest.fixture(scope="package")
def digits(digits_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """1,797 PNG digits in 18 shards of 99-100."""
    return convert_folder(
        digits_folder, tmp_path_factory.mktemp("digits-data") / "ds", max_shard_samples=100
    )


@pytest.fixture(scope="package")
def photos(photo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """60 JPEG photos in 9 shards of 6 or 7: shard sizes differ."""
    return convert_folder(
        photo_folder, tmp_path_factory.mktemp("photo-data") / "ds", max_shard_samples=7
    )


@pytest.fixture(scope="package")
def corrupt_photos(photo_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> CorruptDataset:
    """The photos with 64 bytes flipped in one JPEG's header (same size), converted without
    validation, so the damage reaches the loader.

    The header, not the middle of the file: the decoder decodes only the crop, so damage in
    rows below a crop goes unnoticed (a documented trade-off), while a broken header fails
    every crop of every epoch.
    """
    source = tmp_path_factory.mktemp("corrupt-photos") / "photos"
    shutil.copytree(photo_folder, source)
    victim = sorted(source.rglob("*.jpg"))[7]
    original = victim.read_bytes()
    damaged = flip_bytes(original, 4, 64)  # keeps the FF D8 FF signature, breaks the markers
    with pytest.raises(ValueError):
        decode_image(damaged)  # the damage is real, not something libjpeg shrugs off
    victim.write_bytes(damaged)
    url = convert_folder(source, source.parent / "ds", max_shard_samples=7, validate_images="none")
    return CorruptDataset(url=url, victim=victim.relative_to(source).with_suffix("").as_posix())
