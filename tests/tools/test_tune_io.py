"""tools/tune_io.py as a user runs it, in seconds: a bad config in, a tuned copy out — its
comments kept, each changed value marked with what it was, a header with the measured gain —
and a plot of the search. (The search itself is tested on the simulated loader in
tests/tuning; reports/bench_tune.json holds its run against an exhaustive grid.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
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
