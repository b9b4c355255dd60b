"""One process of a multi-process loader test (tests/pipeline/test_distributed.py).

Run under torchrun, e.g.::

    python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        tests/pipeline/dist_worker.py DATASET OUT_DIR '[{"name": "epoch"}]'

The third argument lists jobs, run in order, each on a fresh ``Loader`` that takes its rank
and world size from ``torch.distributed`` (gloo): ``{"name": N}`` reads to the end of the
epoch; ``"steps": K`` stops after K batches; ``"load": PATH`` resumes from a saved state
first. Each job writes, per rank R, into OUT_DIR:

* ``N-rank-R.jsonl``: one line per delivered batch — epoch, step, rank, batch size, and the
  valid keys with a digest of each one's image (padding is left out);
* ``N-state-rank-R.json``: ``loader.state_dict()`` after the last delivered batch, taken
  inside the loop as a trainer's checkpoint would be;
* ``N-counts-rank-R.json``: every rank's batch count (``all_gather_object``); the worker
  exits non-zero if they differ — a rank with a batch more would hang the others' next
  collective in training.

The test also calls :func:`run_job` in its own process, with an explicit rank and world
size of one, for the single-process halves of the elastic resumes.
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dataflow.pipeline import DataConfig, Loader

GLOBAL_BATCH = 24


def data_config(dataset: str, backend: str = "cpu") -> DataConfig:
    """The one loader configuration every process of the test uses (same order, same crops)."""
    return DataConfig(
        decode_backend=backend,  # type: ignore[arg-type]
        url=dataset,
        global_batch=GLOBAL_BATCH,
        image_size=16,
        seed=11,
        shuffle=True,
        shuffle_window=4,
        drop_last=False,
        fetch_workers=2,
        decode_workers=1,
        prefetch_batches=2,
    )


def image_digest(image: torch.Tensor) -> str:
    return hashlib.blake2b(image.numpy().tobytes(), digest_size=8).hexdigest()


def run_job(
    dataset: str,
    out_dir: Path,
    job: dict[str, Any],
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> int:
    """Run one job (see the module docstring); returns the number of batches delivered."""
    loader = Loader(data_config(dataset, job.get("backend", "cpu")), rank=rank,
                    world_size=world_size)  # fmt: skip
    name, steps, load = job["name"], job.get("steps"), job.get("load")
    if load:
        loader.load_state_dict(json.loads(Path(load).read_text()))
    delivered = 0
    state = loader.state_dict()
    with open(out_dir / f"{name}-rank-{loader.rank}.jsonl", "w", encoding="utf-8") as log:
        for batch in loader:
            valid = batch["__valid__"].tolist()
            record = {
                "epoch": loader.epoch,
                "step": loader.step - 1,
                "rank": loader.rank,
                "world_size": loader.world_size,
                "size": len(valid),
                "keys": [k for k, v in zip(batch["__key__"], valid, strict=True) if v],
                "digests": [
                    image_digest(image) for image, v in zip(batch["image"], valid, strict=True) if v
                ],
            }
            log.write(json.dumps(record) + "\n")
            delivered += 1
            state = loader.state_dict()
            if steps is not None and delivered == steps:
                break
    loader.close()
    (out_dir / f"{name}-state-rank-{loader.rank}.json").write_text(json.dumps(state))
    return delivered


def main(argv: list[str]) -> None:
    dataset, out_dir, jobs = argv[0], Path(argv[1]), json.loads(argv[2])
    # A short collective timeout: a rank that falls out of step fails the test, not hangs it.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    try:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        for job in jobs:
            delivered = run_job(dataset, out_dir, job)
            counts: list[int | None] = [None] * world_size
            dist.all_gather_object(counts, delivered)
            counts_file = out_dir / f"{job['name']}-counts-rank-{rank}.json"
            counts_file.write_text(json.dumps(counts))
            if len(set(counts)) != 1:
                raise SystemExit(
                    f"job {job['name']}: ranks delivered unequal batch counts {counts}"
                )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
