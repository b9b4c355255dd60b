"""Entry point: ``[torchrun --nproc-per-node N] python -m trainer.train --config FILE [--s.k=v …]``.

One process without torchrun; with it, one per rank (c10d rendezvous, multi-node as torchrun
does it). Backend NCCL with CUDA, gloo on CPU. The loop:

    resume (latest complete checkpoint, if any) ─▶ for each epoch: for each batch:
        wait for the loader (timed: data-wait) ─▶ forward/backward (+ comm overlap)
        ─▶ clip, lr, optimizer step ─▶ metrics line ─▶ checkpoint every `interval` steps
    ─▶ evaluate on the held-out split after each epoch ─▶ final checkpoint, plot

Around it: rank 0 holds a lease on ``train.out_dir`` (``trainer.lease``: a second job there
is refused); SIGTERM or the torchrun agent's death stops all ranks after the same step with
a checkpoint (``trainer.preemption``); a requeued job whose checkpoint is already the last
step says so and exits 0.

The loader reads ahead and decodes on its own threads while the step computes, and (on a
GPU) copies the next batch on a side stream; the data-wait time per step is what is left
over — the stall — and is logged with its share of the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import logging
import math
import os
import sys
import time
import uuid
import warnings
from typing import Any

import torch
import torch.distributed as dist

from dataflow.config import ConfigError, dumps_toml, split_overrides
from dataflow.errors import DataError
from dataflow.pipeline import Loader
from dataflow.storage import StorageError
from trainer.checkpoint import Checkpointer, RankState
from trainer.comm import build_decentralized
from trainer.config import Config, load
from trainer.lease import Lease, OutDirBusyError
from trainer.metrics import TrainMetrics
from trainer.optim import build_optimizer, learning_rate, set_learning_rate
from trainer.parallel import Layout, ParallelModel, build_layout, parallelize
from trainer.preemption import EXIT_CODE, Stopped, StopRequest
from trainer.step import autocast, clip_gradients, evaluate, forward_backward, global_mean
from trainer.tasks import split_batch

log = logging.getLogger("trainer")


def _device(config: Config) -> torch.device:
    wanted = config.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but CUDA is not available; use 'auto' or 'cpu'")
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


class RendezvousError(Exception):
    """The ranks did not form a process group in time."""


def _setup_process_group(device: torch.device, timeout_s: float) -> tuple[int, int]:
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # The timeout bounds the store connection and gloo's full-mesh connect as well as
        # later collectives: a rank whose peers never come fails instead of waiting on.
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, dist.DistError) as error:
            first = (str(error).strip().splitlines() or [""])[0][-200:]
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise RendezvousError(
                f"rank {rank} of {world_size}: the process group did not form within "
                f"train.collective_timeout_s = {timeout_s:g} s ({type(error).__name__}: "
                f"{first}); check that all {world_size} ranks started and reach {where}"
            ) from error
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    if rank == 0 and restarts and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") != "1":
        log.warning(
            "torchrun --max-restarts without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: "
            "restarted workers may connect to the dead round's addresses and fail "
            "(see the README on restarts)"
        )
    return rank, world_size


def _take_lease(out_dir: str, run_id: str, rank: int, world_size: int) -> Lease | None:
    """Rank 0 takes the lease on ``out_dir``; every rank raises if it was refused."""
    refusal, lease = "", None
    if rank == 0:
        lease = Lease(out_dir, run_id)
        try:
            lease.acquire()
        except (OutDirBusyError, OSError) as error:
            refusal = str(error)
    if world_size > 1:
        verdict = [refusal]
        dist.broadcast_object_list(verdict, src=0)
        refusal = verdict[0]
    if refusal:
        raise OutDirBusyError(refusal)
    return lease


def _determinism(config: Config, device: torch.device) -> None:
    if config.train.deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(config.train.seed)


def _merged_loader_state(loader: Loader, world_size: int) -> dict[str, Any]:
    """The loader position with the samples that any rank skipped (the same on all ranks)."""
    state = loader.state_dict()
    if world_size > 1:
        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, state[Loader.STATE_SKIPPED])
        state[Loader.STATE_SKIPPED] = sorted({tuple(s) for part in everyone for s in part})
        state[Loader.STATE_SKIPPED] = [list(s) for s in state[Loader.STATE_SKIPPED]]
    return state


def train(config: Config) -> dict[str, Any]:
    """Run the configured training; returns the end-of-run summary (the same on all ranks).
    Raises ``Stopped`` after the checkpoint a stop request (SIGTERM) asked for."""
    device = _device(config)
    rank, world_size = _setup_process_group(device, config.train.collective_timeout_s)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    # Before anything touches out_dir: the loader's audit log, the checkpointer's clean-up.
    lease = _take_lease(config.train.out_dir, run_id, rank, world_size)
    stop = StopRequest(world_size=world_size, device=device)
    # Whose lease this job took over (a dead holder's, as after a kill -9 or a restart).
    previous = lease.took_over if lease is not None else None
    took_over = f"pid {previous.get('pid')} on {previous.get('host')}" if previous else ""
    try:
        return _train(config, device, rank, world_size, run_id, stop, took_over)
    finally:
        stop.close()
        if lease is not None:
            lease.release()


def _train(config: Config, device: torch.device, rank: int, world_size: int, run_id: str,
           stop: StopRequest, took_over: str) -> dict[str, Any]:  # fmt: skip
    _determinism(config, device)
    layout = build_layout(config.parallel, rank=rank, world_size=world_size,
                          device_type=device.type)  # fmt: skip
    out_dir = config.train.out_dir
    # TP/PP peers share a data-parallel rank, hence its audit file: one of them writes it.
    audit = config.data.audit and layout.tp_rank == 0 and layout.pp_rank == 0
    # The next epoch's reading and decoding start while this one ends (the loader is closed
    # in the finally below, which stops that pass if training ends first).
    data = dataclasses.replace(config.data, out_dir=out_dir, audit=audit, prefetch_next_epoch=True)
    if device.type == "cuda" and not data.device:
        data = dataclasses.replace(data, device=str(device))
    loader = Loader(data, config.storage, rank=layout.dp_rank, world_size=layout.dp_world)
    classes = len(loader.index.metadata.get("classes", []) or [])
    bf16 = config.train.mixed_precision == "bf16"
    model = parallelize(
        config.model, config.parallel, layout=layout, device=device, num_classes=classes,
        seed=config.train.seed, activation_checkpointing=config.train.activation_checkpointing,
        bf16=bf16, compression=config.compression,
    )  # fmt: skip
    if layout.pp > 1 and loader.per_rank_batch % config.parallel.microbatches:
        raise ValueError(
            f"the per-rank batch {loader.per_rank_batch} does not split into "
            f"parallel.microbatches = {config.parallel.microbatches}"
        )
    optimizers = [build_optimizer(config.optim, part.parameters()) for part in model.parts]
    # FSDP casts parameters itself; autocast covers the other layouts.
    precision = autocast(device, bf16 and model.strategy not in ("fsdp", "hsdp", "replicate"))
    mixer = build_decentralized(config.parallel, model.parts, optimizers, layout)
    rank_states: dict[str, RankState] = {}
    if model.compressor is not None:
        rank_states["compression"] = model.compressor
    if mixer is not None:
        rank_states["decentral"] = mixer
    checkpointer = Checkpointer(
        config.checkpoint, config.checkpoint.dir or os.path.join(out_dir, "checkpoints"),
        parts=model.parts, optimizers=optimizers, rank=rank, world_size=world_size,
        rank_states=rank_states,
    )  # fmt: skip
    step, resumed_from = 0, ""
    latest = checkpointer.latest() if config.checkpoint.resume == "auto" else None
    if latest is not None:
        state = checkpointer.load(latest)
        loader.load_state_dict(state["loader"])
        step, resumed_from = int(state["step"]), latest
    steps_per_epoch = len(loader)
    total_steps = config.train.epochs * steps_per_epoch
    if config.train.max_steps:
        total_steps = min(total_steps, config.train.max_steps)
    metrics = TrainMetrics(out_dir, enabled=rank == 0, progress=config.train.progress,
                           total_steps=total_steps, initial_step=step, run_id=run_id)  # fmt: skip
    metrics.event(
        "start", world_size=world_size, layout=layout.describe(), strategy=model.strategy,
        device=str(device), step=step, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        global_batch=data.global_batch, resumed_from=resumed_from,
        restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)), lease_taken_from=took_over,
    )  # fmt: skip
    if resumed_from and step >= total_steps:
        # A requeued job that had finished: nothing to train, and no second save of the
        # step its checkpoint holds.
        loader.close()
        log.info("already complete: step %d of %d in %s", step, total_steps, resumed_from)
        complete = {"steps": step, "total_steps": total_steps, "checkpoint": resumed_from,
                    "complete": True, "steps_this_run": 0}  # fmt: skip
        metrics.event("end", **complete)
        metrics.close()
        return complete
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.toml"), "w", encoding="utf-8") as handle:
            handle.write(dumps_toml(dataclasses.asdict(config)))

    def split(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return split_batch(config.model, batch, device)

    def save() -> None:
        started = time.perf_counter()
        position = _merged_loader_state(loader, world_size)
        checkpointer.save(step, {"step": step, "loader": position, "world_size": world_size,
                                 "layout": layout.describe()})  # fmt: skip
        metrics.event("checkpoint", step=step, blocking_s=round(time.perf_counter() - started, 4),
                      async_save=config.checkpoint.async_save)  # fmt: skip

    totals = {"steps": 0, "wait_s": 0.0, "time_s": 0.0, "samples": 0}
    consensus: float | None = None
    last_eval: dict[str, float] = {}
    last_loss = math.nan
    try:
        while step < total_steps:
            epoch = loader.epoch + (1 if loader.step >= steps_per_epoch else 0)
            loader.set_epoch(epoch)
            batches = iter(loader)
            mark = time.perf_counter()
            while step < total_steps:
                batch = next(batches, None)
                waited = time.perf_counter() - mark
                if batch is None:
                    break
                inputs, targets = split(batch)
                lr = learning_rate(
                    config.optim, step, total_steps, global_batch=config.data.global_batch
                )
                set_learning_rate(optimizers, lr)
                loss = forward_backward(model, inputs, targets, precision=precision)
                grad_norm = None
                if config.train.grad_clip:
                    grad_norm = clip_gradients(layout, model.parts, config.train.grad_clip)
                for optimizer in optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if model.compressor is not None:
                    model.compressor.step_done()
                if mixer is not None:
                    mixer.after_step()
                step += 1
                every = config.parallel.consensus_every
                if mixer is not None and every and step % every == 0:
                    consensus = mixer.consensus_distance()
                logged = step % config.train.log_every == 0 or step == total_steps
                if logged:
                    last_loss = global_mean(layout, model, loss)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                elapsed = now - mark
                totals["steps"] += 1
                totals["wait_s"] += waited
                totals["time_s"] += elapsed
                totals["samples"] += data.global_batch
                if logged:
                    record = {"step": step, "epoch": epoch, "loss": last_loss, "lr": lr,
                              "step_s": round(elapsed, 6), "data_wait_s": round(waited, 6),
                              "stall_fraction": round(waited / max(elapsed, 1e-9), 5),
                              "samples_per_s": data.global_batch / max(elapsed, 1e-9)}  # fmt: skip
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    if model.comm_timer is not None:
                        record["comm_s"] = round(model.comm_timer.take(), 6)
                    elif model.gradient_sync is not None:
                        record["comm_s"] = round(model.gradient_sync.take_seconds(), 6)
                    elif model.compressor is not None:
                        record["comm_s"] = round(model.compressor.take_seconds(), 6)
                    if mixer is not None:
                        record["comm_s"] = round(mixer.take_seconds(), 6)
                        record["comm_bytes"] = mixer.take_bytes()
                        if consensus is not None:
                            record["consensus"], consensus = consensus, None
                    if model.compressor is not None:
                        sent, dense = model.compressor.take_bytes()
                        record["comm_bytes"], record["comm_bytes_dense"] = sent, dense
                        record["compression_ratio"] = round(dense / max(sent, 1), 3)
                    metrics.event("step", **record)
                saved = bool(config.checkpoint.interval) and step % config.checkpoint.interval == 0
                if saved:
                    save()
                reason = stop.agreed()
                if reason:
                    if not saved:
                        save()
                    checkpointer.wait()
                    metrics.event("stopped", step=step, reason=reason)
                    metrics.close()
                    raise Stopped(step, reason, os.path.join(checkpointer.directory,
                                                             f"step-{step:08d}"))  # fmt: skip
                mark = time.perf_counter()
            finished_epoch = loader.epoch == epoch and loader.step >= steps_per_epoch
            if finished_epoch and config.train.eval_url:
                last_eval = _evaluate(config, model, layout, split, precision)
                metrics.event("eval", step=step, epoch=epoch, **last_eval)
        if stop.settle():
            # Asked at the last step: its checkpoint is the final one, saved below.
            log.info("a stop request came at the last step; finishing it")
        if not config.checkpoint.interval or step % config.checkpoint.interval:
            save()
        checkpointer.wait()
    except (RuntimeError, dist.DistError) as error:
        if world_size > 1:
            # Typically a collective that another rank never joined (it died or hangs): say
            # where this rank was and how long it waited; the traceback follows.
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            log.error("rank %d failed at step %d: %s: %s (ranks wait for each other at most "
                      "train.collective_timeout_s = %g s)", rank, step + 1, type(error).__name__,
                      first[-300:], config.train.collective_timeout_s)  # fmt: skip
        raise
    finally:
        loader.close()
    summary = {
        "steps": step, "loss": last_loss, "eval": last_eval,
        "stall_fraction": totals["wait_s"] / totals["time_s"] if totals["time_s"] else 0.0,
        "samples_per_s": totals["samples"] / totals["time_s"] if totals["time_s"] else 0.0,
        "steps_this_run": totals["steps"], "checkpoints": checkpointer.saves,
    }  # fmt: skip
    metrics.event("end", **summary)
    metrics.close()
    if rank == 0:
        from trainer.report import plot_training

        plot_training(metrics.path, os.path.join(out_dir, "training.png"))
    # DDP reducers torn down before the process group: otherwise gloo can abort at exit.
    del model, optimizers
    gc.collect()
    return summary


def _evaluate(
    config: Config, model: ParallelModel, layout: Layout, split: Any, precision: Any
) -> dict[str, float]:
    held_out = dataclasses.replace(
        config.data, url=config.train.eval_url, shuffle=False, augment=False, drop_last=False,
        audit=False,
    )  # fmt: skip
    loader = Loader(held_out, config.storage, rank=layout.dp_rank, world_size=layout.dp_world)
    try:
        return evaluate(model, layout, loader, split, precision=precision)
    finally:
        loader.close()


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
