#!/usr/bin/env python
"""Dry-run a parallel layout for a cluster that is not here: one process plays chosen ranks
of a world of any size on torch's fake process group, builds the mesh, parallelizes the
model and runs a training step, as each of those ranks would.

    python tools/dry_run.py --config configs/hybrid-parallel.toml --world 1024 \\
        --data.global_batch=1024

The global batch must split over the job's data-parallel ranks: the file's 64 is for its 4
processes; at 1,024 ranks, dp_shard = 2 and tp = 2 leave 512. ``--ranks 0,511,…`` chooses
the ranks to play (default: first, middle, last); any ``--section.key=value`` overrides the
config. Exits 1 with the first rank's error (a degree that does not divide, heads that
tensor parallelism cannot split, a batch that does not split, …); otherwise prints what each
played rank holds: parameters, and the MB of parameters, gradients and optimizer state. See
``trainer.dry_run``.
"""

from __future__ import annotations

import sys

import _cli

from trainer.dry_run import default_ranks, play_ranks
from trainer.parallel.mesh import DIMENSIONS


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--world", type=int, required=True, help="ranks of the real job")
    arguments.add_argument(
        "--ranks", default="", help="ranks to play (default: first, middle, last)"
    )
    args, config = _cli.parse(arguments)
    if args.world < 1:
        arguments.error("--world must be >= 1")
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()] or default_ranks(args.world)
    if any(not 0 <= r < args.world for r in ranks):
        arguments.error(f"--ranks must lie in [0, {args.world})")
    try:
        reports = play_ranks(config, args.world, ranks)
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.world} ranks: {reports[0].layout}; data parallelism: {reports[0].strategy}")
    print(f"  {'rank':>6}  {'coordinates':<34}{'parameters':>12}{'param MB':>10}{'grad MB':>9}"
          f"{'optim MB':>10}  step")  # fmt: skip
    for r in reports:
        where = " ".join(f"{name}={r.coordinates[name]}" for name in DIMENSIONS)
        print(f"  {r.rank:>6}  {where:<34}{r.parameters:>12,}{r.parameter_bytes / 1e6:>10.3f}"
              f"{r.gradient_bytes / 1e6:>9.3f}{r.optimizer_bytes / 1e6:>10.3f}  "
              f"{'ran' if r.stepped else 'built (pipeline stage)'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    _cli.run(main)
