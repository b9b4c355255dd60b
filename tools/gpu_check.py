#!/usr/bin/env python
"""One command for a machine with a GPU: DALI mixed decode, training stall, NCCL layouts.

    python tools/gpu_check.py [--count 3000] [--epochs 10] [--out reports/]

Needs CUDA, PyTorch and NVIDIA DALI (``pip install nvidia-dali-cuda130``, or the wheel files
carried to the machine). It writes the ImageNet-like photo set (or reuses it), converts it
to tar shards, then measures each over --epochs epochs after a warm-up epoch, batch 256,
decode + random-resized-crop 224 + flip:

    ours, DALI mixed decode   Loader(decode_backend="dali", decode_device="gpu",
                              device="cuda"): nvJPEG / hardware JPEG decoder, CUDA tensors
    ours, CPU decode          the CPU path, copied to the GPU on the side stream
    DALI's own pipeline       readers.webdataset → decoders.image_random_crop("mixed")

Then the trainer on the GPU (``python -m trainer.train``, the CNN on those 224-pixel photos,
bf16, batch 256): its stall fraction and samples/s with DALI mixed decode and with CPU
decode, from each run's metrics.jsonl. With two or more GPUs, an NCCL smoke run of the
parallel layouts (DDP, FSDP, TP, PP 1F1B on the small GPT, 2 ranks) against the same run
on one GPU, loss by loss (NCCL refuses two ranks on one GPU, so one GPU skips it and says
so). Last, ``pytest -m gpu``. Prints a table and writes ``<out>/gpu_check.json``. Takes a
few minutes; nothing in CI runs it (CI has no GPU).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import time

import _cli
import torch
from _bench import dali_own_rate, machine, prepare_photos, prepare_shards

from dataflow.pipeline import DataConfig, Loader
from trainer.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def epoch_rate(config: DataConfig, epochs: int) -> float:
    """samples/s over ``epochs`` epochs, after a warm-up epoch."""
    loader = Loader(config, rank=0, world_size=1)
    for _ in loader:  # warm-up epoch: CUDA contexts, nvJPEG handles, allocator
        pass
    torch.cuda.synchronize()
    started = time.perf_counter()
    samples = 0
    for _ in range(epochs):
        for batch in loader:
            samples += len(batch["__key__"])
    torch.cuda.synchronize()
    return samples / (time.perf_counter() - started)


def train_run(out_dir: str, overrides: list[str], nproc: int = 1) -> dict[str, object]:
    """Run trainer.train (under torchrun when nproc > 1); its end record and step losses."""
    command = [sys.executable, "-m", "trainer.train", f"--train.out_dir={out_dir}", *overrides]
    if nproc > 1:
        command[1:3] = ["-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={nproc}", "-m", "trainer.train"]  # fmt: skip
    shutil.rmtree(out_dir, ignore_errors=True)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              [REPO, *filter(None, [os.environ.get("PYTHONPATH")])])))  # fmt: skip
    if done.returncode:
        return {"error": f"exit {done.returncode}: {done.stderr[-1500:]}"}
    records = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    end = next(r for r in reversed(records) if r["event"] == "end")
    losses = [r["loss"] for r in records if r["event"] == "step"]
    return {"samples_per_s": end["samples_per_s"], "stall_fraction": end["stall_fraction"],
            "losses": losses}  # fmt: skip


def training_stall(shards: str, out: str) -> dict[str, object]:
    """The CNN on 224-pixel photos on one GPU: DALI mixed decode vs CPU decode."""
    common = [f"--data.url={shards}", "--data.global_batch=256", "--data.image_size=224",
              "--model.name=cnn", "--model.cnn.width=64", "--model.cnn.blocks=[2,2,2]",
              "--train.mixed_precision=bf16", "--train.max_steps=60", "--train.epochs=1000",
              "--train.progress=false",
              "--checkpoint.resume=never", "--train.log_every=5"]  # fmt: skip
    return {
        "DALI mixed decode": train_run(os.path.join(out, "stall-dali"), [
            *common, "--data.decode_backend=dali", "--data.decode_device=gpu"]),
        "CPU decode": train_run(os.path.join(out, "stall-cpu"), common),
    }  # fmt: skip


def nccl_layouts(out: str) -> dict[str, object]:
    """GPT layouts on 2 GPUs over NCCL, each against the one-GPU run (max |Δloss|)."""
    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU: NCCL needs one GPU per rank"}
    tokens = os.path.join(out, "tokens")
    write_counting_sequences(tokens)
    common = [f"--data.url={tokens}/ds", "--data.global_batch=32", "--data.label_field=",
              "--model.name=gpt", "--model.gpt.vocab_size=64", "--model.gpt.seq_len=32",
              "--model.gpt.dim=64", "--model.gpt.layers=4", "--model.gpt.heads=4",
              "--train.max_steps=8",
              "--train.progress=false", "--checkpoint.resume=never"]  # fmt: skip
    reference = train_run(os.path.join(out, "nccl-1"), common)
    results: dict[str, object] = {"one GPU": reference}
    for name, extra in {
        "DDP": ["--parallel.dp_replicate=2"], "FSDP": ["--parallel.dp_shard=2"],
        "TP": ["--parallel.tp=2"],
        "PP 1F1B": ["--parallel.pp=2", "--parallel.pp_schedule=1f1b", "--parallel.microbatches=4"],
    }.items():  # fmt: skip
        run = train_run(os.path.join(out, f"nccl-{name}"), [*common, *extra], nproc=2)
        if "losses" in run and "losses" in reference:
            pairs = zip(run["losses"], reference["losses"], strict=True)  # type: ignore[call-overload]
            run["max_loss_difference"] = max(abs(a - b) for a, b in pairs)
        results[name] = run
    return results


def write_counting_sequences(root: str, count: int = 1024) -> None:
    """Token shards of the trainer tests' counting task (tests/trainer/conftest.py)."""
    import numpy as np

    from dataflow.convert.config import ConvertConfig
    from dataflow.convert.job import convert

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    path = os.path.join(root, "tokens.jsonl")
    with open(path, "w") as handle:
        for number in range(count):
            start, stride = int(rng.integers(0, 64)), int(rng.integers(1, 4))
            tokens = [(start + stride * i) % 64 for i in range(33)]
            handle.write(json.dumps({"id": f"seq{number:05d}", "tokens": tokens}) + "\n")
    convert(ConvertConfig(input=path, output=os.path.join(root, "ds"), format="parquet",
                          key_field="id", overwrite=True), progress=False)  # fmt: skip


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--count", type=int, default=3000)
    arguments.add_argument("--epochs", type=int, default=10, help="timed epochs per rate")
    arguments.add_argument("--data-dir", default="/tmp/shardflow-bench/photos")
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"))
    args, config = _cli.parse(arguments)
    if not torch.cuda.is_available():
        print("error: no CUDA device here; this check is for a GPU machine", file=sys.stderr)
        return 1
    prepare_photos(args.data_dir, args.count, args.quiet)
    shards = prepare_shards(args.data_dir, args.data_dir.rstrip("/") + "-shards", args.count)
    threads = max(2, len(os.sched_getaffinity(0)) // 2)
    base = dataclasses.replace(config.data, url=shards, global_batch=256, image_size=224,
                               decode_workers=threads, device="cuda")  # fmt: skip
    results = {
        "ours, DALI mixed decode": epoch_rate(
            dataclasses.replace(base, decode_backend="dali", decode_device="gpu"), args.epochs
        ),
        "ours, CPU decode": epoch_rate(base, args.epochs),
        "DALI's own pipeline (mixed)": dali_own_rate(
            shards, batch=256, threads=threads, decoder="mixed", warmup=True, epochs=args.epochs
        ),
    }
    for name, rate in results.items():
        print(f"{name:<32}{rate:>10.0f} samples/s")
    work = os.path.join(args.data_dir.rstrip("/") + "-train")
    stall = training_stall(shards, work)
    for name, run in stall.items():
        print(f"training, {name:<22}{run}")
    layouts = nccl_layouts(work)
    print(f"NCCL layouts: {layouts}")
    tests = subprocess.run(
        # Test modules whose imports the GPU image lacks (moto, webdataset…) hold no GPU
        # test: their collection errors must not stop the ones that run.
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA",
         "--continue-on-collection-errors", os.path.join(REPO, "tests")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    print(tests.stdout[-3000:])
    os.makedirs(args.out, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": machine(sorted(os.sched_getaffinity(0))),
        "gpu": torch.cuda.get_device_name(0),
        "photos": args.count,
        "timed_epochs": args.epochs,
        "samples_per_s": results,
        "training_stall": stall,
        "nccl_layouts": layouts,
        "gpu_tests_exit_code": tests.returncode,
        # Collection errors of modules the GPU image cannot import count in the exit code.
        "gpu_tests_summary": [
            line
            for line in tests.stdout.splitlines()
            if line.startswith(("PASSED", "FAILED", "ERROR", "SKIPPED"))
            or " passed" in line
            or " failed" in line
        ],
    }
    with open(os.path.join(args.out, "gpu_check.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    return tests.returncode


if __name__ == "__main__":
    _cli.run(main)
