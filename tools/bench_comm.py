#!/usr/bin/env python
"""Communication strategies: bytes per rank per step, measured on the wire, beside the
communication model's prediction, and step time — one run.

    python tools/bench_comm.py [--ranks 4] [--node-size 2] [--steps 20]
                               [--strategies ring,flat,hierarchical,hierarchical+bf16,
                                gossip-ring,gossip-exponential,local_sgd]
                               [--data-dir DIR] [--out reports/]

``trainer.train`` under ``torchrun`` (gloo, one machine: every byte goes over loopback) trains
the GPT at its default size (dim 128, 4 layers, vocabulary 1,024) on 512 counting sequences
with each ``parallel.allreduce`` strategy and each ``parallel.decentralized`` one (local SGD
averaging every 8 steps); ``hierarchical`` treats ``--node-size`` ranks as a node.

The bytes come from the kernel's counter of the loopback interface (``/proc/net/dev``): each
strategy runs twice, for 4 and for ``--steps`` steps, and the difference divided by the
extra steps and the ranks is what one rank sent per step — start-up, rendezvous and the
final checkpoint cancel out. Nothing else may use loopback meanwhile. The prediction is
``trainer.comm.model`` for the model's gradient bytes, with gloo's reduce-scatter (it sends
as much as an all-reduce; NCCL's column shows the true ring's). Writes ``<out>/bench_comm.json`` and
a PNG.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from typing import Any

import _cli
from _bench import write_report
from bench_compression import prepare

from trainer.comm.model import cost, format_table, loopback_bytes, table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (trainer overrides, the comm model's strategy, its compression factor)
STRATEGIES: dict[str, tuple[list[str], str, float]] = {
    "ring": ([], "ring", 1.0),
    "flat": (["--parallel.allreduce=flat"], "flat", 1.0),
    "hierarchical": (["--parallel.allreduce=hierarchical"], "hierarchical", 1.0),
    "hierarchical+bf16": (["--parallel.allreduce=hierarchical", "--compression.method=bf16"],
                          "hierarchical", 2.0),
    "gossip-ring": (["--parallel.decentralized=gossip"], "gossip-ring", 1.0),
    "gossip-exponential": (["--parallel.decentralized=gossip",
                            "--parallel.gossip_graph=exponential"], "gossip-exponential", 1.0),
    "local_sgd": (["--parallel.decentralized=local_sgd", f"--parallel.local_steps={8}"],
                  "local_sgd", 1.0),
}  # fmt: skip
LOCAL_STEPS = 8
GPT = ["--model.name=gpt", "--model.gpt.seq_len=32", "--data.label_field=",
       "--data.global_batch=32", "--data.shuffle_window=2", "--optim.lr=0.003"]  # fmt: skip
SHORT = 4


def gradient_bytes() -> int:
    import torch

    from trainer.config import GPTConfig, ModelConfig
    from trainer.models import build_model

    with torch.device("meta"):
        model = build_model(ModelConfig(name="gpt", gpt=GPTConfig(seq_len=32)), num_classes=0)
    return 4 * sum(p.numel() for p in model.parameters())


def run(strategy: str, steps: int, ranks: int, node_size: int, url: str, out_dir: str
        ) -> tuple[int, list[dict[str, Any]]]:  # fmt: skip
    """(loopback bytes of the whole run, its step records)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={ranks}", "-m", "trainer.train", *GPT, *STRATEGIES[strategy][0],
        f"--parallel.node_size={node_size}", f"--data.url={url}", f"--train.max_steps={steps}",
        "--train.epochs=100", "--train.progress=false", "--checkpoint.interval=0",
        "--checkpoint.resume=never", "--parallel.consensus_every=0",
        f"--train.out_dir={out_dir}",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO)
    before = loopback_bytes()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    sent = loopback_bytes() - before
    if done.returncode != 0:
        raise RuntimeError(f"{strategy}: trainer exited {done.returncode}\n{done.stderr[-3000:]}")
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        records = [r for r in map(json.loads, handle) if r["event"] == "step"]
    return sent, records


def plot(results: dict[str, dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    positions = range(len(names))
    axes[0].bar([p - 0.2 for p in positions], [results[n]["measured_mb"] for n in names], 0.4,
                label="measured (loopback)")  # fmt: skip
    axes[0].bar([p + 0.2 for p in positions], [results[n]["model_mb"] for n in names], 0.4,
                label="comm model")  # fmt: skip
    axes[0].set_ylabel("MB sent per rank per step")
    axes[0].legend(loc="upper left", fontsize=8)
    axes[0].set_ylim(0, 1.3 * max(results[n]["measured_mb"] for n in names))
    axes[1].bar(positions, [1000 * results[n]["median_step_s"] for n in names], 0.6)
    axes[1].set_ylabel("median step time (ms)")
    for axis in axes:
        axis.set_xticks(list(positions), names, fontsize=8, rotation=30, ha="right")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--ranks", type=int, default=4)
    arguments.add_argument("--node-size", type=int, default=2)
    arguments.add_argument("--steps", type=int, default=20)
    arguments.add_argument("--strategies", default=",".join(STRATEGIES))
    arguments.add_argument("--data-dir", default="/tmp/shardflow-bench/compression")
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"))
    args, _ = _cli.parse(arguments)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies or not set(strategies) <= set(STRATEGIES):
        arguments.error(f"--strategies must be among {', '.join(STRATEGIES)}")
    if args.steps <= SHORT or args.ranks < 2 or args.ranks % args.node_size:
        arguments.error(f"--steps must exceed {SHORT}; --node-size must divide --ranks (>= 2)")
    url = prepare(args.data_dir)["gpt"][0]  # the training split
    gradients = gradient_bytes()
    results: dict[str, dict[str, Any]] = {}
    for strategy in strategies:
        if not args.quiet:
            print(f"training with {strategy}: {SHORT} and {args.steps} steps", flush=True)
        folder = os.path.join(args.data_dir, "comm", strategy)
        short, _ = run(strategy, SHORT, args.ranks, args.node_size, url, folder + "-short")
        long, records = run(strategy, args.steps, args.ranks, args.node_size, url, folder)
        per_rank_step = (long - short) / (args.steps - SHORT) / args.ranks
        _, modelled, factor = STRATEGIES[strategy]
        predicted = cost(modelled, world=args.ranks, node_size=args.node_size,
                         gradient_bytes=gradients, compression=factor,
                         local_steps=LOCAL_STEPS)  # fmt: skip
        on_gloo = cost(modelled, world=args.ranks, node_size=args.node_size,
                       gradient_bytes=gradients, compression=factor, local_steps=LOCAL_STEPS,
                       gloo=True)  # fmt: skip
        results[strategy] = {
            "measured_mb": per_rank_step / 1e6,
            "model_mb": on_gloo.bytes_per_rank / 1e6,
            "model_nccl_mb": predicted.bytes_per_rank / 1e6,
            "measured_over_model": per_rank_step / on_gloo.bytes_per_rank,
            "model_cross_node_mb": predicted.cross_node_bytes_per_rank / 1e6,
            "latency_terms": predicted.latency_terms,
            "median_step_s": statistics.median(r["step_s"] for r in records[2:]),
            "median_comm_s": statistics.median(r.get("comm_s", 0.0) for r in records[2:]),
        }
    print(f"\n{args.ranks} ranks (nodes of {args.node_size}), GPT gradients "
          f"{gradients / 1e6:.2f} MB:")  # fmt: skip
    print(f"  {'strategy':<20}{'measured MB':>12}{'model MB':>10}{'ratio':>7}{'NCCL MB':>9}"
          f"{'cross MB':>10}{'α terms':>8}{'step ms':>9}")  # fmt: skip
    for name, r in results.items():
        print(f"  {name:<20}{r['measured_mb']:>12.2f}{r['model_mb']:>10.2f}"
              f"{r['measured_over_model']:>7.2f}{r['model_nccl_mb']:>9.2f}"
              f"{r['model_cross_node_mb']:>10.2f}{r['latency_terms']:>8.4g}"
              f"{1000 * r['median_step_s']:>9.1f}")  # fmt: skip
    planning = table(world=1024, node_size=8, gradient_bytes=gradients, compression=2.0,
                     local_steps=LOCAL_STEPS)  # fmt: skip
    print("\nthe same gradients on 1,024 ranks in nodes of 8 (model only):")
    print(format_table(planning))
    title = (f"communication strategies: {args.ranks} gloo ranks on loopback, nodes of "
             f"{args.node_size}, GPT {gradients / 1e6:.1f} MB of gradients")  # fmt: skip
    path = write_report(args.out, "bench_comm", __doc__, {
        "ranks": args.ranks, "node_size": args.node_size, "steps": args.steps,
        "gradient_bytes": gradients, "results": results,
        "planning_1024x8": [c.__dict__ for c in planning],
    })  # fmt: skip
    plot(results, os.path.join(args.out, "bench_comm.png"), title)
    print(f"\nreport: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
