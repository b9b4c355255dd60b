"""tools/bench_large_batch.py end to end on one epoch: three real trainer runs, the large ones
taking factor× fewer steps, every run evaluated on the held-out digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_large_batch_trains_and_reports_three_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "tools/bench_large_batch.py", "--epochs", "1", "--factor", "2",
         "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "out" / "bench_large_batch.json").read_text())
    runs = report["results"]
    assert list(runs) == ["small", "large LAMB", "large AdamW"]
    # 1,438 training digits: 44 batches of 32, 22 of 64 (drop_last).
    assert [run["steps"] for run in runs.values()] == [44, 22, 22]
    assert "--optim.name=lamb" in runs["large LAMB"]["overrides"]
    for run in runs.values():
        (loss,), (accuracy,) = run["held_out_loss"], run["held_out_accuracy"]
        assert 0 < loss < 2.4 and 0.1 < accuracy <= 1  # learnt something from chance (2.30)
    assert runs["small"]["loss_gap"] == 0.0
    assert "held-out loss / accuracy after 1 epochs" in result.stdout
    assert (tmp_path / "out" / "bench_large_batch.png").stat().st_size > 0
