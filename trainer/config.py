"""The root of the config tree: one section per component, as written in ``configs/*.toml``.

Every tool loads its file through ``load`` here, so any file in ``configs/`` works with any
tool, and an unknown section or key is an error naming the closest valid one. The data
sections come from ``dataflow``; the trainer's own sections (``train``, ``model``,
``parallel``, ``optim``, ``compression``, ``checkpoint``) are defined here.

A pluggable part — a model, task, optimizer or compressor — is chosen by name in its
section (``model.name``, ``train.task``, ``optim.name``, ``compression.method``), and its own
settings live in a sub-section named after it: ``[model.gpt]``, ``[train.lm]``,
``[optim.lars]``, ``[compression.powersgd]``; a part named by ``"package.module:function"``
takes the section's free ``options`` table as keyword arguments (``model.options``,
``train.task_options``) or reads it (``optim.options``, ``compression.options``). A
sub-section set for a part that is not chosen is warned about (its settings go unread), and
a key that moved into a sub-section says where to.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from dataflow.config import load_config
from dataflow.convert.config import ConvertConfig
from dataflow.pipeline.config import DataConfig
from dataflow.storage.config import StorageConfig


def check_parts(section: object, where: str, chosen: str, parts: tuple[str, ...]) -> None:
    """Warn about a part's sub-section, other than the ``chosen`` one, that differs from its
    defaults: settings nothing will read. A warning, not an error: switching the part of a
    config file by an override (``--model.name=...`` on configs/hybrid-parallel.toml) is
    common, and leaves the old part's sub-section behind."""
    for part in parts:
        value = getattr(section, part)
        if part != chosen and value != type(value)():
            logging.getLogger("trainer.config").warning(
                "[%s.%s] is set, but %s chooses %r, which does not read it", where, part,
                where, chosen,
            )  # fmt: skip


@dataclass(kw_only=True)
class LMTaskConfig:
    token_field: str = "tokens"
    """The field holding each sample's tokens (model.gpt.seq_len + 1 of them for the GPT)."""


@dataclass(kw_only=True)
class TrainConfig:
    out_dir: str = "out/train"
    """Where metrics.jsonl, the audit log, checkpoints and the plot go."""
    epochs: int = 1
    """Passes over the training set."""
    max_steps: int = 0
    """Stop after this many optimizer steps in all (0: run all epochs)."""
    seed: int = 0
    """Seed of the weight init (per parameter name, so any parallel layout starts alike)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA (NCCL) when a GPU is present, else CPU (gloo)."""
    mixed_precision: Literal["none", "bf16"] = "none"
    """bf16: compute in bfloat16 (autocast, or FSDP's param dtype), master weights in fp32."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them."""
    deterministic: bool = True
    """Deterministic kernels (CPU results then repeat bit for bit across runs and resumes)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0: no clipping)."""
    log_every: int = 1
    """Steps between metrics.jsonl lines and progress-line updates."""
    eval_url: str = ""
    """Held-out split (a dataset root); evaluated after each epoch. Empty: no evaluation."""
    progress: bool = True
    """Show a progress line on rank 0."""
    collective_timeout_s: float = 600.0
    """How long a rank waits in one collective before failing: a rank that died or hangs then
    ends the job with an error instead of a hang (torch's gloo default, 10 minutes)."""
    task: str = ""
    """What a batch means: classify (image, label), lm (next token), or your own as
    'package.module:function' returning a trainer.tasks.Task. Empty: the model's own task
    (cnn: classify, gpt: lm)."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for a task named by 'package.module:function'."""
    lm: LMTaskConfig = field(default_factory=LMTaskConfig)
    """The lm task's settings."""
    tensorboard: bool = False
    """Also write the metrics.jsonl scalars as TensorBoard events into {out_dir}/tensorboard."""

    def __post_init__(self) -> None:
        if self.task:
            from trainer.tasks import TASKS

            TASKS.check(self.task)
        for name in ("epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")


@dataclass(kw_only=True)
class CNNConfig:
    num_classes: int = 0
    """Classes (0: the number of classes recorded in the dataset's index)."""
    width: int = 32
    """Channels of the first stage (doubled at each later stage)."""
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1])
    """Residual blocks per stage."""

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"model.cnn.width must be >= 1, got {self.width}")
        if self.num_classes < 0:
            raise ValueError(f"model.cnn.num_classes must be >= 0, got {self.num_classes}")
        if not self.blocks or min(self.blocks) < 1:
            raise ValueError(f"model.cnn.blocks needs >= 1 block per stage, got {self.blocks}")


@dataclass(kw_only=True)
class GPTConfig:
    vocab_size: int = 1024
    """Token ids lie in [0, vocab_size)."""
    seq_len: int = 64
    """Tokens per training sequence (each sample holds seq_len + 1 tokens)."""
    dim: int = 128
    """Model width."""
    layers: int = 4
    """Transformer blocks."""
    heads: int = 4
    """Attention heads (divisible by parallel.tp)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "dim", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.gpt.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"model.gpt.dim {self.dim} is not divisible by heads {self.heads}")


@dataclass(kw_only=True)
class ModelConfig:
    MOVED: ClassVar[dict[str, str]] = {
        **{key: f"model.cnn.{key}" for key in ("num_classes", "width", "blocks")},
        **{key: f"model.gpt.{key}" for key in ("vocab_size", "seq_len", "dim", "layers", "heads")},
        "token_field": "train.lm.token_field",
    }
    name: str = "cnn"
    """cnn: a small ResNet for image shards ([model.cnn]); gpt: a small decoder-only
    transformer for tokens ([model.gpt]); or your own as 'package.module:function' returning
    an nn.Module or a trainer.models.ModelSpec."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for a model named by 'package.module:function'."""
    cnn: CNNConfig = field(default_factory=CNNConfig)
    """The cnn model's settings."""
    gpt: GPTConfig = field(default_factory=GPTConfig)
    """The gpt model's settings."""

    def __post_init__(self) -> None:
        from trainer.models import MODELS

        MODELS.check(self.name)
        check_parts(self, "model", self.name, ("cnn", "gpt"))


@dataclass(kw_only=True)
class ParallelConfig:
    dp_replicate: int = -1
    """Replicas that all-reduce gradients (DDP; HSDP's outer dimension). -1: what is left."""
    dp_shard: int = 1
    """Ranks that shard parameters, gradients and optimizer state (FSDP2)."""
    tp: int = 1
    """Tensor-parallel degree (DTensor column/row plans; GPT only)."""
    pp: int = 1
    """Pipeline stages over ranks (torch.distributed.pipelining)."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    """Pipeline schedule; interleaved runs stages_per_rank stages on each rank."""
    microbatches: int = 4
    """Microbatches per step with pp > 1 (the per-rank batch must divide by it)."""
    stages_per_rank: int = 2
    """Stages on each rank with the interleaved schedule (1 for the others)."""
    ddp_bucket_mb: float = 25.0
    """DDP gradient bucket size: all-reduce of a bucket starts while backward goes on."""
    allreduce: Literal["ring", "flat", "hierarchical"] = "ring"
    """How DDP averages gradients. ring: the backend's all-reduce of each bucket as backward
    fills it (gloo/NCCL). flat: one all-reduce of all gradients after backward (fewest
    latency terms, no overlap). hierarchical: for each bucket, reduce-scatter inside the
    node, all-reduce of the shards across nodes, all-gather inside the node — the
    cross-node step carries 1/node_size of the bytes, and is the only one [compression]
    compresses. `python tools/bench_comm.py` prints what each costs."""
    node_size: int = 0
    """Ranks per node for allreduce = "hierarchical" (0: torchrun's LOCAL_WORLD_SIZE)."""
    decentralized: Literal["none", "gossip", "local_sgd"] = "none"
    """Replace the gradient all-reduce (pure data parallelism only). gossip: after each
    step, average parameters with neighbours on gossip_graph (D-PSGD; no global
    collective). local_sgd: every local_steps steps, average parameters over all ranks —
    with outer_lr/outer_momentum, DiLoCo's outer Nesterov step."""
    gossip_graph: Literal["ring", "exponential"] = "ring"
    """ring: both ring neighbours every step; exponential: one peer, rank + 2^k at step k."""
    local_steps: int = 8
    """local_sgd: optimizer steps between parameter averages."""
    outer_lr: float = 1.0
    """local_sgd: outer learning rate on the averaged change (1 with momentum 0: plain
    local SGD; DiLoCo uses 0.7 with momentum 0.9)."""
    outer_momentum: float = 0.0
    """local_sgd: Nesterov momentum of the outer step."""
    consensus_every: int = 10
    """gossip/local_sgd: log the ranks' mean parameter distance from their average every
    this many steps (one all-reduce; 0: never)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (memory ↓, one more all-gather)."""

    def __post_init__(self) -> None:
        for name in ("dp_shard", "tp", "pp", "microbatches", "stages_per_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp_replicate == 0 or self.dp_replicate < -1:
            raise ValueError(f"parallel.dp_replicate must be >= 1 or -1, got {self.dp_replicate}")
        if self.ddp_bucket_mb <= 0:
            raise ValueError(f"parallel.ddp_bucket_mb must be > 0, got {self.ddp_bucket_mb}")
        if self.node_size < 0:
            raise ValueError(f"parallel.node_size must be >= 0, got {self.node_size}")
        if self.local_steps < 1 or self.consensus_every < 0:
            raise ValueError("parallel.local_steps must be >= 1 and consensus_every >= 0")
        if not 0 < self.outer_lr <= 2 or not 0 <= self.outer_momentum < 1:
            raise ValueError(
                f"parallel.outer_lr must lie in (0, 2] and outer_momentum in [0, 1), got "
                f"{self.outer_lr} and {self.outer_momentum}"
            )
        if self.decentralized != "none" and self.allreduce != "ring":
            raise ValueError(
                f"parallel.decentralized = {self.decentralized!r} sends no gradients: "
                f"parallel.allreduce = {self.allreduce!r} would have nothing to do"
            )


def _check_betas_eps(where: str, betas: list[float], eps: float) -> None:
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"{where}.betas must be two values in [0, 1), got {betas}")
    if eps <= 0:
        raise ValueError(f"{where}.eps must be > 0, got {eps}")


@dataclass(kw_only=True)
class SGDConfig:
    momentum: float = 0.9
    """Heavy-ball momentum."""


@dataclass(kw_only=True)
class AdamWConfig:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Moment decay rates."""
    eps: float = 1e-8
    """Denominator ε."""
    freeze_variance_step: int = -1
    """Stop updating the second moment after this many steps (1-bit Adam's frozen variance,
    trainer/optim/frozen.py), so that the bursts top-k's error feedback delivers are not
    scaled away. -1: compression.start_step when compression.method is topk, else never;
    0: never (torch.optim.AdamW). Not for PowerSGD, which sends every coordinate each step
    (frozen, its GPT ended +9.0 % over dense instead of +2.1 %), nor for sign, which gives
    every entry of a block the block's mean magnitude: an entry whose frozen variance is
    tiny then takes huge steps (the CNN diverged to NaN, though the GPT went from +5.3 % to
    +2.7 %). Figures: trainer/compression/base.py."""

    def __post_init__(self) -> None:
        _check_betas_eps("optim.adamw", self.betas, self.eps)
        if self.freeze_variance_step < -1:
            raise ValueError(
                f"optim.adamw.freeze_variance_step must be >= -1, got {self.freeze_variance_step}"
            )


@dataclass(kw_only=True)
class LambConfig:
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Moment decay rates."""
    eps: float = 1e-8
    """Denominator ε."""
    exclude_bias_and_norm: bool = True
    """Parameters of ≤ 1 dimension (biases, norm gains) take no weight decay and no trust
    ratio."""

    def __post_init__(self) -> None:
        _check_betas_eps("optim.lamb", self.betas, self.eps)


@dataclass(kw_only=True)
class LarsConfig:
    momentum: float = 0.9
    """Heavy-ball momentum."""
    trust_coefficient: float = 0.001
    """η: local lr = η‖w‖ / (‖g‖ + λ‖w‖)."""
    eps: float = 1e-8
    """Trust-ratio ε."""
    larc_clip: bool = False
    """Clip the local lr at the global one (LARC's clip mode)."""
    exclude_bias_and_norm: bool = True
    """Parameters of ≤ 1 dimension (biases, norm gains) take no weight decay and no trust
    ratio."""

    def __post_init__(self) -> None:
        if self.eps <= 0 or self.trust_coefficient <= 0:
            raise ValueError("optim.lars.eps and optim.lars.trust_coefficient must be > 0")


@dataclass(kw_only=True)
class OptimConfig:
    MOVED: ClassVar[dict[str, str]] = {
        "momentum": "optim.sgd.momentum (or optim.lars.momentum)",
        "betas": "optim.adamw.betas (or optim.lamb.betas)",
        "eps": "optim.adamw.eps (or optim.lamb.eps, optim.lars.eps)",
        "trust_coefficient": "optim.lars.trust_coefficient",
        "larc_clip": "optim.lars.larc_clip",
        "exclude_bias_and_norm": "optim.lamb.exclude_bias_and_norm (or optim.lars.…)",
    }
    name: str = "adamw"
    """Optimizer: sgd, adamw, lamb, lars, adafactor (each with its sub-section), or
    'package.module:function' taking (this section, parameters). lamb / lars: layer-wise
    trust ratios on full-tensor norms under any sharding; adafactor: torch.optim.Adafactor
    (factored second moments)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Free settings for an optimizer named by 'package.module:function' (it reads them)."""
    lr: float = 1e-3
    """Peak learning rate at base_batch (see scale_rule)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (LAMB / LARS: inside the trust ratio, as the papers do)."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to lr."""
    schedule: Literal["constant", "cosine", "poly"] = "cosine"
    """After warm-up: constant, cosine or polynomial decay to min_lr_ratio × lr at the last
    step."""
    poly_power: float = 1.0
    """Exponent of the poly schedule (1: linear decay)."""
    min_lr_ratio: float = 0.1
    """Decay floor as a fraction of lr."""
    scale_rule: Literal["none", "linear", "sqrt"] = "none"
    """Large-batch rule: lr × (data.global_batch / base_batch), or its square root."""
    base_batch: int = 256
    """The global batch that lr was tuned for."""
    sgd: SGDConfig = field(default_factory=SGDConfig)
    """SGD's settings."""
    adamw: AdamWConfig = field(default_factory=AdamWConfig)
    """AdamW's settings."""
    lamb: LambConfig = field(default_factory=LambConfig)
    """LAMB's settings."""
    lars: LarsConfig = field(default_factory=LarsConfig)
    """LARS's settings."""

    def __post_init__(self) -> None:
        from trainer.optim import OPTIMIZERS

        OPTIMIZERS.check(self.name)
        check_parts(self, "optim", self.name, ("sgd", "adamw", "lamb", "lars"))
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be within [0, 1], got {self.min_lr_ratio}")
        if self.poly_power <= 0:
            raise ValueError(f"optim.poly_power must be > 0, got {self.poly_power}")
        if self.base_batch < 1:
            raise ValueError(f"optim.base_batch must be >= 1, got {self.base_batch}")


@dataclass(kw_only=True)
class PowerSGDConfig:
    rank: int = 4
    """Rank of the P·Qᵀ approximation of each gradient matrix."""
    warm_start: bool = True
    """Start each step's power iteration from the last step's Q."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"compression.powersgd.rank must be >= 1, got {self.rank}")


@dataclass(kw_only=True)
class TopKConfig:
    ratio: float = 0.01
    """Fraction of each parameter's values sent (largest magnitude after error feedback)."""

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"compression.topk.ratio must be within (0, 1], got {self.ratio}")


@dataclass(kw_only=True)
class CompressionConfig:
    MOVED: ClassVar[dict[str, str]] = {
        "powersgd_rank": "compression.powersgd.rank",
        "powersgd_warm_start": "compression.powersgd.warm_start",
        "topk_ratio": "compression.topk.ratio",
    }
    method: str = "none"
    """Data-parallel gradient compression — of DDP's all-reduce, or under HSDP of the
    all-reduce across the replicate dimension only: none, fp16, bf16 (casts), powersgd (low
    rank), topk (sparsification) or sign (1 bit a value) — the last three with error
    feedback — or 'package.module:function' taking this section, returning a Compressor."""
    options: dict[str, Any] = field(default_factory=dict)
    """Free settings for a compressor named by 'package.module:function' (it reads them)."""
    start_step: int = 20
    """powersgd, topk, sign: exact all-reduce for this many steps first, while gradients are
    large and change fast (PowerSGD's start_iter; why 20: trainer/compression/base.py)."""
    powersgd: PowerSGDConfig = field(default_factory=PowerSGDConfig)
    """PowerSGD's settings."""
    topk: TopKConfig = field(default_factory=TopKConfig)
    """top-k's settings."""

    def __post_init__(self) -> None:
        from trainer.compression import COMPRESSORS

        COMPRESSORS.check(self.method)
        check_parts(self, "compression", self.method, ("powersgd", "topk"))
        if self.start_step < 0:
            raise ValueError(f"compression.start_step must be >= 0, got {self.start_step}")


@dataclass(kw_only=True)
class CheckpointConfig:
    interval: int = 0
    """Save every this many steps (0: only at the end of training)."""
    dir: str = ""
    """A POSIX directory (local, Lustre, NFS); empty: {train.out_dir}/checkpoints."""
    async_save: bool = False
    """Save on a background thread after staging to CPU; training goes on meanwhile."""
    keep: int = 2
    """Complete checkpoints kept (older ones are deleted after a newer one completes)."""
    resume: Literal["auto", "never"] = "auto"
    """auto: continue from the latest complete checkpoint in dir, if any."""

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError(f"checkpoint.interval must be >= 0, got {self.interval}")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass(kw_only=True)
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    """How URLs are read and written: S3 endpoint, timeouts, retries, read sizes."""
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    """tools/convert.py: input, output, shard format and limits, workers, bad-input policy."""
    data: DataConfig = field(default_factory=DataConfig)
    """The loader: dataset, global batch, order, read-ahead, cache, decode, queues, policy."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop: epochs, device, precision, logging, evaluation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model: a reference one and its size, or your own."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How ranks split the work: data, sharded-data, tensor and pipeline parallel degrees."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """Data-parallel gradient compression and its error feedback."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """When and where to save, and whether to resume."""

    def __post_init__(self) -> None:
        # Settings that depend on another section are resolved here, once, so the config
        # a run saves says what it ran with.
        adamw = self.optim.adamw
        if adamw.freeze_variance_step == -1 and self.optim.name == "adamw":
            bursts = self.compression.method == "topk"
            adamw.freeze_variance_step = self.compression.start_step if bursts else 0


def load(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a config file (or the defaults) plus ``section.key=value`` overrides."""
    return load_config(Config, path, overrides)
