#!/usr/bin/env python
"""Large-batch training: does an 8× batch with LAMB + warm-up + LR scaling reach the small
batch's loss in the same number of epochs?

    python tools/bench_large_batch.py [--epochs 20] [--factor 8] [--data-dir DIR] [--out reports/]

Three runs of ``trainer.train`` (one process, configs/demo.toml's CNN, our CPU decode) on
scikit-learn's digits — 1,438 to train on, every 5th of the 1,797 held out — for the same
number of epochs:

    small           global batch 32, AdamW lr 0.003 (the demo's optimizer)
    large LAMB      global batch 32 × factor, LAMB, lr 0.01 scaled by √factor
                    (optim.scale_rule = sqrt), 10 warm-up steps, weight decay 0.01
    large AdamW     global batch 32 × factor, AdamW lr 0.003 with the same scaling and
                    warm-up: the control (is it LAMB, or just the schedule?)

A large batch takes factor× fewer steps per epoch; the question is the loss per epoch.
Prints each run's held-out loss and accuracy per epoch and the gaps to the small batch; writes
``<out>/bench_large_batch.json`` (machine, date, command, configs, results) and a PNG of the
held-out loss per epoch.

Measured (2 cores, 20 epochs, factor 8; 880 vs 100 steps): small 0.023 / 99.4 %; large
LAMB 0.036 / 99.2 %; large AdamW 0.048 / 98.6 % (held-out loss / accuracy).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import _cli
from _bench import write_report

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.datasets import write_digits_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_BATCH = 32


def runs(factor: int) -> dict[str, list[str]]:
    large = SMALL_BATCH * factor
    scaled = ["--optim.scale_rule=sqrt", f"--optim.base_batch={SMALL_BATCH}",
              "--optim.warmup_steps=10"]  # fmt: skip
    return {
        "small": [f"--data.global_batch={SMALL_BATCH}"],
        "large LAMB": [
            f"--data.global_batch={large}",
            "--optim.name=lamb",
            "--optim.lr=0.01",
            "--optim.weight_decay=0.01",
            *scaled,
        ],
        "large AdamW": [f"--data.global_batch={large}", "--optim.lr=0.003", *scaled],
    }


def prepare(data_dir: str) -> tuple[str, str]:
    """The digits split into train / held-out shards under data_dir (written once)."""
    train, held = os.path.join(data_dir, "train-ds"), os.path.join(data_dir, "held-ds")
    if all(os.path.exists(os.path.join(p, "index.json")) for p in (train, held)):
        return train, held
    with tempfile.TemporaryDirectory() as folder:
        write_digits_folder(os.path.join(folder, "train"), held_out=os.path.join(folder, "held"))
        for name, output in (("train", train), ("held", held)):
            convert(ConvertConfig(input=os.path.join(folder, name), output=output,
                                  max_shard_samples=256, workers=0, overwrite=True),
                    progress=False)  # fmt: skip
    return train, held


def train(name: str, overrides: list[str], *, train_url: str, held_url: str, epochs: int,
          out_dir: str) -> dict[str, Any]:  # fmt: skip
    command = [
        sys.executable, "-m", "trainer.train", "--config", os.path.join(REPO, "configs/demo.toml"),
        f"--data.url={train_url}", f"--train.eval_url={held_url}", "--data.audit=false",
        "--data.decode_backend=cpu", "--train.progress=false", "--checkpoint.interval=0",
        "--checkpoint.resume=never", f"--train.out_dir={out_dir}", f"--train.epochs={epochs}",
        *overrides,
    ]  # fmt: skip
    shutil.rmtree(out_dir, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: trainer.train exited {done.returncode}\n{done.stderr[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    evals = [r for r in records if r["event"] == "eval"]
    end = next(r for r in records if r["event"] == "end")
    return {
        "overrides": overrides,
        "steps": end["steps"],
        "samples_per_s": end["samples_per_s"],
        "held_out_loss": [e["loss"] for e in evals],
        "held_out_accuracy": [e["accuracy"] for e in evals],
    }


def plot(results: dict[str, dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for (name, result), colour in zip(results.items(), ("grey", "tab:blue", "tab:orange"),
                                      strict=False):  # fmt: skip
        losses = result["held_out_loss"]
        axis.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3, color=colour,
                  label=f"{name} ({result['steps']} steps)")  # fmt: skip
    axis.set_yscale("log")
    axis.set_xlabel("epoch")
    axis.set_ylabel("held-out loss (log)")
    axis.set_title(title, fontsize=10)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--epochs", type=int, default=20)
    arguments.add_argument("--factor", type=int, default=8, help="large batch ÷ small batch")
    arguments.add_argument("--data-dir", default="/tmp/shardflow-bench/large-batch")
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"))
    args, _ = _cli.parse(arguments)
    if args.epochs < 1 or args.factor < 2:
        arguments.error("--epochs must be >= 1 and --factor >= 2")
    train_url, held_url = prepare(args.data_dir)
    results: dict[str, dict[str, Any]] = {}
    for name, overrides in runs(args.factor).items():
        if not args.quiet:
            print(f"training: {name} ({' '.join(overrides)})", flush=True)
        out_dir = os.path.join(args.data_dir, "runs", name.replace(" ", "-"))
        results[name] = train(name, overrides, train_url=train_url, held_url=held_url,
                              epochs=args.epochs, out_dir=out_dir)  # fmt: skip
    small = results["small"]
    print(f"\nheld-out loss / accuracy after {args.epochs} epochs (batch {SMALL_BATCH} vs "
          f"{SMALL_BATCH * args.factor}):")  # fmt: skip
    print(f"  {'run':<12}{'steps':>7}{'loss':>9}{'accuracy':>10}{'loss gap':>10}{'acc gap':>9}")
    for name, result in results.items():
        loss, accuracy = result["held_out_loss"][-1], result["held_out_accuracy"][-1]
        result["loss_gap"] = loss - small["held_out_loss"][-1]
        result["accuracy_gap"] = accuracy - small["held_out_accuracy"][-1]
        print(f"  {name:<12}{result['steps']:>7}{loss:>9.4f}{accuracy:>10.2%}"
              f"{result['loss_gap']:>+10.4f}{result['accuracy_gap']:>+9.2%}")  # fmt: skip
    fields = {"epochs": args.epochs, "factor": args.factor, "results": results}
    write_report(args.out, "bench_large_batch", __doc__, fields)
    title = (f"digits, {args.epochs} epochs: batch {SMALL_BATCH} vs {SMALL_BATCH * args.factor} "
             "(LAMB / AdamW, √ scaling + warm-up)")  # fmt: skip
    plot(results, os.path.join(args.out, "bench_large_batch.png"), title)
    print(f"wrote {args.out}/bench_large_batch.json and {args.out}/bench_large_batch.png")
    return 0


if __name__ == "__main__":
    _cli.run(main)
