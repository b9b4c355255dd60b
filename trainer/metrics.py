"""Per-step training metrics: ``{out_dir}/metrics.jsonl`` and a progress line (rank 0).

Each line is one JSON object with an ``event``: ``start`` (layout, resume point, restart
count), ``step`` (loss, lr, step time, data-wait time and the stall fraction it makes of
the step, samples/s, gradient communication time where it can be measured), ``eval``,
``checkpoint``, ``stopped`` (saved on SIGTERM) and ``end`` (totals). Every record carries the
``run`` id of the launch that wrote it: a resumed run appends to the same file, and steps it
repeats (those after its checkpoint that the previous launch had already logged) are
dropped by ``current``, as the plot does. The stall fraction is the share of wall time the
trainer spent waiting for the loader: near 0 means the input pipeline keeps up.

With ``train.tensorboard = true`` the same numbers also go to TensorBoard event files in
``{out_dir}/tensorboard`` (torch's ``SummaryWriter``): each numeric field of a ``step``
record as ``step/<field>``, of an ``eval`` record as ``eval/<field>``, at the record's step.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from tqdm import tqdm


class TrainMetrics:
    def __init__(self, out_dir: str, *, enabled: bool, progress: bool, total_steps: int,
                 initial_step: int, run_id: str, tensorboard: bool = False) -> None:  # fmt: skip
        self.enabled = enabled
        self.run_id = run_id
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self._handle = None
        self._bar: tqdm[Any] | None = None
        self._board: Any = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ValueError(
                    "train.tensorboard = true needs the tensorboard package: pip install "
                    f"'shardflow[tensorboard]' (or set train.tensorboard = false): {error}"
                ) from error
            self._board = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        if enabled:
            os.makedirs(out_dir, exist_ok=True)
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            if progress:
                self._bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                                 dynamic_ncols=True, smoothing=0.1)  # fmt: skip

    def event(self, event: str, **fields: Any) -> None:
        if self._handle is None:
            return
        record = {"event": event, "time": round(time.time(), 3), "run": self.run_id, **fields}
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        if self._board is not None and event in ("step", "eval"):
            for name, value in fields.items():
                if name not in ("step", "epoch") and isinstance(value, int | float):
                    self._board.add_scalar(f"{event}/{name}", value, fields["step"])
        if self._bar is not None and event == "step":
            self._bar.update(fields["step"] - self._bar.n)
            self._bar.set_postfix_str(
                f"loss {fields['loss']:.4f} | {fields['samples_per_s']:,.0f} samples/s | "
                f"stall {100 * fields['stall_fraction']:.1f}%",
                refresh=False,
            )
        elif self._bar is not None and event in ("eval", "checkpoint"):
            shown = {k: v for k, v in fields.items() if k not in ("time",)}
            self._bar.write(f"{event}: " + ", ".join(f"{k} {_short(v)}" for k, v in shown.items()))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._board is not None:
            self._board.close()
            self._board = None


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def current(records: list[dict[str, Any]], event: str = "step") -> list[dict[str, Any]]:
    """The ``event`` records that still stand: a launch that resumed from step S replaced
    whatever earlier launches logged after S (they trained on, then lost it to a crash)."""
    kept: list[dict[str, Any]] = []
    for record in records:
        if record["event"] == "start":
            kept = [r for r in kept if r["step"] <= record["step"]]
        elif record["event"] == event:
            kept.append(record)
    return kept
