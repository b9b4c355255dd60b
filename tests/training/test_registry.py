"""Registries and model specs, in this process (no launches; a few seconds): unknown names are
config errors naming the key and the known names; a registered name or an import path is
accepted; each built-in part reads its own sub-section, a sub-section of a part not chosen
is an error, and a key that moved into one says where; a user module keeps its own initial
values in any layout; TP without a plan and PP without cut points say what is missing;
``init_weights`` takes BatchNorm and custom parameters.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from dataflow.config import ConfigError
from trainer.compression import COMPRESSORS, build_compressor
from trainer.config import CompressionConfig, Config, ModelConfig, OptimConfig, ParallelConfig, load
from trainer.models import MODELS, ModelSpec, build_spec, init_weights
from trainer.optim import OPTIMIZERS, build_optimizer
from trainer.parallel import build_layout, parallelize
from trainer.tasks import TASKS, build_task

from .test_layout import fake_process_group
from .user_models import DigitNet

USER_MODEL = "tests.training.user_models:digit_net"


@pytest.mark.parametrize(
    ("override", "key", "known"),
    [
        ("model.name=cnm", "model.name", "cnn, gpt"),
        ("train.task=clasify", "train.task", "classify, lm"),
        ("optim.name=adamx", "optim.name", "adafactor, adamw, lamb, lars, sgd"),
        ("compression.method=sgn", "compression.method", "bf16, fp16, none, powersgd, sign, topk"),
    ],
)
def test_an_unknown_name_is_a_config_error_naming_the_key_and_the_known_names(
    override: str, key: str, known: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"{key} = ")) as caught:
        load(None, [override])
    assert f"(known: {known};" in str(caught.value)
    assert "did you mean" in str(caught.value)


def test_every_registry_lists_its_names() -> None:
    assert MODELS.names == ["cnn", "gpt"]
    assert TASKS.names == ["classify", "lm"]
    assert OPTIMIZERS.names == ["adafactor", "adamw", "lamb", "lars", "sgd"]
    assert COMPRESSORS.names == ["bf16", "fp16", "none", "powersgd", "sign", "topk"]


def test_a_registered_optimizer_and_compressor_are_configurable_by_name() -> None:
    @OPTIMIZERS.register("test-plain-sgd")
    def plain_sgd(config: OptimConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=config.lr)

    optimizer = build_optimizer(load(None, ["optim.name=test-plain-sgd"]).optim,
                                nn.Linear(2, 2).parameters())  # fmt: skip
    assert type(optimizer) is torch.optim.SGD
    with pytest.raises(ValueError, match="optimizer 'test-plain-sgd' is registered already"):
        OPTIMIZERS.register("test-plain-sgd")(plain_sgd)
    assert build_compressor(CompressionConfig(method="none")) is None
    assert build_compressor(CompressionConfig(method="sign")).name == "sign"  # type: ignore[union-attr]


def test_each_part_reads_its_own_section() -> None:
    config = load(None, [
        "model.name=gpt", "model.gpt.dim=48", "model.gpt.heads=3", "train.lm.token_field=ids",
        "optim.name=lars", "optim.lars.momentum=0.8", "optim.lars.trust_coefficient=0.02",
        "compression.method=powersgd", "compression.powersgd.rank=2",
    ])  # fmt: skip
    spec = build_spec(config.model, num_classes=0, seed=0)
    assert spec.module.get_submodule("blocks.0.attention.wq").weight.shape == (48, 48)
    assert spec.heads == 3
    optimizer = build_optimizer(config.optim, nn.Linear(2, 2).parameters())
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["trust_coefficient"]) == (0.8, 0.02)
    assert build_compressor(config.compression).rank == 2  # type: ignore[union-attr]
    batch = {"ids": torch.arange(2 * 65).reshape(2, 65) % 1024}
    inputs, targets = build_task(config, "lm").split(batch, torch.device("cpu"))
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    with pytest.raises(ValueError, match=r"model\.gpt\.seq_len = 64 needs 65"):
        build_task(config, "lm").split({"ids": torch.zeros(2, 9)}, torch.device("cpu"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.dim=64"], "'dim' in [model] has moved: set model.gpt.dim"),
        (["model.token_field=ids"], "'token_field' in [model] has moved: set train.lm.token_field"),
        (["optim.trust_coefficient=0.1"], "set optim.lars.trust_coefficient"),
        (["compression.topk_ratio=0.1"], "'topk_ratio' in [compression] has moved: set "
                                         "compression.topk.ratio"),
        (["compression.powersgd.rank=0", "compression.method=powersgd"],
         "compression.powersgd.rank must be >= 1, got 0"),
        (["model.gpt.dim=30", "model.name=gpt"], "model.gpt.dim 30 is not divisible by heads 4"),
    ],
    ids=["moved-model", "moved-task", "moved-optim", "moved-compression", "bad-rank",
         "bad-dim"],
)  # fmt: skip
def test_a_misplaced_or_invalid_setting_is_a_config_error(overrides: list[str],
                                                         message: str) -> None:  # fmt: skip
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=cnn", "model.gpt.dim=64"],
         "[model.gpt] is set, but model chooses 'cnn', which does not read it"),
        (["optim.name=adamw", "optim.sgd.momentum=0.5"],
         "[optim.sgd] is set, but optim chooses 'adamw'"),
        (["compression.method=topk", "compression.powersgd.rank=8"],
         "[compression.powersgd] is set, but compression chooses 'topk'"),
    ],
    ids=["model", "optim", "compression"],
)  # fmt: skip
def test_an_unread_sub_section_is_warned_about(
    overrides: list[str], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="trainer.config"):
        load(None, overrides)
    assert message in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer.config"):
        load(None, [overrides[0]])
    assert caplog.text == ""


def test_an_import_path_is_checked_when_the_part_is_built() -> None:
    config = ModelConfig(name="no_such_package.models:build")  # the config loads …
    with pytest.raises(ValueError, match=r"model.name = .*cannot import module 'no_such_package"):
        build_spec(config, num_classes=10, seed=0)  # … the build names what is missing
    with pytest.raises(ValueError, match=r"module 'tests.training.user_models' has no attribute"):
        build_spec(ModelConfig(name="tests.training.user_models:nothing"), num_classes=0, seed=0)
    wrong = ModelConfig(name=USER_MODEL, options={"depth": 3})
    with pytest.raises(ValueError, match=re.escape("model.options = {'depth': 3}")):
        build_spec(wrong, num_classes=0, seed=0)
    with pytest.raises(TypeError, match=re.escape("returned a dict; return an nn.Module or a")):
        build_spec(ModelConfig(name="builtins:dict"), num_classes=0, seed=0)


def test_a_user_model_without_a_task_says_to_set_train_task() -> None:
    config = Config(model=ModelConfig(name=USER_MODEL))
    spec = build_spec(config.model, num_classes=0, seed=0)
    with pytest.raises(ValueError, match=r"train.task is empty and model.name = .* names no task"):
        build_task(config, spec.task)
    assert build_task(config, "classify").train_metrics


def test_init_weights_takes_batchnorm_and_custom_parameters() -> None:
    model = DigitNet()
    init_weights(model, seed=0)
    batch_norm = model.trunk[1]
    assert torch.equal(batch_norm.weight, torch.ones(8))
    assert torch.equal(batch_norm.bias, torch.zeros(8))
    assert torch.equal(model.class_bias, torch.zeros(10))  # a vector: zeros
    assert model.head.weight.std() > 0


def one_process(config: Config, spec: ModelSpec | None = None) -> list[nn.Module]:
    layout = build_layout(ParallelConfig(), rank=0, world_size=1, device_type="cpu")
    return parallelize(config.model, config.parallel, layout=layout, device=torch.device("cpu"),
                       num_classes=10, seed=config.train.seed, spec=spec).parts  # fmt: skip


def test_a_user_module_keeps_the_values_it_was_built_with_under_the_seed() -> None:
    config = load(None, [f"model.name={USER_MODEL}", "train.seed=3"])
    (part,) = one_process(config)
    torch.manual_seed(3)
    expected = DigitNet()
    for (name, got), (_, want) in zip(part.state_dict().items(), expected.state_dict().items(),
                                      strict=True):  # fmt: skip
        assert torch.equal(got, want), name


def test_a_module_built_on_meta_is_reset_or_refused_naming_the_parameter() -> None:
    torch.manual_seed(5)
    expected = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with torch.device("meta"):
        plain = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    (part,) = one_process(load(None, ["train.seed=5"]), ModelSpec(module=plain))
    for (name, got), (_, want) in zip(part.state_dict().items(), expected.state_dict().items(),
                                      strict=True):  # fmt: skip
        assert torch.equal(got, want), name
    with torch.device("meta"):
        custom = DigitNet()
    with pytest.raises(ValueError, match=r"parameter 'class_bias' belongs to a module without "):
        one_process(Config(), ModelSpec(module=custom))


def test_tensor_and_pipeline_parallelism_name_the_plan_they_miss() -> None:
    for degrees, message in (
        ({"tp": 2}, "parallel.tp = 2 needs a tensor-parallel plan; model.name = "),
        ({"pp": 2}, "parallel.pp > 1 needs to know where to cut the model; model.name = "),
    ):
        parallel = ParallelConfig(**degrees)  # type: ignore[arg-type]
        with fake_process_group(0, 2):
            layout = build_layout(parallel, rank=0, world_size=2, device_type="cpu")
            with pytest.raises(ValueError, match=re.escape(message)):
                parallelize(ModelConfig(name=USER_MODEL), parallel, layout=layout,
                            device=torch.device("cpu"), num_classes=10, seed=0)  # fmt: skip
