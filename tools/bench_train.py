#!/usr/bin/env python
"""Training step time with the real loader vs with the same batches pre-loaded in memory.

    python tools/bench_train.py [--config FILE] [--steps N] [--warmup 3] [--repeat 2]
                                [--scenarios digits,digits-dali,photos,photos-dali]
                                [--count 1000] [--quiet]
                                [--data-dir /tmp/shardflow-bench/train] [--out reports/]
                                [--section.key=value ...]

One process (world size 1) built from the trainer's own pieces: ``parallelize`` (a fresh
model from the same seed for every leg), ``build_optimizer``, the learning-rate schedule,
``forward_backward``, timed as trainer/train.py times a step. Two legs on the same batches:

    loader      a dataflow.Loader driven as the trainer drives it (prefetch_next_epoch,
                epoch after epoch); per step the time blocked in next() (the data-wait)
                and the whole step
    preloaded   the same batches, collected beforehand by a separate Loader pass and
                cloned into memory, fed from a list

Each leg runs --warmup steps, then --steps measured ones; legs alternate (loader,
preloaded, loader, …) for --repeat rounds. Per scenario: the median step time of each leg
and their ratio, the loader leg's stall fraction (Σ data-wait ÷ Σ step time; target < 2 %
where decode keeps up with the model), samples/s of each leg, the loader's per-stage
metrics over the measured steps, the rate of the collecting pass (the loader alone, no
model: its capacity on these cores, against the model's demand = the preloaded rate), and
whether every leg computed the same losses step for step (same batches, deterministic CPU
kernels: they should match bit for bit; the report says so either way).

Scenarios: a base config plus overrides; --config FILE replaces every base, and
--section.key=value overrides apply last, to all of them.

    digits        configs/demo.toml's data and model (ResNet width 16, 32 px, batch 64) on
                  scikit-learn's 1,797 digits (PNG), our CPU decoders
    digits-dali   the same with data.decode_backend=dali, as the demo runs it (DALI decodes
                  the PNGs, crops, resizes)
    photos        --count real-photo JPEGs (~33 KB), random-resized-crop 224 + flip, the
                  default ResNet at width 16, batch 16: a step takes far longer than
                  decoding its batch
    photos-dali   the same, decoded, cropped, resized and flipped by DALI on the CPU

The DALI scenarios are skipped (and say so) where DALI is not installed.

Measured (2 cores, 2026-11-26, ``python tools/bench_train.py --quiet``): stall 1.6 % digits
CPU, 1.98 % digits DALI, 0.07 % / 0.12 % photos CPU / DALI; step-time ratios 0.96–1.15;
losses bit-identical in every leg. The digits model's step (~80 ms) is short enough that the
decode threads' GIL-holding Python (a few ms per batch) shows; the photo model's does not.

Writes ``<out>/bench_train.json`` (machine, date, command, each scenario's full config,
results) and ``<out>/bench_train.png``. On 2 cores with OMP_NUM_THREADS=1 the model holds
one core and the decode threads share the other, so the loader leg's step can be slower
than the preloaded one without any stall: the ratio shows that, the stall does not.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import _cli
import torch
from _bench import BenchmarkError, machine, prepare_digits, prepare_photos, prepare_shards

from dataflow.config import split_overrides
from dataflow.metrics import PipelineMetrics
from dataflow.pipeline import Loader
from trainer.config import Config, load
from trainer.models import build_spec
from trainer.optim import build_optimizer, learning_rate, set_learning_rate
from trainer.parallel import build_layout, parallelize
from trainer.step import autocast, clip_gradients, forward_backward, global_mean
from trainer.tasks import build_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.toml")
STALL_TARGET = 0.02
Batch = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    data: str
    """Which data set: 'digits' or 'photos'."""
    base: str | None
    """Config file the overrides apply to (None: the defaults)."""
    overrides: tuple[str, ...]
    steps: int
    """Measured steps per leg unless --steps says otherwise (~15 s a leg on 2 cores)."""


SCENARIOS = {
    "digits": Scenario("digits CNN, CPU decode", "digits", DEMO,
                       ("data.decode_backend=cpu",), 100),
    "digits-dali": Scenario("digits CNN, backend=dali", "digits", DEMO,
                            ("data.decode_backend=dali",), 100),
    "photos": Scenario("photos 224 CNN, CPU decode", "photos", None,
                       ("data.global_batch=16", "model.cnn.width=16"), 10),
    "photos-dali": Scenario("photos 224 CNN, DALI decode", "photos", None,
                            ("data.global_batch=16", "model.cnn.width=16",
                             "data.decode_backend=dali"), 10),
}  # fmt: skip


@dataclasses.dataclass
class Leg:
    losses: list[float] = dataclasses.field(default_factory=list)
    """Every step's loss, warm-up included."""
    step_s: list[float] = dataclasses.field(default_factory=list)
    wait_s: list[float] = dataclasses.field(default_factory=list)
    samples: int = 0
    loader_metrics: dict[str, Any] | None = None


def epochs(loader: Loader) -> Generator[Batch, None, None]:
    """Epoch after epoch, as the trainer asks for them (each next pass was started ahead)."""
    if len(loader) == 0:
        raise BenchmarkError(f"{loader.root} holds less than one global batch")
    while True:
        yield from loader


def train_leg(
    config: Config, batches: Iterator[Batch], *, classes: int, warmup: int, steps: int,
    device: torch.device, start_measuring: Callable[[], object] = lambda: None,
) -> Leg:  # fmt: skip
    """trainer/train.py's step on a fresh model, timed as the trainer times it."""
    if config.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(config.train.seed)
    layout = build_layout(config.parallel, rank=0, world_size=1, device_type=device.type)
    bf16 = config.train.mixed_precision == "bf16"
    spec = build_spec(config.model, num_classes=classes, seed=config.train.seed)
    task = build_task(config, spec.task)
    model = parallelize(
        config.model, config.parallel, layout=layout, device=device, num_classes=classes,
        seed=config.train.seed, activation_checkpointing=config.train.activation_checkpointing,
        bf16=bf16, spec=spec, loss_fn=task.loss,
    )  # fmt: skip
    optimizers = [build_optimizer(config.optim, part.parameters()) for part in model.parts]
    precision = autocast(device, bf16)
    leg, total = Leg(), warmup + steps
    mark = time.perf_counter()
    for step in range(total):
        if step == warmup:
            start_measuring()
        batch = next(batches)
        waited = time.perf_counter() - mark
        inputs, targets = task.split(batch, device)
        lr = learning_rate(config.optim, step, total, global_batch=config.data.global_batch)
        set_learning_rate(optimizers, lr)
        loss = forward_backward(model, inputs, targets, precision=precision)
        if config.train.grad_clip:
            clip_gradients(layout, model.parts, config.train.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        leg.losses.append(global_mean(layout, model, loss))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            leg.step_s.append(time.perf_counter() - mark)
            leg.wait_s.append(waited)
            leg.samples += len(batch["__key__"])
        mark = time.perf_counter()
    return leg


def loader_leg(config: Config, **kwargs: Any) -> Leg:
    loader = Loader(config.data, config.storage, rank=0, world_size=1)
    batches = epochs(loader)
    try:
        # The loader's stage metrics restart with the measured steps.
        leg = train_leg(config, batches, start_measuring=loader.metrics_.reset, **kwargs)
        leg.loader_metrics = loader.metrics()
    finally:
        batches.close()
        loader.close()
    return leg


def collect(config: Config, count: int) -> tuple[list[Batch], float, int]:
    """``count`` batches cloned out of a separate Loader pass; its samples/s; the classes."""
    loader = Loader(config.data, config.storage, rank=0, world_size=1)
    batches = epochs(loader)
    started = time.perf_counter()
    try:
        kept = [{name: value.clone() if torch.is_tensor(value) else value
                 for name, value in next(batches).items()} for _ in range(count)]  # fmt: skip
    finally:
        batches.close()
        loader.close()
    rate = sum(len(batch["__key__"]) for batch in kept) / (time.perf_counter() - started)
    return kept, rate, len(loader.index.metadata.get("classes", []) or [])


def leg_summary(legs: list[Leg]) -> dict[str, Any]:
    step_s = [s for leg in legs for s in leg.step_s]
    wait_s = [w for leg in legs for w in leg.wait_s]
    return {
        "steps": len(step_s),
        "median_step_s": statistics.median(step_s),
        "median_step_s_per_round": [statistics.median(leg.step_s) for leg in legs],
        "samples_per_s": sum(leg.samples for leg in legs) / sum(step_s),
        "data_wait_s": sum(wait_s),
        "median_data_wait_s": statistics.median(wait_s),
        "max_data_wait_s": max(wait_s),
        "stall_fraction": sum(wait_s) / sum(step_s),
        "stall_fraction_per_round": [sum(leg.wait_s) / sum(leg.step_s) for leg in legs],
    }


def run_scenario(
    scenario: Scenario, config: Config, *, steps: int, warmup: int, repeat: int,
    say: Callable[..., None],
) -> dict[str, Any]:  # fmt: skip
    device = torch.device("cpu")
    if torch.cuda.is_available() and config.train.device != "cpu":
        device = torch.device("cuda")
    data = dataclasses.replace(config.data, prefetch_next_epoch=True,
                               device=str(device) if device.type == "cuda" else "")  # fmt: skip
    config = dataclasses.replace(config, data=data)
    preloaded, alone_rate, classes = collect(config, warmup + steps)
    say(f"  the loader alone (collecting {len(preloaded)} batches): {alone_rate:.0f} samples/s")
    options: dict[str, Any] = dict(classes=classes, warmup=warmup, steps=steps, device=device)
    legs: dict[str, list[Leg]] = {"loader": [], "preloaded": []}
    for round_number in range(1, repeat + 1):
        for name in legs:
            if name == "loader":
                leg = loader_leg(config, **options)
            else:
                leg = train_leg(config, iter(preloaded), **options)
            legs[name].append(leg)
            say(f"  round {round_number}/{repeat} {name:<9}: median step "
                f"{1000 * statistics.median(leg.step_s):.1f} ms, stall "
                f"{sum(leg.wait_s) / sum(leg.step_s):.2%}")  # fmt: skip
    loader, memory = leg_summary(legs["loader"]), leg_summary(legs["preloaded"])
    loader["stages_per_round"] = [leg.loader_metrics for leg in legs["loader"]]
    # The loader's own count (queue wait + decode still running): next() holds more than that.
    loader["loader_counted_stall_s"] = sum(leg.loader_metrics["stall_s"] for leg in legs["loader"]
                                           if leg.loader_metrics)  # fmt: skip
    reference = legs["preloaded"][0].losses
    every = legs["loader"] + legs["preloaded"]
    differences = [abs(mine - theirs) for leg in every
                   for mine, theirs in zip(leg.losses, reference, strict=True)]  # fmt: skip
    return {
        "name": scenario.name,
        "config": dataclasses.asdict(config),
        "device": str(device),
        "decode": {"backend": data.decode_backend, "workers": data.decode_workers},
        "global_batch": data.global_batch,
        "warmup_steps": warmup,
        "measured_steps_per_leg": steps,
        "repeat": repeat,
        "loader": loader,
        "preloaded": memory,
        "step_time_ratio": loader["median_step_s"] / memory["median_step_s"],
        "loader_alone_samples_per_s": alone_rate,
        "capacity_over_demand": alone_rate / memory["samples_per_s"],
        "stall_target": STALL_TARGET,
        "stall_target_applies": alone_rate > memory["samples_per_s"],
        "stall_target_met": loader["stall_fraction"] < STALL_TARGET,
        "losses_identical": all(leg.losses == reference for leg in every),
        "max_abs_loss_difference": max(differences),
        "losses": {"first": reference[0], "last": reference[-1]},
    }


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"\n{'scenario':<30}{'loader':>10}{'preloaded':>11}{'ratio':>7}{'stall':>8}"
          f"{'<2%':>5}{'loader/s':>10}{'preload/s':>11}{'alone/s':>9}{'workers':>9}"
          f"{'losses':>11}")  # fmt: skip
    for result in results:
        if "skipped" in result:
            print(f"{result['name']:<30}skipped: {result['skipped']}")
            continue
        loader, memory = result["loader"], result["preloaded"]
        decode = result["decode"]
        print(
            f"{result['name']:<30}{1000 * loader['median_step_s']:>8.1f}ms"
            f"{1000 * memory['median_step_s']:>9.1f}ms{result['step_time_ratio']:>7.3f}"
            f"{loader['stall_fraction']:>8.2%}{'yes' if result['stall_target_met'] else 'NO':>5}"
            f"{loader['samples_per_s']:>10.0f}{memory['samples_per_s']:>11.0f}"
            f"{result['loader_alone_samples_per_s']:>9.0f}"
            f"{decode['workers']:>4} {decode['backend']:<4}"
            f"{'identical' if result['losses_identical'] else 'DIFFER':>11}"
        )


def plot(results: list[dict[str, Any]], path: str, title: str) -> None:
    """One panel per scenario (its own scale): median step time, loader vs preloaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if "skipped" not in r]
    if not shown:
        return
    figure, panels = plt.subplots(1, len(shown), figsize=(3.2 * len(shown) + 0.8, 4.2),
                                  squeeze=False)  # fmt: skip
    for axes, result in zip(panels[0], shown, strict=True):
        times = [1000 * result[leg]["median_step_s"] for leg in ("loader", "preloaded")]
        bars = axes.bar(["real loader", "preloaded"], times, color=["tab:blue", "tab:gray"])
        stall = result["loader"]["stall_fraction"]
        axes.bar_label(bars, labels=[f"{times[0]:.0f} ms\nstall {stall:.2%}",
                                     f"{times[1]:.0f} ms"], padding=3, fontsize=8)  # fmt: skip
        axes.set_title(result["name"], fontsize=9)
        axes.set_ylim(0, max(times) * 1.3)
    panels[0][0].set_ylabel("median step time, ms (lower is better)")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--scenarios", default=",".join(SCENARIOS),
                           help=f"comma-separated, of: {', '.join(SCENARIOS)}")  # fmt: skip
    arguments.add_argument("--steps", type=int, help="measured steps per leg (default: per "
                           "scenario, ~15 s a leg on 2 cores)")  # fmt: skip
    arguments.add_argument("--warmup", type=int, default=3, help="unmeasured steps per leg")
    arguments.add_argument("--repeat", type=int, default=2, help="rounds of (loader, preloaded)")
    arguments.add_argument("--count", type=int, default=1000, help="photos in the photo set")
    arguments.add_argument("--data-dir", default="/tmp/shardflow-bench/train")
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"))
    args, _ = _cli.parse(arguments, argv)  # also checks --config and the overrides
    chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown or not chosen:
        arguments.error(f"--scenarios takes {', '.join(SCENARIOS)}; got {unknown or 'none'}")
    if (args.steps is not None and args.steps < 1) or args.warmup < 0 or args.repeat < 1:
        arguments.error("--steps and --repeat must be >= 1, --warmup >= 0")
    _, user_overrides = split_overrides(argv)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    command = shlex.join(["python", "tools/bench_train.py", *argv])
    urls: dict[str, str] = {}
    results: list[dict[str, Any]] = []
    for key in chosen:
        scenario = SCENARIOS[key]
        overrides = [*scenario.overrides, *user_overrides]
        if scenario.data not in urls:
            folder = os.path.join(args.data_dir, scenario.data)
            if scenario.data == "digits":
                files = prepare_digits(folder, args.quiet)
            else:
                files = prepare_photos(folder, args.count, args.quiet)
            urls[scenario.data] = prepare_shards(folder, folder + "-shards", len(files))
        # Audit off: it would write a line per sample into the trainer's out_dir.
        dataset = [f"data.url={urls[scenario.data]}", "data.audit=false"]
        config = load(args.config or scenario.base, [*dataset, *overrides])
        if config.data.decode_backend == "dali":
            try:
                from dataflow.decode.dali import import_dali

                import_dali()
            except ImportError as error:
                results.append({"name": scenario.name, "skipped": str(error)})
                say(f"{scenario.name}: skipped ({error})")
                continue
        say(f"{scenario.name}:")
        results.append(run_scenario(scenario, config, steps=args.steps or scenario.steps,
                                    warmup=args.warmup, repeat=args.repeat, say=say))  # fmt: skip
    print_table(results)
    for result in results:
        if "skipped" in result:
            continue
        loader = result["loader"]
        met = "met" if result["stall_target_met"] else "NOT met"
        losses = ("identical in both legs" if result["losses_identical"] else
                  f"DIFFER (max |Δ| {result['max_abs_loss_difference']:.3g})")  # fmt: skip
        print(f"{result['name']}: stall < 2 % {met} (capacity ÷ demand "
              f"{result['capacity_over_demand']:.1f}×); data-wait {loader['data_wait_s']:.3f} s, "
              f"of which the loader counted {loader['loader_counted_stall_s']:.3f} s; "
              f"losses {losses}")  # fmt: skip
        stages = result["loader"]["stages_per_round"][-1]
        say(f"  loader stages, last round's measured steps:\n{PipelineMetrics.summary(stages)}")
    os.makedirs(args.out, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": machine(sorted(os.sched_getaffinity(0))),
        "torch_threads": torch.get_num_threads(),
        "command": command,
        "method": __doc__,
        "scenarios": results,
    }
    with open(os.path.join(args.out, "bench_train.json"), "w") as handle:
        json.dump(report, handle, indent=1, default=str)
    cores = len(os.sched_getaffinity(0))
    plot(results, os.path.join(args.out, "bench_train.png"),
         f"step time, real loader vs preloaded batches ({cores} cores)")  # fmt: skip
    print(f"command: {command}")
    print(f"wrote {args.out}/bench_train.json and {args.out}/bench_train.png")
    return 0


if __name__ == "__main__":
    _cli.run(main)
