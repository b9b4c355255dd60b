"""A small image folder whose last image is a gate: holds a conversion mid-run."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class GatedFolder:
    root: Path
    """20 digit PNGs in class folders, then ``gate``."""
    gate: Path
    """A named pipe posing as the last image (in sorted order): a conversion that reaches it
    waits inside ``open`` until the test calls ``release`` (it then reads as empty: one bad
    image). It holds a conversion mid-run for as long as a test needs, without timing."""

    def release(self, wait_s: float = 30) -> bool:
        """Let the conversion waiting at the gate go on; False if none came within wait_s."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                descriptor = os.open(self.gate, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: no reader has reached the gate yet
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)
                continue
            os.close(descriptor)
            return True


def gated_copy(digits_folder: Path, root: Path) -> GatedFolder:
    """20 PNGs of ``digits_folder`` in class folders under ``root``, then the gate."""
    for path in sorted(digits_folder.rglob("*.png"))[:20]:
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        (root / path.parent.name / path.name).write_bytes(path.read_bytes())
    gate = root / "0" / "zz-gate.png"
    os.mkfifo(gate)
    return GatedFolder(root, gate)
