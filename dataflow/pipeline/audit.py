"""The audit log: ``epoch<TAB>step<TAB>key`` of every delivered sample, one file per rank.

A step's lines are written when the next batch is asked for (or the state is taken, or the
pass closes), so the log and a checkpoint always agree; a resume truncates the lines past
the restored position, which will be delivered again. Cost: one append per step.
"""

from __future__ import annotations

import os


class AuditLog:
    """Appends delivered keys to ``path``; ``truncate`` forgets those past a position."""

    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, epoch: int, step: int, keys: list[str]) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.writelines(f"{epoch}\t{step}\t{key}\n" for key in keys)

    def truncate(self, epoch: int, step: int) -> None:
        """Forget lines at or past (epoch, step): they will be delivered again."""
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                line_epoch, line_step, _ = line.split("\t", 2)
                if (int(line_epoch), int(line_step)) < (epoch, step):
                    kept.append(line)
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
