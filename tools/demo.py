#!/usr/bin/env python
"""The embedded demo: real images → shards on a local S3 server → verified → trained on.

    python tools/demo.py [--config configs/demo.toml] [--nproc 2] [--section.key=value …]

Builds scikit-learn's handwritten digits (1,797 real scans, 10 classes) as two image
folders — every 5th digit held out — starts an S3 server on 127.0.0.1 when the output is
s3:// and no endpoint is configured, converts both folders into tar shards there, verifies
every shard (decoding every image), prints a summary, streams one epoch through the loader,
and then trains the reference CNN with ``torchrun --nproc-per-node N -m trainer.train``
(DDP over gloo, DALI decoding on the CPU) reading the shards from that S3 server. It ends
with throughput, stall share, held-out accuracy and a plot of the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

import _cli

from dataflow import storage
from dataflow.config import split_overrides
from dataflow.convert.job import convert
from dataflow.datasets import write_digits_folder
from dataflow.pipeline import Loader
from dataflow.storage.local_s3 import LocalS3Server
from dataflow.summary import describe
from dataflow.verify import verify_dataset
from trainer.metrics import read_metrics

STEPS = 6


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.set_defaults(config="configs/demo.toml")
    arguments.add_argument("--nproc", type=int, default=2, help="training processes (torchrun)")
    args, config = _cli.parse(arguments)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        output = config.convert.output
        held_out = output.rstrip("/") + "-held-out"
        if storage.protocol_of(output) == "s3" and not config.storage.endpoint_url:
            server = stack.enter_context(LocalS3Server())
            print(f"[1/{STEPS}] started an embedded S3 server at {server.endpoint_url}")
            config.storage = dataclasses.replace(config.storage, endpoint_url=server.endpoint_url)
        else:
            print(f"[1/{STEPS}] using {storage.redact(output)}")
        source = config.convert.input
        sources = {output: source}
        if not source:
            base = stack.enter_context(tempfile.TemporaryDirectory(prefix="shardflow-demo-"))
            train_dir, held_out_dir = os.path.join(base, "train"), os.path.join(base, "held-out")
            count = write_digits_folder(train_dir, held_out=held_out_dir)
            print(f"[2/{STEPS}] wrote {count} training and {1797 - count} held-out digit images "
                  f"(scikit-learn, 10 classes) to {base}")  # fmt: skip
            sources = {output: train_dir, held_out: held_out_dir}
        for destination, folder in sources.items():
            job = dataclasses.replace(config.convert, input=folder, output=destination,
                                      overwrite=True)  # fmt: skip
            report = convert(job, config.storage, progress=not args.quiet)
            print(f"[3/{STEPS}] converted: {report.summary()}")
        for destination in sources:
            check = verify_dataset(destination, config.storage, decode=True,
                                   progress=not args.quiet)  # fmt: skip
            for problem in check.problems:
                print(f"BAD {problem}")
            if not check.ok:
                print(f"verify FAILED with {len(check.problems)} problem(s)", file=sys.stderr)
                return 1
            print(f"[4/{STEPS}] verified {storage.redact(destination)}: {check.shards} shards, "
                  f"{check.samples} samples, all decoded")  # fmt: skip
        print()
        print(describe(output, config.storage))
        print()
        data = dataclasses.replace(config.data, url=output, audit=False)
        loader = Loader(data, config.storage, rank=0, world_size=1)
        started_epoch = time.perf_counter()
        samples = sum(len(batch["__key__"]) for batch in loader)
        rate = samples / (time.perf_counter() - started_epoch)
        print(f"[5/{STEPS}] streamed one epoch back through dataflow.Loader: {samples} samples "
              f"in {len(loader)} batches of {data.global_batch}, {rate:.0f} samples/s")  # fmt: skip
        print(loader.metrics_.summary(loader.metrics()))
        loader.close()
        print()
        status = _train(args, config.train.out_dir, config.storage.endpoint_url, output,
                        held_out if held_out in sources else "")  # fmt: skip
        if status:
            return status
    print(f"\ndemo finished in {time.perf_counter() - started:.1f} s")
    return 0


def _train(
    args: argparse.Namespace, out_dir: str, endpoint: str, train_url: str, held_out_url: str
) -> int:
    """Run the trainer under torchrun against the same S3 server; summarise its metrics."""
    nproc: int = args.nproc
    shutil.rmtree(out_dir, ignore_errors=True)  # the demo starts fresh; a user's run resumes
    _, user_overrides = split_overrides(sys.argv[1:])
    overrides = [f"--{o}" for o in user_overrides] + [
        f"--data.url={train_url}", f"--train.eval_url={held_out_url}",
        f"--train.out_dir={out_dir}", f"--train.progress={str(not args.quiet).lower()}",
    ]  # fmt: skip
    if endpoint:
        overrides.append(f"--storage.endpoint_url={endpoint}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "trainer.train",
               f"--config={args.config}", *overrides]  # fmt: skip
    print(f"[6/{STEPS}] training: torchrun --nproc-per-node {nproc} -m trainer.train "
          f"--config {args.config} …")  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(command, env=env)
    if done.returncode:
        print(f"training FAILED (exit status {done.returncode})", file=sys.stderr)
        return done.returncode
    records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    end = next(r for r in reversed(records) if r["event"] == "end")
    evals = [r for r in records if r["event"] == "eval"]
    print(f"\ntrained {end['steps']} steps on {nproc} processes: "
          f"{end['samples_per_s']:,.0f} samples/s, the loader stalled the step "
          f"{100 * end['stall_fraction']:.1f}% of the time, "
          f"final train loss {end['loss']:.4f}")  # fmt: skip
    for record in evals:
        print(f"  epoch {record['epoch']}: held-out accuracy {record['accuracy']:.4f}, "
              f"loss {record['loss']:.4f} ({record['targets']} digits)")  # fmt: skip
    print(f"metrics: {out_dir}/metrics.jsonl, plot: {out_dir}/training.png, "
          f"audit log: {out_dir}/audit/, checkpoints: {out_dir}/checkpoints/")  # fmt: skip
    return 0


if __name__ == "__main__":
    _cli.run(main)
