"""``Trainer``: the training loop as an object, shared by the CLI and the Python API.

    from trainer import Trainer
    Trainer(config, model=my_module, task=my_task, loader=my_loader).fit()

``fit`` builds, in order (each a method a subclass may replace): the process group and the
lease on ``train.out_dir``; the layout, the loader, the model (``parallelize``: any module,
under any data-parallel layout), optimizers and the ``GradientSync``; the checkpointer, and
resumes from the latest complete checkpoint. Then for each epoch, for each batch:

    wait for the loader (timed: data-wait) ─▶ step(): forward/backward, after_backward,
    clip, lr, optimizer step, after_step ─▶ log() ─▶ save() every checkpoint.interval steps
    ─▶ evaluate() on the held-out split after each epoch ─▶ final save(), plot

Around it: rank 0 holds a lease on ``train.out_dir`` (``trainer.lease``: a second job there
is refused); SIGTERM or the torchrun agent's death stops all ranks after the same step with
a checkpoint (``trainer.preemption``); a requeued job whose checkpoint is already the last
step says so and returns.

The loader reads ahead and decodes on its own threads while the step computes, and (on a
GPU) copies the next batch on a side stream; the data-wait time per step is what is left
over — the stall — and is logged with its share of the step. The loop's own cost beside
the model's: a few Python calls per step, and on logged steps one all-reduce of the loss
(two for a classification task: its accuracy too).
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dataflow.config import dumps_toml
from dataflow.pipeline import Loader
from trainer.checkpoint import Checkpointer
from trainer.config import Config
from trainer.lease import Lease, OutDirBusyError
from trainer.metrics import TrainMetrics
from trainer.models import ModelSpec, as_spec, build_spec
from trainer.optim import build_optimizer, learning_rate, set_learning_rate
from trainer.parallel import Layout, ParallelModel, build_layout, parallelize
from trainer.preemption import Stopped, StopRequest
from trainer.step import autocast, clip_gradients, evaluate, forward_backward, global_mean
from trainer.tasks import Task, build_task

log = logging.getLogger("trainer")

LoaderFactory = Callable[[int, int], Loader]
"""(data-parallel rank, data-parallel world size) → the loader of that rank."""


class RendezvousError(Exception):
    """The ranks did not form a process group in time."""


def _device(config: Config) -> torch.device:
    wanted = config.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but CUDA is not available; use 'auto' or 'cpu'")
    if wanted == "cpu" or (wanted == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _first_line(error: BaseException, width: int) -> str:
    """The end (``width`` characters) of an error's first line: torch's C++ errors append
    their whole stack below it."""
    return (str(error).strip().splitlines() or [""])[0][-width:]


def collective_failure(error: BaseException, timeout_s: float) -> str:
    """One line on a failed collective. gloo words its timeouts in several ways ("Timed out
    waiting 5000ms for recv", "Application timeout caused pair closure"); all of them are
    named a timeout here, so a reader sees why without knowing gloo."""
    text = str(error).lower()
    cause = f"{type(error).__name__}: {_first_line(error, 300)}"
    limit = f"train.collective_timeout_s = {timeout_s:g} s"
    if "timed out" in text or "timeout" in text:
        return f"a collective timed out: a peer did not join within {limit} ({cause})"
    return f"{cause} (ranks wait for each other at most {limit})"


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
            first = _first_line(error, 200)
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


def _merged_loader_state(loader: Loader, world_size: int) -> dict[str, Any]:
    """The loader position with the samples that any rank skipped (the same on all ranks)."""
    state = loader.state_dict()
    if world_size > 1:
        everyone: list[Any] = [None] * world_size
        dist.all_gather_object(everyone, state[Loader.STATE_SKIPPED])
        state[Loader.STATE_SKIPPED] = sorted({tuple(s) for part in everyone for s in part})
        state[Loader.STATE_SKIPPED] = [list(s) for s in state[Loader.STATE_SKIPPED]]
    return state


@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor | None
    """This rank's loss (None off the last pipeline stage)."""
    lr: float
    grad_norm: float | None
    metric_sums: dict[str, torch.Tensor]
    """The task's training metrics summed over this rank's batch, and ``targets``."""


class Trainer:
    """The configured training, or with your own ``model``, ``task`` (default:
    ``config.train.task``) and ``loader`` (a ``Loader`` for this data-parallel rank, or a
    function (rank, world_size) → Loader; default: one over ``config.data``).

    ``model``: a function returning an ``nn.Module`` or a ``ModelSpec``, called under
    ``torch.manual_seed(train.seed)`` so that every rank builds the same weights; or the
    module or spec itself — then build it alike on every rank; default: ``config.model``."""

    def __init__(
        self, config: Config, *,
        model: nn.Module | ModelSpec | Callable[[], nn.Module | ModelSpec] | None = None,
        task: Task | None = None, loader: Loader | LoaderFactory | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self._model_given = model
        self._task_given = task
        self._loader_given = loader
        self.step_count = 0
        """Optimizer steps done (restored from a checkpoint on resume)."""
        self._metric_names: list[str] | None = None
        """The task's training metrics, by name, once the first step has shown them."""

    # -----------------------------------------------------------------------------------------
    # Entry

    def fit(self) -> dict[str, Any]:
        """Train; returns the end-of-run summary (the same on all ranks). Raises ``Stopped``
        after the checkpoint a stop request (SIGTERM) asked for."""
        config = self.config
        self.device = _device(config)
        self.rank, self.world_size = _setup_process_group(
            self.device, config.train.collective_timeout_s
        )
        self.run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        # Before anything touches out_dir: the loader's audit log, the checkpointer's clean-up.
        lease = _take_lease(config.train.out_dir, self.run_id, self.rank, self.world_size)
        self.stop = StopRequest(world_size=self.world_size, device=self.device)
        # Whose lease this job took over (a dead holder's, as after a kill -9 or a restart).
        previous = lease.took_over if lease is not None else None
        self.took_over = f"pid {previous.get('pid')} on {previous.get('host')}" if previous else ""
        try:
            return self._fit()
        finally:
            self.stop.close()
            if lease is not None:
                lease.release()

    # -----------------------------------------------------------------------------------------
    # Building

    def build_loader(self, layout: Layout) -> Loader:
        config, out_dir = self.config, self.config.train.out_dir
        given = self._loader_given
        if isinstance(given, Loader):
            if (given.rank, given.world_size) != (layout.dp_rank, layout.dp_world):
                raise ValueError(
                    f"the loader given is rank {given.rank} of {given.world_size}, but this rank "
                    f"reads as data-parallel rank {layout.dp_rank} of {layout.dp_world}; pass a "
                    "function (rank, world_size) → Loader instead"
                )
            return given
        if given is not None:
            return given(layout.dp_rank, layout.dp_world)
        # TP/PP peers share a data-parallel rank, hence its audit file: one of them writes it.
        audit = config.data.audit and layout.tp_rank == 0 and layout.pp_rank == 0
        # The next epoch's reading and decoding start while this one ends (the loader is
        # closed when fit ends, which stops that pass if training ends first).
        data = dataclasses.replace(config.data, out_dir=out_dir, audit=audit,
                                   prefetch_next_epoch=True)  # fmt: skip
        if self.device.type == "cuda" and not data.device:
            data = dataclasses.replace(data, device=str(self.device))
        return Loader(data, config.storage, rank=layout.dp_rank, world_size=layout.dp_world)

    def build_model(self, layout: Layout, classes: int) -> ParallelModel:
        config = self.config
        given = self._model_given
        if given is not None and not isinstance(given, nn.Module | ModelSpec):
            # A function: built under the seed, as a configured one, so every rank's
            # module starts alike.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.train.seed)
                given = given()
        if given is not None:
            spec = as_spec(given, setting="Trainer(model=...)")
        else:
            spec = build_spec(config.model, num_classes=classes, seed=config.train.seed)
        if self._task_given is None and given is not None and not (config.train.task or spec.task):
            raise ValueError(
                "Trainer(model=...) without task=...: pass a trainer.Task, set train.task, "
                "or return a ModelSpec naming its task"
            )
        self.task = self._task_given or build_task(config, spec.task)
        return parallelize(
            config.model, config.parallel, layout=layout, device=self.device,
            num_classes=classes, seed=config.train.seed,
            activation_checkpointing=config.train.activation_checkpointing,
            bf16=config.train.mixed_precision == "bf16", compression=config.compression,
            spec=spec, loss_fn=self.task.loss,
            origin="Trainer(model=...)" if self._model_given is not None else "",
        )  # fmt: skip

    def _build(self) -> None:
        config, device = self.config, self.device
        if config.train.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(config.train.seed)
        self.layout = layout = build_layout(config.parallel, rank=self.rank,
                                            world_size=self.world_size,
                                            device_type=device.type)  # fmt: skip
        self.loader = self.build_loader(layout)
        classes = len(self.loader.index.metadata.get("classes", []) or [])
        self.model = model = self.build_model(layout, classes)
        if layout.pp > 1 and self.loader.per_rank_batch % config.parallel.microbatches:
            raise ValueError(
                f"the per-rank batch {self.loader.per_rank_batch} does not split into "
                f"parallel.microbatches = {config.parallel.microbatches}"
            )
        self.optimizers = [build_optimizer(config.optim, part.parameters())
                           for part in model.parts]  # fmt: skip
        model.sync.attach(self.optimizers)
        # FSDP casts parameters itself; autocast covers the other layouts.
        bf16 = config.train.mixed_precision == "bf16"
        self.precision = autocast(device, bf16 and model.strategy not in ("fsdp", "hsdp",
                                                                          "replicate"))  # fmt: skip
        self.checkpointer = Checkpointer(
            config.checkpoint,
            config.checkpoint.dir or os.path.join(config.train.out_dir, "checkpoints"),
            parts=model.parts, optimizers=self.optimizers, rank=self.rank,
            world_size=self.world_size, rank_states=model.sync.state(),
        )  # fmt: skip

    # -----------------------------------------------------------------------------------------
    # The loop

    def _fit(self) -> dict[str, Any]:
        config, out_dir = self.config, self.config.train.out_dir
        self._build()
        loader, checkpointer = self.loader, self.checkpointer
        resumed_from = ""
        latest = checkpointer.latest() if config.checkpoint.resume == "auto" else None
        if latest is not None:
            state = checkpointer.load(latest)
            loader.load_state_dict(state["loader"])
            self.step_count, resumed_from = int(state["step"]), latest
        steps_per_epoch = len(loader)
        total_steps = config.train.epochs * steps_per_epoch
        if config.train.max_steps:
            total_steps = min(total_steps, config.train.max_steps)
        self.total_steps = total_steps
        self.metrics = metrics = TrainMetrics(
            out_dir, enabled=self.rank == 0, progress=config.train.progress,
            total_steps=total_steps, initial_step=self.step_count, run_id=self.run_id,
            tensorboard=config.train.tensorboard,
        )  # fmt: skip
        metrics.event(
            "start", world_size=self.world_size, layout=self.layout.describe(),
            strategy=self.model.strategy, device=str(self.device), step=self.step_count,
            total_steps=total_steps, steps_per_epoch=steps_per_epoch,
            global_batch=config.data.global_batch, resumed_from=resumed_from,
            restart=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
            lease_taken_from=self.took_over,
        )  # fmt: skip
        if resumed_from and self.step_count >= total_steps:
            # A requeued job that had finished: nothing to train, and no second save of the
            # step its checkpoint holds.
            loader.close()
            log.info("already complete: step %d of %d in %s", self.step_count, total_steps,
                     resumed_from)  # fmt: skip
            complete = {"steps": self.step_count, "total_steps": total_steps,
                        "checkpoint": resumed_from, "complete": True,
                        "steps_this_run": 0}  # fmt: skip
            metrics.event("end", **complete)
            metrics.close()
            return complete
        if self.rank == 0:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "config.toml"), "w", encoding="utf-8") as handle:
                handle.write(dumps_toml(dataclasses.asdict(config)))
        totals = {"steps": 0, "wait_s": 0.0, "time_s": 0.0, "samples": 0}
        last_eval: dict[str, float] = {}
        last_loss = math.nan
        try:
            while self.step_count < total_steps:
                epoch = loader.epoch + (1 if loader.step >= steps_per_epoch else 0)
                loader.set_epoch(epoch)
                batches = iter(loader)
                mark = time.perf_counter()
                while self.step_count < total_steps:
                    batch = next(batches, None)
                    waited = time.perf_counter() - mark
                    if batch is None:
                        break
                    result = self.step(batch)
                    logged = (self.step_count % config.train.log_every == 0
                              or self.step_count == total_steps)  # fmt: skip
                    if logged:
                        last_loss = global_mean(self.layout, self.model, result.loss)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    elapsed = time.perf_counter() - mark
                    totals["steps"] += 1
                    totals["wait_s"] += waited
                    totals["time_s"] += elapsed
                    totals["samples"] += config.data.global_batch
                    if logged:
                        self.log(epoch, last_loss, result, elapsed=elapsed, waited=waited)
                    saved = bool(config.checkpoint.interval) and (
                        self.step_count % config.checkpoint.interval == 0
                    )
                    if saved:
                        self.save()
                    self._stop_if_asked(saved)
                    mark = time.perf_counter()
                finished_epoch = loader.epoch == epoch and loader.step >= steps_per_epoch
                if finished_epoch and config.train.eval_url:
                    last_eval = self.evaluate()
                    metrics.event("eval", step=self.step_count, epoch=epoch, **last_eval)
            if self.stop.settle():
                # Asked at the last step: its checkpoint is the final one, saved below.
                log.info("a stop request came at the last step; finishing it")
            if not config.checkpoint.interval or self.step_count % config.checkpoint.interval:
                self.save()
            checkpointer.wait()
        except (RuntimeError, dist.DistError) as error:
            if self.world_size > 1:
                # Typically a collective that another rank never joined (it died or hangs):
                # say where this rank was and how long it waited; the traceback follows.
                log.error(
                    "rank %d failed at step %d: %s",
                    self.rank,
                    self.step_count + 1,
                    collective_failure(error, config.train.collective_timeout_s),
                )
            raise
        finally:
            loader.close()
        summary = {
            "steps": self.step_count, "loss": last_loss, "eval": last_eval,
            "stall_fraction": totals["wait_s"] / totals["time_s"] if totals["time_s"] else 0.0,
            "samples_per_s": totals["samples"] / totals["time_s"] if totals["time_s"] else 0.0,
            "steps_this_run": totals["steps"], "checkpoints": checkpointer.saves,
        }  # fmt: skip
        metrics.event("end", **summary)
        metrics.close()
        if self.rank == 0:
            from trainer.report import plot_training

            plot_training(metrics.path, os.path.join(out_dir, "training.png"))
        # DDP reducers torn down before the process group: otherwise gloo can abort at exit.
        del self.model, self.optimizers
        gc.collect()
        return summary

    def step(self, batch: dict[str, Any]) -> StepResult:
        """One optimizer step on ``batch``."""
        config, model = self.config, self.model
        inputs, targets = self.task.split(batch, self.device)
        lr = learning_rate(config.optim, self.step_count, self.total_steps,
                           global_batch=config.data.global_batch)  # fmt: skip
        set_learning_rate(self.optimizers, lr)
        sums: dict[str, torch.Tensor] = {}
        on_output = None
        if self.task.train_metrics and self.task.metrics is not None:
            metric_fn = self.task.metrics

            def on_output(output: Any, wanted: torch.Tensor) -> None:
                # Once a step, or once per microbatch with pp > 1: the sums add up.
                with torch.no_grad():
                    found = metric_fn(output.detach(), wanted)
                found["targets"] = torch.tensor(wanted.numel())
                for name, value in found.items():
                    sums[name] = sums[name] + value if name in sums else value

        loss = forward_backward(model, inputs, targets, precision=self.precision,
                                on_output=on_output)  # fmt: skip
        grad_norm = None
        if config.train.grad_clip:
            grad_norm = clip_gradients(self.layout, model.parts, config.train.grad_clip)
        for optimizer in self.optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        model.sync.after_step(self.step_count)
        return StepResult(loss=loss, lr=lr, grad_norm=grad_norm, metric_sums=sums)

    def log(self, epoch: int, loss: float, result: StepResult, *, elapsed: float,
            waited: float) -> None:  # fmt: skip
        """One metrics.jsonl step record (rank 0 writes; every rank joins the reductions)."""
        global_batch = self.config.data.global_batch
        record: dict[str, Any] = {
            "step": self.step_count, "epoch": epoch, "loss": loss, "lr": result.lr,
            "step_s": round(elapsed, 6), "data_wait_s": round(waited, 6),
            "stall_fraction": round(waited / max(elapsed, 1e-9), 5),
            "samples_per_s": global_batch / max(elapsed, 1e-9),
        }  # fmt: skip
        if result.grad_norm is not None:
            record["grad_norm"] = result.grad_norm
        record.update(self._training_metrics(result.metric_sums))
        record.update(self.model.sync.stats())
        self.metrics.event("step", **record)

    def _training_metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """The task's training metrics as global means over the step's targets."""
        if not self.task.train_metrics or self.task.metrics is None:
            return {}
        names = self._metric_names
        if names is None:
            names = sorted(name for name in sums if name != "targets")
            if self.layout.pp > 1:
                # Only last stages see outputs: every rank learns the names once, from them.
                gathered: list[list[str] | None] = [None] * self.layout.world_size
                dist.all_gather_object(gathered, names)
                names = next((found for found in gathered if found), [])
            self._metric_names = names
        if not names:
            return {}
        values = torch.tensor([float(sums.get(name, 0.0)) for name in [*names, "targets"]],
                              dtype=torch.float64)  # fmt: skip
        if self.layout.world_size > 1:
            # TP peers hold the same outputs: count them once (with pp > 1, earlier stages
            # add zeros).
            values /= self.layout.tp
            dist.all_reduce(values)
        count = max(float(values[-1]), 1.0)
        return {f"train_{name}": float(values[i]) / count for i, name in enumerate(names)}

    def evaluate(self) -> dict[str, float]:
        """Loss and the task's metrics on ``train.eval_url``, over all ranks."""
        config = self.config
        held_out = dataclasses.replace(
            config.data, url=config.train.eval_url, mix=[], shuffle=False,
            image_pipeline="eval", drop_last=False, audit=False,
        )  # fmt: skip
        layout = self.layout
        loader = Loader(held_out, config.storage, rank=layout.dp_rank, world_size=layout.dp_world)
        try:
            return evaluate(self.model, layout, loader, lambda b: self.task.split(b, self.device),
                            precision=self.precision, metrics=self.task.metrics)  # fmt: skip
        finally:
            loader.close()

    def save(self) -> None:
        """Checkpoint the model, optimizers, loader position and per-rank sync state."""
        started = time.perf_counter()
        position = _merged_loader_state(self.loader, self.world_size)
        self.checkpointer.save(self.step_count, {
            "step": self.step_count, "loader": position,
            "world_size": self.world_size, "layout": self.layout.describe(),
        })  # fmt: skip
        self.metrics.event("checkpoint", step=self.step_count,
                           blocking_s=round(time.perf_counter() - started, 4),
                           async_save=self.config.checkpoint.async_save)  # fmt: skip

    def _stop_if_asked(self, saved: bool) -> None:
        reason = self.stop.agreed()
        if not reason:
            return
        if not saved:
            self.save()
        self.checkpointer.wait()
        self.metrics.event("stopped", step=self.step_count, reason=reason)
        self.metrics.close()
        raise Stopped(
            self.step_count,
            reason,
            os.path.join(self.checkpointer.directory, f"step-{self.step_count:08d}"),
        )
