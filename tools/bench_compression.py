#!/usr/bin/env python
"""Gradient compression on a bandwidth-limited link: time to accuracy, per method and link.

    python tools/bench_compression.py [--link-mbit 100,1000] [--models gpt,cnn]
                                      [--methods none,bf16,powersgd,topk,sign] [--reuse]
                                      [--ranks 2] [--data-dir DIR] [--out reports/]

For each link rate, ``trainer.train`` runs on 2 (``--ranks``) gloo ranks under ``torchrun``
inside a network namespace whose loopback is a token bucket of that rate
(``tools/shaped_link.py``), so every byte of the gradient all-reduce crosses the shaped link —
the situation compression is for. All ranks share that one bucket.
The two reference models:

    gpt    dim 256, 6 layers, 4 heads, vocabulary 1,024, 32 tokens a sequence: 5,257,728
           parameters (21.0 MB of fp32 gradient a step); 256 training sequences of an affine
           recurrence x ← (a·x + b) mod 64 with 5 % of the tokens replaced at random, batch 32
           (8 steps an epoch), AdamW lr 3e-3, 8 epochs; 256 held-out sequences
    cnn    the ResNet (width 32, 0.33 M parameters) on 4 in 5 of scikit-learn's digits,
           batch 64 (23 steps an epoch), 5 epochs; the 5th of the digits held out

Both evaluate on the held-out split after every epoch (``train.eval_url``). Per method:

    target_time_s       wall time to reach the dense run's held-out loss at 90 % of its steps
                        (the dense curve read at that step; the first crossing of each curve
                        interpolated linearly between evaluations); null when never reached
    speedup             the dense run's time to that target over this method's
    final_eval_loss     held-out loss after the last epoch, and its gap to dense in %
    bytes_per_step      payload each rank sent a step (``comm_bytes``), after the warm-up of
                        ``compression.start_step`` steps (sent whole, in bf16); with it too
    wire_bytes_per_step what crossed the shaped loopback a step, all ranks (tx counter)
    median_step_s       the median training step, evaluation excluded

Wall time counts training steps only: each evaluation's time is taken out, so the curves
compare the training alone. Writes ``<out>/bench_compression_link.json`` and a plot of held-out
loss against wall time, one panel per model × link. Needs root and iproute2 (the namespace).

Measured (``--methods none,bf16,powersgd,powersgd@1.5,topk,topk@2,sign``; the sign rows on
idle cores, the others while the test suite shared the 2 cores): GPT at 100 Mbit/s, dense
3.83 s a step, 222 s to the target (held-out 2.7115), final 2.684; bf16 127 s (1.75×),
+0.16 %; PowerSGD rank 4 0.76 s a compressed step, 13.4× fewer bytes (embedding tables
exact), final +2.1 %, short of the target in 64 steps; with 96 steps it reaches it in 78 s
(2.83× sooner) and ends 3.2 % below dense; top-k 1 % (AdamW's variance frozen at step 20)
+14.6 %, +4.0 % with 128 steps, sign +5.3 %, none of the three reaches it. At 1 Gbit/s the
dense step is 0.87 s: bf16 gains nothing (1.00×), only PowerSGD at 96 steps reaches the target
sooner (1.30×). The CNN (1.3 MB a step) is compute-bound: PowerSGD 2.05× sooner at 100 Mbit/s
with +10.7 % at the end (0.117 against 0.106), 1.09× at 1 Gbit/s.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import _cli
import numpy as np
from _bench import write_report
from shaped_link import shaped_namespace, unavailable

from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import convert
from dataflow.datasets import write_digits_folder
from trainer.config import CompressionConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("none", "bf16", "powersgd", "topk", "sign")
MODELS = {
    "gpt": ["--model.name=gpt", "--model.gpt.dim=256", "--model.gpt.layers=6",
            "--model.gpt.heads=4", "--model.gpt.vocab_size=1024", "--model.gpt.seq_len=32",
            "--data.label_field=", "--data.global_batch=32", "--data.shuffle_window=2",
            "--optim.lr=0.003"],
    "cnn": ["--config", "configs/demo.toml", "--data.decode_backend=cpu", "--data.audit=false",
            "--model.cnn.width=32"],
}  # fmt: skip
EPOCHS = {"gpt": 8, "cnn": 5}
START = CompressionConfig().start_step
TARGET_FRACTION = 0.9
"""The dense run's held-out loss at this share of its steps is the target."""


def prepare(data_dir: str) -> dict[str, tuple[str, str]]:
    """(training split, held-out split) per model, written once."""
    splits = {model: (os.path.join(data_dir, f"{model}-train"),
                      os.path.join(data_dir, f"{model}-held-out"))
              for model in MODELS}  # fmt: skip
    if all(os.path.exists(os.path.join(url, "index.json")) for pair in splits.values()
           for url in pair):  # fmt: skip
        return splits
    with tempfile.TemporaryDirectory() as folder:
        train, held_out = os.path.join(folder, "digits"), os.path.join(folder, "digits-held-out")
        write_digits_folder(train, held_out=held_out)
        for source, output in zip((train, held_out), splits["cnn"], strict=True):
            convert(ConvertConfig(input=source, output=output, max_shard_samples=256, workers=0,
                                  overwrite=True), progress=False)  # fmt: skip
        for seed, output in enumerate(splits["gpt"]):
            source = os.path.join(folder, f"tokens-{seed}.jsonl")
            write_sequences(source, count=256, seed=seed)
            convert(ConvertConfig(input=source, output=output, format="parquet", key_field="id",
                                  row_group_rows=32, max_shard_samples=128, workers=0,
                                  overwrite=True), progress=False)  # fmt: skip
    return splits


def write_sequences(path: str, *, count: int, seed: int) -> None:
    """``count`` sequences of 33 tokens, x ← (a·x + b) mod 64 from a random start, with 5 % of
    the tokens replaced by random ones: a rule to infer from the context, and a floor on the
    loss (the noise) that keeps a relative gap meaningful."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for number in range(count):
            a, b = int(rng.choice([1, 3, 5, 7])), int(rng.integers(1, 9))
            tokens = [int(rng.integers(0, 64))]
            for _ in range(32):
                tokens.append((a * tokens[-1] + b) % 64)
            for position in np.flatnonzero(rng.random(33) < 0.05):
                tokens[position] = int(rng.integers(0, 64))
            handle.write(json.dumps({"id": f"seq{seed}-{number:04d}", "tokens": tokens}) + "\n")


def command(model: str, method: str, splits: tuple[str, str], out_dir: str,
            ranks: int = 2) -> list[str]:  # fmt: skip
    """The trainer's command line; ``method@F`` trains F times the model's epochs."""
    method, _, factor = method.partition("@")
    epochs = round(EPOCHS[model] * float(factor or 1))
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
        "-m", "trainer.train", *MODELS[model], f"--train.epochs={epochs}",
        f"--data.url={splits[0]}", f"--train.eval_url={splits[1]}", "--train.progress=false",
        "--checkpoint.interval=0", "--checkpoint.resume=never", f"--train.out_dir={out_dir}",
        f"--compression.method={method}",
    ]  # fmt: skip


def train(argv: list[str], link_mbit: float, out_dir: str, reuse: bool) -> dict[str, Any]:
    """One run in a fresh namespace at ``link_mbit`` (or its earlier result, with ``reuse``)."""
    saved = os.path.join(out_dir, "run.json")
    if reuse and os.path.exists(saved):
        with open(saved) as handle:
            run: dict[str, Any] = json.load(handle)
        if run["argv"] == argv and run["link_mbit"] == link_mbit:
            return run
    shutil.rmtree(out_dir, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    with shaped_namespace(link_mbit) as namespace:
        before = namespace.tx_bytes()
        process = subprocess.Popen(namespace.command(argv), cwd=REPO, env=env, text=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)  # fmt: skip
        try:
            _, errors = process.communicate()
        finally:
            if process.poll() is None:  # stopped: torchrun ends its ranks (sessions of their own)
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        wire = namespace.tx_bytes() - before
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exited {process.returncode}\n{errors[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    run = {"argv": argv, "link_mbit": link_mbit, "wire_bytes": wire, "records": records}
    with open(saved, "w") as handle:
        json.dump(run, handle)
    return run


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    """Step time, bytes and the held-out curve (step, training wall time, loss) of one run."""
    records = [r for r in run["records"] if r["event"] in ("step", "eval")]
    steps = [r for r in records if r["event"] == "step"]
    # Training wall time: from the first step's start, less every evaluation's duration (an
    # evaluation runs after the last step of an epoch, before the next step starts).
    started = steps[0]["time"] - steps[0]["step_s"]
    evaluating, last_step_time, curve = 0.0, started, []
    for record in records:
        if record["event"] == "step":
            last_step_time = record["time"]
            continue
        curve.append((record["step"], last_step_time - started - evaluating, record["loss"]))
        evaluating += record["time"] - last_step_time
    # Compressed steps: after the warm-up (sent whole, in bf16), when the compressor has one.
    compressed = [r for r in steps if r["step"] > START and "comm_bytes" in r]
    summary: dict[str, Any] = {
        "steps": len(steps),
        "median_step_s": statistics.median(r["step_s"] for r in steps[2:]),
        "median_comm_s": statistics.median(r.get("comm_s", 0.0) for r in steps[2:]),
        "train_wall_s": curve[-1][1],
        "final_eval_loss": curve[-1][2],
        "curve": [{"step": s, "wall_s": round(w, 3), "loss": loss} for s, w, loss in curve],
        "wire_bytes_per_step": run["wire_bytes"] / len(steps),
        "dense_steps": len(steps) - len(compressed),
    }
    if compressed:
        summary["bytes_per_step"] = statistics.mean(r["comm_bytes"] for r in compressed)
        summary["bytes_per_step_with_warm_up"] = statistics.mean(r["comm_bytes"] for r in steps)
        summary["dense_bytes_per_step"] = statistics.mean(r["comm_bytes_dense"] for r in steps)
    return summary


def crossing(curve: list[dict[str, Any]], target: float, key: str) -> float | None:
    """``key`` (step or wall_s) where the held-out loss first reaches ``target``, linear between
    the evaluations around the crossing; None when it never does."""
    for before, after in zip([None, *curve[:-1]], curve, strict=True):
        if after["loss"] > target:
            continue
        if before is None or before["loss"] == after["loss"]:
            return float(after[key])
        share = (before["loss"] - target) / (before["loss"] - after["loss"])
        return float(before[key] + share * (after[key] - before[key]))
    return None


def loss_at(curve: list[dict[str, Any]], step: float) -> float:
    """The held-out loss read at ``step``, linear between evaluations."""
    for before, after in itertools.pairwise(curve):
        if before["step"] <= step <= after["step"]:
            share = (step - before["step"]) / (after["step"] - before["step"])
            return float(before["loss"] + share * (after["loss"] - before["loss"]))
    return float(curve[-1]["loss"] if step >= curve[-1]["step"] else curve[0]["loss"])


def compare(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Target, times to it, speedups and loss gaps against the dense run (``none``)."""
    dense = runs["none"]
    target = loss_at(dense["curve"], TARGET_FRACTION * dense["steps"])
    dense_time = crossing(dense["curve"], target, "wall_s")
    full = next((run["dense_bytes_per_step"] for run in runs.values()
                 if "dense_bytes_per_step" in run), None)  # fmt: skip
    for run in runs.values():
        run.setdefault("bytes_per_step", full)
        run["ratio"] = full / run["bytes_per_step"] if full and run["bytes_per_step"] else 1.0
        run["target_time_s"] = crossing(run["curve"], target, "wall_s")
        run["target_step"] = crossing(run["curve"], target, "step")
        reached = run["target_time_s"]
        run["speedup"] = dense_time / reached if dense_time and reached else None
        run["final_gap_percent"] = 100 * (run["final_eval_loss"] / dense["final_eval_loss"] - 1)
        run["step_time_ratio"] = run["median_step_s"] / dense["median_step_s"]
    return {"target_loss": target, "target_step": TARGET_FRACTION * dense["steps"],
            "methods": runs}  # fmt: skip


def plot(results: dict[str, dict[str, Any]], path: str, ranks: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4), squeeze=False)
    for axis, name in zip(axes[0], names, strict=True):
        for method, run in results[name]["methods"].items():
            walls = [point["wall_s"] for point in run["curve"]]
            losses = [point["loss"] for point in run["curve"]]
            axis.plot(walls, losses, marker="o", markersize=3, label=method)
        axis.axhline(results[name]["target_loss"], color="grey", linestyle=":", linewidth=1)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("training wall time (s)")
        axis.set_ylabel("held-out loss")
        axis.set_yscale("log")
        axis.legend(fontsize=8)
    figure.suptitle(f"gradient compression on a shaped link: {ranks} gloo ranks, 2 shared cores "
                    "(dotted: dense loss at 90 % of its steps)", fontsize=10)  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--link-mbit", default="100,1000")
    arguments.add_argument("--models", default=",".join(MODELS))
    arguments.add_argument("--methods", default=",".join(METHODS),
                           help="method@F trains F times the epochs (time to accuracy lets a "
                                "cheaper step take more of them)")  # fmt: skip
    arguments.add_argument(
        "--reuse",
        action="store_true",
        help="keep a run's earlier result when its command is unchanged",
    )
    arguments.add_argument("--ranks", type=int, default=2,
                           help="ranks on the shaped link (not 2: the report is "
                                "bench_compression_link_<N>ranks)")  # fmt: skip
    arguments.add_argument("--data-dir", default="/tmp/shardflow-bench/compression-link")
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"))
    args, _ = _cli.parse(arguments)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "none" not in methods or not {m.partition("@")[0] for m in methods} <= set(METHODS):
        arguments.error(f"--methods must include none and be among {', '.join(METHODS)}"
                        " (method@F: F times the epochs, e.g. powersgd@1.5)")  # fmt: skip
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or not set(models) <= set(MODELS):
        arguments.error(f"--models must be among {', '.join(MODELS)}")
    try:
        links = [float(rate) for rate in args.link_mbit.split(",") if rate.strip()]
    except ValueError:
        arguments.error(f"--link-mbit takes rates in Mbit/s like 100,1000, got {args.link_mbit!r}")
    if not links or min(links) <= 0:
        arguments.error(f"--link-mbit rates must be positive, got {args.link_mbit!r}")
    if args.ranks < 2:
        arguments.error(f"--ranks must be >= 2 (compression has nothing to send alone), got "
                        f"{args.ranks}")  # fmt: skip
    suffix = "" if args.ranks == 2 else f"_{args.ranks}ranks"
    reason = unavailable()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    splits = prepare(args.data_dir)
    results: dict[str, dict[str, Any]] = {}
    commands: dict[str, str] = {}
    for model in models:
        for rate in links:
            name = f"{model} {rate:g} Mbit/s"
            runs = {}
            for method in methods:
                if not args.quiet:
                    print(f"training {name} with compression {method}", flush=True)
                run_name = f"{model}-{rate:g}-{method}" + suffix
                out_dir = os.path.join(args.data_dir, "runs", run_name)
                argv = command(model, method, splits[model], out_dir, args.ranks)
                commands[f"{name} {method}"] = " ".join(
                    ["python", "tools/shaped_link.py", f"--rate-mbit={rate:g}", "--", *argv[1:]]
                )
                runs[method] = summarise(train(argv, rate, out_dir, args.reuse))
            results[name] = compare(runs)
            print_table(name, results[name])
    report = "bench_compression_link" + suffix
    write_report(args.out, report, __doc__, {"results": results, "commands": commands,
                                             "ranks": args.ranks})  # fmt: skip
    plot(results, os.path.join(args.out, f"{report}.png"), args.ranks)
    print(f"wrote {args.out}/{report}.json and .png")
    return 0


def print_table(name: str, result: dict[str, Any]) -> None:
    print(f"\n{name}: target held-out loss {result['target_loss']:.4f} "
          f"(dense at step {result['target_step']:.1f})")  # fmt: skip
    print(f"  {'method':<10}{'bytes/step':>12}{'ratio':>8}{'step ms':>9}{'to target s':>13}"
          f"{'speedup':>9}{'final loss':>12}{'gap %':>8}")  # fmt: skip
    for method, run in result["methods"].items():
        reached = run["target_time_s"]
        reached_text = f"{reached:>13.1f}" if reached is not None else f"{'never':>13}"
        speedup = f"{run['speedup']:>8.2f}×" if run["speedup"] else f"{'-':>9}"
        sent = run["bytes_per_step"] or 0
        print(f"  {method:<10}{sent:>12,.0f}{run['ratio']:>7.1f}×"
              f"{1000 * run['median_step_s']:>9.0f}{reached_text}{speedup}"
              f"{run['final_eval_loss']:>12.4f}{run['final_gap_percent']:>+8.2f}")  # fmt: skip


if __name__ == "__main__":
    _cli.run(main)
