"""Typed configs: every file in configs/ loads; unknown keys, bad types and bad numbers are
errors that say what to fix; CLI overrides reach any field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dataflow.config import (
    ByteSize,
    ConfigError,
    apply_overrides,
    dumps_toml,
    format_bytes,
    load_config,
    parse_bytes,
    split_overrides,
)
from dataflow.pipeline import DataConfig
from trainer.config import Config, load

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_there_are_configs() -> None:
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads(path: Path) -> None:
    config = load(path)
    assert isinstance(config, Config)


def test_unknown_key_names_the_nearest_valid_one(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[convert]\nmax_shard_byte = 100000\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    message = str(caught.value)
    assert "max_shard_byte" in message and "did you mean 'max_shard_bytes'" in message
    assert str(path) in message


def test_unknown_section_names_the_nearest_valid_one(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[storag]\nconnections = 4\n")
    with pytest.raises(ConfigError, match="did you mean 'storage'"):
        load(path)


def test_wrong_type_names_field_and_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[storage]\nconnections = "many"\n')
    with pytest.raises(ConfigError, match=r"storage\.connections must be an integer, got 'many'"):
        load(path)


def test_validation_error_carries_the_numbers() -> None:
    with pytest.raises(ConfigError, match="connections must be >= 1, got 0"):
        load(None, ["storage.connections=0"])
    with pytest.raises(ConfigError, match="must be at least 4096 bytes, got 100"):
        load(None, ["storage.range_size=100"])


def test_literal_choice_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'parquet'"):
        load(None, ["convert.format=parquett"])


def test_overrides_reach_any_field_and_parse_toml_values() -> None:
    config = load(
        None,
        [
            "storage.connections=32",
            "storage.endpoint_url=http://127.0.0.1:9000",
            "storage.range_size=16MiB",
            "convert.shuffle=false",
            "convert.fields=['a', 'b']",
            "convert.output=123",  # a string field keeps a numeric-looking value as text
        ],
    )
    assert config.storage.connections == 32
    assert config.storage.endpoint_url == "http://127.0.0.1:9000"
    assert config.storage.range_size == 16 * 1024 * 1024
    assert config.convert.shuffle is False
    assert config.convert.fields == ["a", "b"]
    assert config.convert.output == "123"


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[storage]\nconnections = 4\n")
    assert load(path, ["storage.connections=9"]).storage.connections == 9


def test_split_overrides_separates_dotted_flags() -> None:
    rest, overrides = split_overrides(["--input", "x", "--storage.connections=3", "--quiet"])
    assert rest == ["--input", "x", "--quiet"]
    assert overrides == ["storage.connections=3"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256MB", 256_000_000),
        ("8MiB", 8 * 1024**2),
        ("64k", 64_000),
        ("1.5GiB", int(1.5 * 1024**3)),
        (4096, 4096),
        ("4096", 4096),
    ],
)
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "-5MB", True, 1.5])
def test_parse_bytes_refuses_nonsense(text: object) -> None:
    with pytest.raises(ConfigError):
        parse_bytes(text)  # type: ignore[arg-type]


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(8 * 1024**2) == "8.0 MiB"


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        apply_overrides({}, ["storage.connections"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"storage": 3}, ["storage.connections=1"])


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[storage\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(broken)


@dataclass(kw_only=True)
class _Inner:
    size: ByteSize = 10
    names: list[str] = field(default_factory=list)
    ratio: float | None = None


@dataclass(kw_only=True)
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    flag: bool = False


def test_dump_and_reload_round_trip(tmp_path: Path) -> None:
    config = load_config(_Outer, None, ["inner.size=2KiB", "inner.names=['x']", "flag=true"])
    path = tmp_path / "round.toml"
    path.write_text(dumps_toml(dataclasses.asdict(config)))
    assert load_config(_Outer, path) == config


def test_bool_is_not_an_int() -> None:
    with pytest.raises(ConfigError, match="must be an integer"):
        load(None, ["storage.connections=true"])


def test_data_section_validation() -> None:
    config = load(None, ["data.global_batch=512", "data.crop_scale=[0.2, 1.0]"])
    assert config.data.global_batch == 512 and config.data.crop_scale == [0.2, 1.0]
    with pytest.raises(ConfigError, match="global_batch must be >= 1, got 0"):
        load(None, ["data.global_batch=0"])
    with pytest.raises(ConfigError, match=r"crop_scale must be \[min, max\] within \(0, 1\]"):
        load(None, ["data.crop_scale=[0.5, 2.0]"])
    with pytest.raises(ConfigError, match="did you mean 'on_bad_sample'"):
        load(None, ["data.on_bad_samples=skip"])


def test_data_config_built_in_code_reads_byte_size_strings() -> None:
    """The docs write sizes as "1GB"; a DataConfig built in code takes them as TOML does."""
    config = DataConfig(cache_bytes="1GB", autotune_memory="512MiB")  # type: ignore[arg-type]
    assert config.cache_bytes == 1_000_000_000
    assert config.autotune_memory == 512 * 1024**2
    with pytest.raises(ConfigError, match="cache_bytes: cannot read 'lots' as a byte size"):
        DataConfig(cache_bytes="lots")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_bytes must be >= 0, got -1"):
        DataConfig(cache_bytes=-1)


def test_data_mix_is_a_list_of_tables_in_either_toml_form(tmp_path: Path) -> None:
    path = tmp_path / "mix.toml"
    path.write_text(
        '[[data.mix]]\nurl = "s3://a/set"\nweight = 0.7\n\n'
        '[[data.mix]]\nurl = "/data/b"\nweight = 3\n'
    )
    config = load(path)
    assert [(m.url, m.weight) for m in config.data.mix] == [("s3://a/set", 0.7), ("/data/b", 3.0)]
    inline = load(
        None, ['data.mix=[{url = "s3://a/set", weight = 0.7}, {url = "/data/b", weight = 3}]']
    )
    assert inline.data.mix == config.data.mix
    # What the trainer writes next to its checkpoints reads back the same.
    dumped = tmp_path / "dumped.toml"
    dumped.write_text(dumps_toml(dataclasses.asdict(config)))
    assert load(dumped).data.mix == config.data.mix


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ('[{url = "a", weight = 1}, {url = "b", weight = -0.5}]',
         r"\[data\.mix\[1\]\] weight must be a number > 0, got -0\.5 \(b\)"),
        ('[{url = "a", weight = 1}, {url = "b", weight = 0}]', r"data\.mix\[1\].*weight must be"),
        ('[{url = "a", weight = 1}, {url = "b", wieght = 1}]',
         r"unknown key 'wieght' in \[data\.mix\[1\]\]; did you mean 'weight'"),
        ('[{weight = 1}]', r"\[data\.mix\[0\]\] lacks the key 'url'"),
        ('[{url = "", weight = 1}]', r"data\.mix\[0\]\] url is empty"),
        ('[{url = "a", weight = "lots"}]', r"data\.mix\[0\]\.weight must be a number"),
        ('[{url = "a", weight = 1}, {url = "a", weight = 2}]',
         r"data\.mix\[1\]\.url = 'a' is listed twice"),
    ],
)  # fmt: skip
def test_bad_data_mix_names_the_entry_and_key(mix: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(None, [f"data.mix={mix}"])


def test_data_mix_and_url_together_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"data\.url = '/x' and data\.mix are both set"):
        load(None, ["data.url=/x", 'data.mix=[{url = "a", weight = 1}]'])
