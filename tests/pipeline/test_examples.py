"""examples/your_own_data.py, the README's "Your own data", runs as written (issue 18.6)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_your_own_data_example_runs_and_mixes_70_30(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "examples/your_own_data.py", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # The transform's output, collated and padded: float CHW images, padded tokens and a mask.
    shapes = re.search(
        r"image \(64, 3, 32, 32\) torch.float32, tokens \(64, (\d+)\) \(mask \(64, (\d+)\)\)",
        done.stdout,
    )
    assert shapes, done.stdout
    assert shapes[1] == shapes[2]
    counts = dict(re.findall(r"(digits|photos) (\d+) \(", done.stdout))
    digits, photos = int(counts["digits"]), int(counts["photos"])
    assert abs(digits / (digits + photos) - 0.7) <= 0.02, done.stdout
    readme = (ROOT / "README.md").read_text()
    assert "examples/your_own_data.py" in readme
