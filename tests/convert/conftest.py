"""Fixtures for conversion tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from .gates import GatedFolder, gated_copy


@pytest.fixture
def gated_digits(digits_folder: Path, tmp_path: Path) -> GatedFolder:
    """See gates.GatedFolder."""
    return gated_copy(digits_folder, tmp_path / "gated")
