"""tools/tune_io.py as a user runs it, in seconds: a bad config in, a tuned copy out — its
comments kept, each changed value marked with what it was, a header with the measured gain —
and a plot of the search. (The search itself is tested on the simulated loader in
tests/tuning; reports/bench_tune.json holds its run against an exhaustive grid.)"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import tomllib
from test_cli import tool

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from trainer.config import load


@pytest.mark.timeout(240)
def test_tune_io_writes_a_tuned_copy_of_the_config(photo_folder: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    convert(ConvertConfig(input=str(photo_folder), output=str(shards), max_shard_samples=10,
                          workers=1), progress=False)  # fmt: skip
    config = tmp_path / "bad.toml"
    config.write_text(
        "# a deliberately bad loader config\n[data]\n"
        f'url = "{shards}"\nglobal_batch = 8\nimage_size = 64\n'
        "decode_workers = 1        # one decode worker\nreadahead_shards = 0\n"
    )
    tuned = tmp_path / "tuned.toml"
    done = tool("tune_io.py", "--config", str(config), "--budget", "8", "--trial-seconds",
                "0.4", "--out", str(tuned), "--memory-budget", "2GiB")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wrote {tuned}" in done.stdout
    text = tuned.read_text()
    header = text.splitlines()[0]
    assert re.match(r"# Tuned by tools/tune_io.py on .*: [\d,]+ → [\d,]+ samples/s \(\d+\.\d\d×\), "
                    r"\d+ settings in \d+ s", header), header  # fmt: skip
    assert "# a deliberately bad loader config" in text
    changed = [line for line in text.splitlines() if "# tuned, was" in line]
    assert text.splitlines()[1].startswith("# Changed: ")
    if "Changed: nothing" not in text:
        assert changed
    for line in changed:
        key = line.split("=")[0].strip()
        assert f"data.{key}" in text.splitlines()[1] or f"storage.{key}" in text.splitlines()[1]
    # The tuned copy is a valid config whose other settings are the input's.
    tuned_config = load(tuned)
    assert tuned_config.data.url == str(shards) and tuned_config.data.image_size == 64
    assert (tmp_path / "tuned.png").stat().st_size > 10_000


def test_rewrite_marks_changed_keys_and_adds_missing_keys_and_sections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Appended, not prepended: tools/inspect.py must not shadow the standard library's.
    monkeypatch.setattr(sys, "path", [*sys.path, str(Path(__file__).parents[2] / "tools")])
    rewrite = importlib.import_module("tune_io").rewrite
    source = '# mine\n[data]\nurl = "s3://b/x"\ndecode_workers = 1   # one worker\n'
    text = rewrite(source, {"data.decode_workers": 4, "data.readahead_shards": 2,
                            "storage.connections": 8, "storage.range_size": 16 << 20},
                   {"data.decode_workers": 1, "data.readahead_shards": 0,
                    "storage.connections": 1, "storage.range_size": 8 << 20})  # fmt: skip
    assert text.splitlines() == [
        "# mine",
        "[data]",
        "readahead_shards = 2  # tuned, was 0",
        'url = "s3://b/x"',
        "decode_workers = 4  # tuned, was 1 — one worker",
        "",
        "[storage]",
        'range_size = "16MiB"  # tuned, was "8MiB"',
        "connections = 8  # tuned, was 1",
    ]
    parsed = tomllib.loads(text)
    assert parsed["storage"] == {"connections": 8, "range_size": "16MiB"}


@pytest.fixture
def photo_shards(photo_folder: Path, tmp_path: Path) -> Path:
    """The 60 photos as local tar shards of 10."""
    shards = tmp_path / "shards"
    convert(ConvertConfig(input=str(photo_folder), output=str(shards), max_shard_samples=10,
                          workers=1), progress=False)  # fmt: skip
    return shards


@pytest.mark.timeout(240)
def test_tune_io_writes_the_config_it_measured_command_line_overrides_included(
    photo_shards: Path, tmp_path: Path
) -> None:
    config = tmp_path / "base.toml"
    config.write_text("[data]\nimage_size = 64\ndecode_workers = 1\n")
    tuned = tmp_path / "tuned.toml"
    done = tool("tune_io.py", "--config", str(config), f"--data.url={photo_shards}",
                "--data.global_batch=8", "--budget", "3", "--trial-seconds", "0.3",
                "--out", str(tuned), "--quiet")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    text = tuned.read_text()
    # The settings were measured with the overrides: the tuned file must hold them too.
    tuned_config = load(tuned)
    assert tuned_config.data.url == str(photo_shards), text
    assert tuned_config.data.global_batch == 8, text
    assert tuned_config.data.image_size == 64
    assert f'url = "{photo_shards}"  # set on the command line' in text.splitlines()


@pytest.mark.timeout(120)
def test_tune_io_stops_with_one_line_when_the_dataset_is_smaller_than_a_batch(
    photo_shards: Path, tmp_path: Path
) -> None:
    done = tool("tune_io.py", f"--data.url={photo_shards}", "--data.global_batch=128",
                "--data.image_size=64", "--budget", "3", "--trial-seconds", "0.3",
                "--out", str(tmp_path / "tuned.toml"), "--quiet", timeout=100)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.global_batch" in lines[0], done.stderr[-3000:]
    assert not (tmp_path / "tuned.toml").exists()
