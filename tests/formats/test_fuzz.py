"""The shard fuzzer (tools/fuzz_shards.py, tests/support/fuzz.py) in CI: 200 seeded cases
of hostile and damaged tars and Parquet files through indexing, loading and verification,
in a child process so that a crash of the interpreter is a failure here, not the end of the
test run. ``python tools/fuzz_shards.py`` runs the full 1,000 (about 90 s here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.fuzz import PARQUET_MUTATIONS, TAR_MUTATIONS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_damaged_shard_ends_in_success_or_a_typed_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "tools/fuzz_shards.py", "--cases", "200", "--seed", "1", "--quiet",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-4000:]  # not killed by a signal
    report = json.loads((tmp_path / "fuzz_shards.json").read_text())
    assert report["findings"] == [], report["findings"][:5]
    assert done.returncode == 0
    table = report["table"]
    assert sum(sum(counts.values()) for counts in table.values()) == 200
    # Every mutation was tried, and the hostile ones were refused with a typed error.
    assert {f"tar:{m}" for m in TAR_MUTATIONS} | {f"parquet:{m}" for m in PARQUET_MUTATIONS} == set(
        table
    )
    for refused in ("escaping_name", "link_member", "huge_size", "duplicate_key"):
        assert set(table[f"tar:{refused}"]) == {"typed"}, (refused, table[f"tar:{refused}"])
    # Memory stays bounded (image bombs are refused from their headers).
    assert report["peak_rss_mb"] - report["start_rss_mb"] < 512
