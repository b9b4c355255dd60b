#!/usr/bin/env python
"""Tune the loader's I/O knobs on this machine and this storage, and write the tuned config.

    python tools/tune_io.py --config FILE --budget SECONDS --out TUNED.toml
                            [--trial-seconds 4] [--memory-budget 4GiB] [--plot PNG]
                            [--section.key=value ...]

Runs the configured loader alone (no model), a few seconds per setting, and searches
(``dataflow.tuning``) the knobs that matter here — for S3 connections, range size, read-ahead
and fetch workers; for POSIX block size, read-ahead and fetch workers; decode workers (and the
DALI backend when installed, its hardware-decoder share on a GPU); prefetched batches —
starting from the config's own values, turning the bottleneck stage's knobs first, within the
time budget and never beyond the memory budget (estimated before a setting runs, measured as
resident memory while it runs). The cache is off during trials, so every setting reads from
storage as the first epoch does.

Writes a copy of the config with the tuned values (its comments kept) under a header stating
the measured gain, and a plot of the search (``--plot``, default next to ``--out``). The
copy is the config that was measured: ``--section.key=value`` overrides are written into it
too, marked as set on the command line.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import sys
import threading
import time
from typing import Any

import _cli
from _bench import drive_loader, rss_bytes

from dataflow.config import format_bytes, parse_bytes, split_overrides
from dataflow.index import DatasetIndex
from dataflow.pipeline import DataConfig
from dataflow.storage import StorageConfig, protocol_of
from dataflow.tuning import (
    Knob,
    Measurement,
    Result,
    Workload,
    batch_knobs,
    decode_knobs,
    memory_estimate,
    storage_knobs,
    tune,
)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def choose_knobs(data: DataConfig) -> list[Knob]:
    import torch

    remote = protocol_of(data.url) not in ("", "file")
    gpu = torch.cuda.is_available() and data.decode_device == "gpu"
    return [*storage_knobs(remote), *decode_knobs(len(os.sched_getaffinity(0)),
            dali=dali_available(), gpu=gpu), *batch_knobs()]  # fmt: skip


def apply(values: dict[str, Any], data: DataConfig, store: StorageConfig
          ) -> tuple[DataConfig, StorageConfig]:  # fmt: skip
    changes: dict[str, dict[str, Any]] = {"data": {}, "storage": {}}
    for path, value in values.items():
        section, key = path.split(".", 1)
        changes[section][key] = value
    data = dataclasses.replace(data, **changes["data"])
    return data, dataclasses.replace(store, **changes["storage"])


class LoaderTrial:
    """Measures one setting: the loader runs for ``seconds`` after its first batch (counted:
    valid samples; memory: resident memory above the start, sampled every 50 ms)."""

    def __init__(self, data: DataConfig, store: StorageConfig, seconds: float, base_rss: int,
                 quiet: bool) -> None:  # fmt: skip
        self.data = dataclasses.replace(data, cache_dir="", audit=False, prefetch_next_epoch=False)
        self.store, self.seconds, self.base_rss, self.quiet = store, seconds, base_rss, quiet

    def __call__(self, values: dict[str, Any]) -> Measurement:
        data, store = apply(values, self.data, self.store)
        peak = [rss_bytes()]
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], rss_bytes())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        began = time.perf_counter()
        try:
            run = drive_loader(data, store, seconds=self.seconds, warm_up=True)
        finally:
            done.set()
            watcher.join()
        rate, metrics = run.samples / run.seconds, run.metrics
        stages = metrics["stages"]
        bottleneck = max(stages, key=lambda name: stages[name]["utilisation"])
        measurement = Measurement(rate=rate, bottleneck=bottleneck,
                                  memory=max(0, peak[0] - self.base_rss),
                                  seconds=time.perf_counter() - began)  # fmt: skip
        if not self.quiet:
            shown = ", ".join(f"{p.split('.', 1)[1]}={show(v)}" for p, v in values.items())
            print(f"  {rate:8.1f} samples/s  {bottleneck:<7} {shown}", flush=True)
        return measurement


def show(value: Any) -> str:
    return format_bytes(value) if isinstance(value, int) and value >= 1 << 20 else str(value)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f'"{value >> 20}MiB"'
    return repr(value)


def rewrite(text: str, values: dict[str, Any], was: dict[str, Any]) -> str:
    """``text`` (a TOML file) with each ``section.key`` set to its value, marked with what it
    was: an existing line keeps its comment after the mark; a missing key goes at the top of
    its section (made if missing)."""
    marks = {path: f"# tuned, was {toml_value(was[path])}" for path in values}
    return set_values(text, values, marks)


def set_values(text: str, values: dict[str, Any], marks: dict[str, str]) -> str:
    """``text`` with each ``section.key`` (the section may be dotted) set to its value and
    its mark, as ``rewrite`` describes."""
    lines = text.splitlines()
    for path, value in values.items():
        section, key = path.rsplit(".", 1)
        header = re.compile(rf"^\s*\[{re.escape(section)}\]\s*(#.*)?$")
        start = next((i for i, line in enumerate(lines) if header.match(line)), None)
        if start is None:
            lines += ["", f"[{section}]"]
            start = len(lines) - 1
        end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")),
                   len(lines))  # fmt: skip
        pattern = re.compile(rf"^(\s*{re.escape(key)}\s*=\s*)([^#]*?)(\s*#.*)?$")
        mark = marks[path]
        for i in range(start + 1, end):
            match = pattern.match(lines[i])
            if match:
                comment = (match.group(3) or "").strip().lstrip("#").strip()
                lines[i] = f"{match.group(1)}{toml_value(value)}  {mark}" + (
                    f" — {comment}" if comment else "")  # fmt: skip
                break
        else:
            lines.insert(start + 1, f"{key} = {toml_value(value)}  {mark}")
    return "\n".join(lines) + "\n"


def plot(result: Result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [t for t in result.trials if t.measurement is not None]
    figure, axis = plt.subplots(figsize=(10, 4.5))
    axis.plot([t.elapsed for t in measured], [t.measurement.rate for t in measured],  # type: ignore[union-attr]
              "o", color="#bbbbbb", label="tried")  # fmt: skip
    path_trials = [t for t in measured if t.accepted]
    axis.plot([t.elapsed for t in path_trials], [t.measurement.rate for t in path_trials],  # type: ignore[union-attr]
              "-o", color="#1f77b4", label="kept")  # fmt: skip
    for trial in path_trials[1:]:
        axis.annotate(trial.changed.split(",")[0].split(".")[-1], (trial.elapsed,
                      trial.measurement.rate), fontsize=7, xytext=(3, 4),  # type: ignore[union-attr]
                      textcoords="offset points")  # fmt: skip
    axis.set_xlabel("search time (s)")
    axis.set_ylabel("samples/s")
    axis.set_title(f"tune_io: {result.gain:.2f}× over the starting config in "
                   f"{len(measured)} settings, {result.seconds:.0f} s", fontsize=10)  # fmt: skip
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def search(config_path: str | None, data: DataConfig, store: StorageConfig, *, budget_s: float,
           trial_s: float, memory_budget: float, quiet: bool,
           knobs: list[Knob] | None = None) -> Result:  # fmt: skip
    """The search over ``knobs`` (default: those that matter for this storage and machine)."""
    knobs = knobs or choose_knobs(data)
    start = {knob.path: getattr(data if knob.section == "data" else store, knob.key)
             for knob in knobs}  # fmt: skip
    index = DatasetIndex.load(data.url, config=store)
    shard_bytes = sum(s.bytes for s in index.shards) / max(1, len(index.shards))
    per_rank = data.global_batch
    workload = Workload(shard_bytes=shard_bytes,
                        batch_bytes=per_rank * data.image_size**2 * 3)  # fmt: skip
    trial = LoaderTrial(data, store, trial_s, rss_bytes(), quiet)
    return tune(knobs, start, trial, budget_s=budget_s, memory_budget=memory_budget,
                estimate=lambda values: memory_estimate(values, workload))  # fmt: skip


def command_line_values(config: Any, argv: list[str]) -> dict[str, Any]:
    """The ``--section.key=value`` overrides on ``argv``, as the loaded ``config`` holds them
    (typed: sizes as bytes, numbers as numbers)."""
    values = {}
    for override in split_overrides(argv)[1]:
        path = override.split("=", 1)[0].strip()
        value = config
        for part in path.split("."):
            value = value[part] if isinstance(value, dict) else getattr(value, part)
        values[path] = value
    return values


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--budget", type=float, required=True, help="seconds to search")
    arguments.add_argument("--out", required=True, help="the tuned config to write")
    arguments.add_argument("--trial-seconds", type=float, default=4.0)
    arguments.add_argument("--memory-budget", type=parse_bytes, default=parse_bytes("4GiB"))
    arguments.add_argument("--plot", default="", help="default: --out with .png")
    args, config = _cli.parse(arguments)
    if not config.data.url:
        arguments.error("the config (or --data.url=…) must name the dataset")
    if not args.quiet:
        print(f"tuning {config.data.url} for {args.budget:.0f} s, {args.trial_seconds:.0f} s a "
              f"setting, memory ≤ {format_bytes(args.memory_budget)}:", flush=True)  # fmt: skip
    result = search(args.config, config.data, config.storage, budget_s=args.budget,
                    trial_s=args.trial_seconds, memory_budget=args.memory_budget,
                    quiet=args.quiet)  # fmt: skip
    assert result.best.measurement is not None and result.start.measurement is not None
    before, after = result.start.measurement.rate, result.best.measurement.rate
    source = ""
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            source = handle.read()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"# Tuned by tools/tune_io.py on {stamp}: {before:,.0f} → {after:,.0f} samples/s "
        f"({after / before:.2f}×), {len(result.trials)} settings in {result.seconds:.0f} s"
        f"{' (converged)' if result.converged else ' (time budget reached)'}.\n"
        f"# Changed: " + (", ".join(f"{p} = {show(v)}" for p, v in result.best.values.items()
                                    if result.start.values[p] != v) or "nothing") + "\n"
    )  # fmt: skip
    # What was measured: the file, the command line's overrides on it, the tuned values.
    given = command_line_values(config, sys.argv[1:])
    source = set_values(source, given, dict.fromkeys(given, "# set on the command line"))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        changed = {p: v for p, v in result.best.values.items() if result.start.values[p] != v}
        handle.write(header + rewrite(source, changed, result.start.values))
    plot_path = args.plot or os.path.splitext(args.out)[0] + ".png"
    plot(result, plot_path)
    print(f"{before:,.0f} → {after:,.0f} samples/s ({after / before:.2f}×) in "
          f"{result.seconds:.0f} s; wrote {args.out} and {plot_path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    _cli.run(main)
