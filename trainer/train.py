"""Entry point: ``[torchrun --nproc-per-node N] python -m trainer.train --config FILE [--s.k=v …]``.

One process without torchrun; with it, one per rank (c10d rendezvous, multi-node as torchrun
does it). Backend NCCL with CUDA, gloo on CPU. A thin wrapper: the loop, checkpoints and
metrics are ``trainer.Trainer``'s (``trainer/trainer.py``), which the Python API runs too.
Bad settings and bad data end in one line per rank and exit 1; SIGTERM in a checkpoint and
exit 143.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Any

import torch.distributed as dist

from dataflow.config import ConfigError, split_overrides
from dataflow.errors import DataError
from dataflow.storage import StorageError
from trainer.config import Config, load
from trainer.lease import OutDirBusyError
from trainer.preemption import EXIT_CODE, Stopped
from trainer.trainer import RendezvousError, Trainer


def train(config: Config) -> dict[str, Any]:
    """Run the configured training; returns the end-of-run summary (the same on all ranks).
    Raises ``Stopped`` after the checkpoint a stop request (SIGTERM) asked for."""
    return Trainer(config).fit()


def main(argv: list[str] | None = None) -> int:
    arguments = argparse.ArgumentParser(
        prog="python -m trainer.train", description=__doc__.split("\n\n")[0],
        epilog="Any config field can be overridden: --section.key=value (e.g. --train.epochs=3).",
    )  # fmt: skip
    arguments.add_argument("--config", help="a TOML file (see configs/); default: the defaults")
    own, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = arguments.parse_args(own)
    # Rank 0 tells the story; the other ranks speak up only for warnings and errors.
    level = logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A 1×1 convolution's weight gradient differs from its bucket view only in the strides of
    # size-1 dimensions: same memory order, nothing to fix, but DDP warns on every step.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    try:
        config = load(args.config, overrides)
    except ConfigError as error:
        arguments.exit(2, f"{arguments.prog}: config error: {error}\n")
    rank = int(os.environ.get("RANK", 0))
    try:
        summary = train(config)
    except Stopped as stopped:
        print(f"rank {rank}: {stopped}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return EXIT_CODE
    except (DataError, StorageError, ValueError, OutDirBusyError, RendezvousError) as error:
        # A bad setting or bad data: one readable line per rank, no traceback. No barrier
        # either — the other ranks may never get there; torchrun stops them.
        print(f"error (rank {rank}): {error}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 1
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0 and summary.get("complete"):
        print(f"already complete: step {summary['steps']} of {summary['total_steps']} "
              f"({summary['checkpoint']}); nothing to train (raise --train.epochs or "
              f"--train.max_steps to train further)")  # fmt: skip
    elif rank == 0:
        held_out = summary["eval"]
        accuracy = f", held-out accuracy {held_out['accuracy']:.4f}" if held_out else ""
        print(f"finished: {summary['steps']} steps, loss {summary['loss']:.4f}, "
              f"{summary['samples_per_s']:,.0f} samples/s, stall "
              f"{100 * summary['stall_fraction']:.1f}%{accuracy}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
