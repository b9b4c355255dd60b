#!/usr/bin/env python
"""Gradient compression: bytes per step, step time and loss for each method, one run.

    python tools/bench_compression.py [--epochs 3] [--methods none,bf16,powersgd,topk,sign]
                                      [--layouts ddp,hsdp] [--data-dir DIR] [--out reports/]

``trainer.train`` under ``torchrun`` over gloo on loopback, for each method, on the two
reference models at the trainer's default sizes (``[model]``'s defaults):

    cnn    the ResNet (width 32) on scikit-learn's 1,797 digits, batch 64
    gpt    the GPT (dim 128, 4 layers, vocabulary 1,024) on 512 counting sequences of 33
           tokens, batch 32

and two layouts:

    ddp    2 ranks, DDP: the compressor is DDP's comm hook
    hsdp   4 ranks, dp_replicate 2 × dp_shard 2: FSDP2's reduce-scatter inside the shard
           group stays exact; the compressor averages each shard over the replicate group,
           and its bytes are those of that cross-group all-reduce

Per run: the bytes each rank sent per step (``comm_bytes`` in metrics.jsonl) against a dense
fp32 all-reduce's (``comm_bytes_dense``), their ratio, the median step time, and the mean
training loss of the last epoch beside the uncompressed run's. The compressors send dense for
their first steps (PowerSGD: ``compression.powersgd_start_step``, here 5; top-k and sign: 2),
so the bytes are those of the compressed steps. Writes ``<out>/bench_compression.json`` and a
PNG (bytes ratio and step time per method).

Measured (2 cores, 3 epochs), bytes ratios CNN / GPT: DDP — bf16 2.0 / 2.0, PowerSGD rank 4
12.9 / 21.5, top-k 1 % 50.0 / 50.1, sign 31.0 / 31.0; HSDP (replicate all-reduce of the
shards) — 2.0 / 2.0, 6.4 / 15.3, 49.7 / 50.1, 30.9 / 31.0. PowerSGD gains least where the
matrices are small: the CNN's 32×288 convolutions give at most 7.2× at rank 4, and a shard
is half a matrix. On loopback the step gets no faster (0.95–1.37× the uncompressed step):
there is no slow link to save.
"""

from __future__ import annotations

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
from _bench import write_report

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.datasets import write_digits_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("none", "bf16", "powersgd", "topk", "sign")
MODELS = {
    "cnn": ["--config", "configs/demo.toml", "--data.decode_backend=cpu", "--data.audit=false",
            "--model.width=32"],
    "gpt": ["--model.name=gpt", "--model.seq_len=32", "--data.label_field=",
            "--data.global_batch=32", "--data.shuffle_window=2", "--optim.lr=0.003"],
}  # fmt: skip
LAYOUTS = {
    "ddp": ["--nproc-per-node=2"],
    "hsdp": ["--nproc-per-node=4", "--parallel.dp_replicate=2", "--parallel.dp_shard=2"],
}
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


def train(
    layout: str, model: str, method: str, url: str, epochs: int, out_dir: str
) -> dict[str, Any]:
    shutil.rmtree(out_dir, ignore_errors=True)
    processes, *parallel = LAYOUTS[layout]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", processes,
        "-m", "trainer.train", *MODELS[model], *parallel, f"--data.url={url}",
        f"--train.epochs={epochs}",
        "--train.progress=false", "--checkpoint.interval=0", "--checkpoint.resume=never",
        f"--train.out_dir={out_dir}", f"--compression.method={method}",
        f"--compression.powersgd_start_step={START}",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{layout}/{model}/{method}: trainer exited {done.returncode}\n"
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

    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(results)
    for number, (model, runs) in enumerate(results.items()):
        offset = (number - (len(results) - 1) / 2) * width
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
    figure.suptitle(
        "gradient compression: DDP on 2 gloo ranks, HSDP 2×2 on 4 (replicate bytes); "
        "loopback, 2 cores",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--epochs", type=int, default=3)
    arguments.add_argument("--methods", default=",".join(METHODS))
    arguments.add_argument("--layouts", default=",".join(LAYOUTS))
    arguments.add_argument("--data-dir", default="/tmp/shardflow-bench/compression")
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"))
    args, _ = _cli.parse(arguments)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "none" not in methods or not set(methods) <= set(METHODS) or args.epochs < 1:
        arguments.error(f"--methods must include none and be among {', '.join(METHODS)}")
    layouts = [m.strip() for m in args.layouts.split(",") if m.strip()]
    if not layouts or not set(layouts) <= set(LAYOUTS):
        arguments.error(f"--layouts must be among {', '.join(LAYOUTS)}")
    urls = prepare(args.data_dir)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for layout, model in ((layout, model) for layout in layouts for model in MODELS):
        name = f"{layout} {model}"
        results[name] = {}
        for method in methods:
            if not args.quiet:
                print(f"training {model} ({layout}) with compression {method}", flush=True)
            out_dir = os.path.join(args.data_dir, "runs", f"{layout}-{model}-{method}")
            results[name][method] = train(layout, model, method, urls[model], args.epochs,
                                          out_dir)  # fmt: skip
        baseline = results[name]["none"]
        for run in results[name].values():
            if "bytes_per_step" in run:
                run["ratio"] = run["dense_bytes_per_step"] / run["bytes_per_step"]
            run["step_time_ratio"] = run["median_step_s"] / baseline["median_step_s"]
            run["loss_gap"] = run["last_epoch_loss"] - baseline["last_epoch_loss"]
    header = f"  {'run':<10}{'method':<10}{'bytes/step':>12}{'ratio':>8}{'step ms':>9}"
    print(f"\n{args.epochs} epochs:\n{header}{'vs none':>9}{'loss gap':>10}")
    for name, runs in results.items():
        for method, run in runs.items():
            sent = run.get("bytes_per_step")
            sent_text = f"{sent:>12,.0f}" if sent else f"{'dense':>12}"
            print(f"  {name:<10}{method:<10}{sent_text}{run.get('ratio', 1.0):>7.1f}×"
                  f"{1000 * run['median_step_s']:>9.1f}{run['step_time_ratio']:>8.2f}×"
                  f"{run['loss_gap']:>+10.4f}")  # fmt: skip
    write_report(args.out, "bench_compression", __doc__, {"results": results})
    plot(results, os.path.join(args.out, "bench_compression.png"))
    print(f"wrote {args.out}/bench_compression.json and {args.out}/bench_compression.png")
    return 0


if __name__ == "__main__":
    _cli.run(main)
