"""tools/bench_train.py end to end on a tiny setting: both legs ran the same steps on the
same batches. Timings are printed, never asserted (they live in the benchmark's report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_reports_both_legs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "tools/bench_train.py", "--scenarios", "digits", "--steps", "3",
         "--warmup", "1", "--repeat", "1", "--data-dir", str(tmp_path / "data"),
         "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "command: python tools/bench_train.py --scenarios digits" in result.stdout
    (scenario,) = json.loads((tmp_path / "out" / "bench_train.json").read_text())["scenarios"]
    loader, preloaded = scenario["loader"], scenario["preloaded"]
    assert loader["steps"] == preloaded["steps"] == 3
    assert loader["median_step_s"] > 0 and preloaded["median_step_s"] > 0
    assert 0 <= loader["stall_fraction"] < 1
    assert isinstance(scenario["stall_target_met"], bool)
    # Same batches, same seed, deterministic CPU kernels: the same losses, bit for bit.
    assert scenario["losses_identical"] is True
    assert scenario["config"]["data"]["prefetch_next_epoch"] is True
    assert (tmp_path / "out" / "bench_train.png").stat().st_size > 0
