#!/usr/bin/env python
"""Gradient compression: bytes per step, step time and loss for each method, one run.

    python tools/bench_compression.py [--epochs 3] [--methods none,bf16,powersgd,topk,sign]
                                      [--data-dir DIR] [--out reports/]

``trainer.train`` under ``torchrun --nproc-per-node 2`` (DDP over gloo on loopback) for each
method on two reference models:

    cnn    configs/demo.toml's ResNet (width 16) on scikit-learn's 1,797 digits, batch 64
    gpt    the small GPT (dim 64, 4 layers) on 512 counting sequences of 33 tokens, batch 32

Per run: the bytes each rank sent per step (``comm_bytes`` in metrics.jsonl) against a dense
fp32 all-reduce's (``comm_bytes_dense``), their ratio, the median step time, and the mean
training loss of the last epoch beside the uncompressed run's. The compressors send dense for
their first steps (PowerSGD: ``compression.powersgd_start_step``, here 5; top-k and sign: 2),
so the bytes are those of the compressed steps. Writes ``<out>/bench_compression.json`` and a
PNG (bytes ratio and step time per method).

Measured (2 cores, 3 epochs): bytes ratios CNN / GPT — bf16 2.0 / 2.0, PowerSGD rank 4
6.8 / 9.9 (these models' small matrices and vectors gain too little and go dense; a 256×128
layer gives 19.8), top-k 1 % 49.5 / 50.4, sign 30.8 / 31.0. On loopback the step gets no
faster (1.0–1.4× the uncompressed step): there is no slow link to save.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import _cli
import numpy as np
from _bench import machine

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.datasets import write_digits_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("none", "bf16", "powersgd", "topk", "sign")
MODELS = {
    "cnn": ["--config", "configs/demo.toml", "--data.decode_backend=cpu", "--data.audit=false",
            "--model.width=16"],
    "gpt": ["--model.name=gpt", "--model.vocab_size=64", "--model.seq_len=32", "--model.dim=64",
            "--model.layers=4", "--model.heads=4", "--data.label_field=", "--data.global_batch=32",
            "--data.shuffle_window=2", "--optim.lr=0.003"],
}  # fmt: skip
START = 5  # compressed from this step on (PowerSGD's start step; top-k and sign start at 2)


def prepare(data_dir: str) -> dict[str, str]:
    """The digits as tar shards and the token sequences as Parquet shards (written once)."""
    urls = {"cnn": os.path.join(data_dir, "digits-ds"), "gpt": os.path.join(data_dir, "tokens-ds")}
    if all(os.path.exists(os.path.join(url, "index.json")) for url in urls.values()):
        return urls
    with tempfile.TemporaryDirectory() as folder:
        write_digits_folder(os.path.join(folder, "digits"))
        convert(ConvertConfig(input=os.path.join(folder, "digits"), output=urls["cnn"],
                              max_shard_samples=256, workers=0, overwrite=True),
                progress=False)  # fmt: skip
        rng = np.random.default_rng(0)
        lines = []
        for number in range(512):
            start, stride = int(rng.integers(0, 64)), int(rng.integers(1, 4))
            tokens = [(start + stride * i) % 64 for i in range(33)]
            lines.append(json.dumps({"id": f"seq{number:04d}", "tokens": tokens}))
        source = os.path.join(folder, "tokens.jsonl")
        with open(source, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        convert(ConvertConfig(input=source, output=urls["gpt"], format="parquet", key_field="id",
                              row_group_rows=32, max_shard_samples=128, workers=0,
                              overwrite=True), progress=False)  # fmt: skip
    return urls


def train(model: str, method: str, url: str, epochs: int, out_dir: str) -> dict[str, Any]:
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "trainer.train", *MODELS[model], f"--data.url={url}", f"--train.epochs={epochs}",
        "--train.progress=false", "--checkpoint.interval=0", "--checkpoint.resume=never",
        f"--train.out_dir={out_dir}", f"--compression.method={method}",
        f"--compression.powersgd_start_step={START}",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{model}/{method}: trainer exited {done.returncode}\n"
                           f"{done.stderr[-3000:]}")  # fmt: skip
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        steps = [r for r in map(json.loads, handle) if r["event"] == "step"]
    compressed = [r for r in steps if r["step"] > START]
    last = [r["loss"] for r in steps if r["epoch"] == steps[-1]["epoch"]]
    result: dict[str, Any] = {
        "steps": len(steps),
        "median_step_s": statistics.median(r["step_s"] for r in steps[3:]),
        "median_comm_s": statistics.median(r.get("comm_s", 0.0) for r in steps[3:]),
        "last_epoch_loss": sum(last) / len(last),
    }
    if method != "none":
        result["bytes_per_step"] = statistics.mean(r["comm_bytes"] for r in compressed)
        result["dense_bytes_per_step"] = statistics.mean(r["comm_bytes_dense"] for r in compressed)
    return result


def plot(results: dict[str, dict[str, dict[str, Any]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for offset, model in zip((-width / 2, width / 2), results, strict=False):
        runs = results[model]
        names = list(runs)
        ratios = [runs[n].get("ratio", 1.0) for n in names]
        times = [1000 * runs[n]["median_step_s"] for n in names]
        positions = [i + offset for i in range(len(names))]
        axes[0].bar(positions, ratios, width, label=model)
        axes[1].bar(positions, times, width, label=model)
        axes[0].set_xticks(range(len(names)), names)
        axes[1].set_xticks(range(len(names)), names)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("fewer bytes than dense fp32 (×, log)")
    axes[1].set_ylabel("median step time (ms)")
    for axis in axes:
        axis.legend()
    figure.suptitle("gradient compression, DDP on 2 gloo ranks (loopback, 2 cores)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--epochs", type=int, default=3)
    arguments.add_argument("--methods", default=",".join(METHODS))
    arguments.add_argument("--data-dir", default="/tmp/shardflow-bench/compression")
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"))
    args, _ = _cli.parse(arguments)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "none" not in methods or not set(methods) <= set(METHODS) or args.epochs < 1:
        arguments.error(f"--methods must include none and be among {', '.join(METHODS)}")
    urls = prepare(args.data_dir)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for model in MODELS:
        results[model] = {}
        for method in methods:
            if not args.quiet:
                print(f"training {model} with compression {method}", flush=True)
            out_dir = os.path.join(args.data_dir, "runs", f"{model}-{method}")
            results[model][method] = train(model, method, urls[model], args.epochs, out_dir)
        baseline = results[model]["none"]
        for run in results[model].values():
            if "bytes_per_step" in run:
                run["ratio"] = run["dense_bytes_per_step"] / run["bytes_per_step"]
            run["step_time_ratio"] = run["median_step_s"] / baseline["median_step_s"]
            run["loss_gap"] = run["last_epoch_loss"] - baseline["last_epoch_loss"]
    header = f"  {'model':<6}{'method':<10}{'bytes/step':>12}{'ratio':>8}{'step ms':>9}"
    print(f"\nDDP, 2 ranks, {args.epochs} epochs:\n{header}{'vs none':>9}{'loss gap':>10}")
    for model, runs in results.items():
        for method, run in runs.items():
            sent = run.get("bytes_per_step")
            sent_text = f"{sent:>12,.0f}" if sent else f"{'dense':>12}"
            print(f"  {model:<6}{method:<10}{sent_text}{run.get('ratio', 1.0):>7.1f}×"
                  f"{1000 * run['median_step_s']:>9.1f}{run['step_time_ratio']:>8.2f}×"
                  f"{run['loss_gap']:>+10.4f}")  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": machine(sorted(os.sched_getaffinity(0))),
        "command": " ".join(["python", "tools/bench_compression.py", *sys.argv[1:]]),
        "method": __doc__,
        "results": results,
    }
    with open(os.path.join(args.out, "bench_compression.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    plot(results, os.path.join(args.out, "bench_compression.png"))
    print(f"wrote {args.out}/bench_compression.json and {args.out}/bench_compression.png")
    return 0


if __name__ == "__main__":
    _cli.run(main)
