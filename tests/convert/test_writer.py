"""ShardWriter and convert_samples: the CLI's bytes from Python, refusals, resume, the loader."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dataflow import DatasetIndex, Loader, ShardWriter, convert_samples
from dataflow.convert.output import ConversionError
from dataflow.convert.samples import SampleError, SampleTypeError
from dataflow.datasets import photo_jpegs
from dataflow.formats import codec
from dataflow.formats.codec import kind_for_extension
from dataflow.pipeline import DataConfig
from dataflow.storage import list_files, read_bytes

ROOT = Path(__file__).resolve().parents[2]


def python_samples(count: int, *, images: bool = True) -> list[dict[str, Any]]:
    """Samples as a user holds them: Python objects, fields named by extension."""
    photos = photo_jpegs(count, seed=3, long_side=64) if images else []
    samples = []
    for number in range(count):
        sample: dict[str, Any] = {"__key__": f"item-{number:04d}"}
        if images:
            sample["jpg"] = photos[number][1]
        sample.update(
            cls=number % 7,
            txt=f"caption {number} — ünïcode",
            json={"n": number, "tags": ["a", "b"][: number % 3]},
            npy=np.arange(number % 11, dtype=np.float32).reshape(-1, 1),
        )
        samples.append(sample)
    return samples


def encoded(sample: dict[str, Any]) -> dict[str, bytes]:
    """The member bytes of a sample, each field encoded by its extension's kind."""
    members = {}
    for name, value in sample.items():
        if name != "__key__":
            kind = kind_for_extension(name)
            members[name] = value if isinstance(value, bytes) else codec.encode(kind, value)
    return members


def write_webdataset_tars(folder: Path, samples: list[dict[str, Any]], per_tar: int) -> None:
    folder.mkdir()
    for start in range(0, len(samples), per_tar):
        with tarfile.open(folder / f"part-{start // per_tar:03d}.tar", "w") as archive:
            for sample in samples[start : start + per_tar]:
                for name, data in encoded(sample).items():
                    member = tarfile.TarInfo(f"{sample['__key__']}.{name}")
                    member.size = len(data)
                    archive.addfile(member, io.BytesIO(data))


def cli_convert(source: Path, output: Path, *flags: str) -> None:
    command = [sys.executable, str(ROOT / "tools" / "convert.py"), "--input", str(source),
               "--output", str(output), "--quiet", *flags]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def same_files(first: Path, second: Path) -> list[str]:
    """Names of the files both folders hold, after checking they hold the same bytes."""
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    return names


# ---------------------------------------------------------------------------------------------
# Parity with tools/convert.py


@pytest.mark.parametrize("shard_format", ["tar", "parquet"])
def test_shardwriter_writes_the_bytes_convert_writes_from_webdataset_tars(
    tmp_path: Path, shard_format: str
) -> None:
    samples = python_samples(48)
    # One tar: the CLI writes a shard's samples grouped by input file (per run of 64), so
    # with shuffling and several tars its order within a shard is not the plan's.
    write_webdataset_tars(tmp_path / "wds", samples, per_tar=48)
    cli_convert(tmp_path / "wds", tmp_path / "cli", "--format", shard_format,
                "--max-shard-bytes", "60KB", "--row-group-rows", "5", "--workers", "2")  # fmt: skip
    metadata = {"source": str(tmp_path / "wds"), "source_format": "webdataset"}
    with ShardWriter(str(tmp_path / "py"), format=shard_format, max_shard_bytes=60_000,  # type: ignore[arg-type]
                     shuffle=True, row_group_rows=5, metadata=metadata) as writer:  # fmt: skip
        for sample in samples:
            writer.write(sample)
    names = same_files(tmp_path / "cli", tmp_path / "py")
    shards = [n for n in names if n.endswith(f".{shard_format}")]
    assert len(shards) >= 4  # the byte limit cut several shards, identically
    assert writer.report is not None and writer.report.samples == 48


@pytest.mark.parametrize("shard_format", ["tar", "parquet"])
def test_shardwriter_writes_the_bytes_convert_writes_from_jsonl(
    tmp_path: Path, shard_format: str
) -> None:
    samples = python_samples(30, images=False)
    for sample in samples:
        del sample["npy"]  # JSON holds no arrays
    lines = [json.dumps({k: v for k, v in s.items() if k != "__key__"}) for s in samples]
    (tmp_path / "table.jsonl").write_text("\n".join(lines) + "\n")
    cli_convert(tmp_path / "table.jsonl", tmp_path / "cli", "--format", shard_format,
                "--max-shard-samples", "7", "--seed", "5", "--workers", "1")  # fmt: skip
    metadata = {"source": str(tmp_path / "table.jsonl"), "source_format": "jsonl"}
    with ShardWriter(str(tmp_path / "py"), format=shard_format, max_shard_samples=7,  # type: ignore[arg-type]
                     shuffle=True, seed=5, metadata=metadata) as writer:  # fmt: skip
        for line, sample in enumerate(samples, start=1):
            writer.write({**sample, "__key__": f"table_{line:09d}"})  # the CLI's JSONL keys
    assert len(same_files(tmp_path / "cli", tmp_path / "py")) == 2 * 5 + 1


def test_loader_reads_what_shardwriter_wrote(tmp_path: Path) -> None:
    samples = python_samples(30)
    with ShardWriter(str(tmp_path / "ds"), max_shard_samples=8) as writer:
        for sample in samples:
            writer.write(sample)
    loader = Loader(DataConfig(url=str(tmp_path / "ds"), global_batch=6, image_size=32,
                               shuffle=False, decode_workers=1), rank=0, world_size=1)  # fmt: skip
    seen: dict[str, tuple[int, str, Any, np.ndarray]] = {}
    for batch in loader:
        assert batch["image"].shape == (6, 32, 32, 3)
        for position, key in enumerate(batch["__key__"]):
            seen[key] = (int(batch["label"][position]), batch["txt"][position],
                         batch["json"][position], np.asarray(batch["npy"][position]))  # fmt: skip
    assert sorted(seen) == [s["__key__"] for s in samples]
    for sample in samples:
        label, text, document, array = seen[sample["__key__"]]
        assert (label, text, document) == (sample["cls"], sample["txt"], sample["json"])
        assert np.array_equal(array, sample["npy"])


def test_shardwriter_to_s3_holds_the_local_bytes(tmp_path: Path, s3: Any) -> None:
    samples = python_samples(20)
    for output, options in (
        (str(tmp_path / "local"), {}),
        (f"{s3.url}/ds", {"storage_config": s3.config}),
    ):
        with ShardWriter(output, max_shard_samples=6, **options) as writer:
            for sample in samples:
                writer.write(sample)
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert len(names) == 2 * 4 + 1
    for name in names:
        remote = read_bytes(f"{s3.url}/ds/{name}", config=s3.config)
        assert remote == (tmp_path / "local" / name).read_bytes(), name
    # Nothing else under the prefix: no spool or _convert/ left there.
    listed = list_files(f"{s3.url}/ds", config=s3.config)
    assert sorted(url.rsplit("/", 1)[1] for url in listed) == names


# ---------------------------------------------------------------------------------------------
# Refusals


BAD_SAMPLES = [
    ({"cls": 1}, SampleError, ["__key__"]),
    ({"__key__": "", "cls": 1}, SampleError, ["__key__"]),
    ({"__key__": "a.b", "cls": 1}, SampleError, ["'a.b'", "'.'", "'a_b'"]),
    ({"__key__": "x/y", "cls": 1}, SampleError, ["'x/y'", "'/'"]),
    ({"__key__": "../up", "cls": 1}, SampleError, ["'../up'"]),
    ({"__key__": "k1", "cls": "three"}, SampleTypeError, ["'k1'", "'cls'", "an int", "str"]),
    ({"__key__": "k2", "cls": 2.5}, SampleTypeError, ["'k2'", "'cls'", "float"]),
    ({"__key__": "k3", "txt": {"a": 1}}, SampleTypeError, ["'k3'", "'txt'", "dict"]),
    ({"__key__": "k4", "npy": [1, 2]}, SampleTypeError, ["'k4'", "'npy'", "ndarray"]),
    ({"__key__": "k5", "json": {1, 2}}, SampleTypeError, ["'k5'", "'json'", "set"]),
    ({"__key__": "k6", "jpg": b"no image"}, SampleError, ["'k6'", "'jpg'", "not an image in"]),
    ({"__key__": "k7", "jpg": "photo.jpg"}, SampleTypeError, ["'k7'", "'jpg'", "bytes"]),
    ({"__key__": "k8", "cls": b"x3"}, SampleError, ["'k8'", "'cls'"]),
    ({"__key__": "k9", "pkl": b"\x80\x04K\x01."}, SampleError, ["'k9'", "'pkl'", "allow_pickle"]),
    ({"__key__": "k10", "a/b": b"x"}, SampleError, ["'k10'", "'a/b'"]),
    ({"__key__": "k11"}, SampleError, ["'k11'", "no fields"]),
]


@pytest.mark.parametrize(("sample", "error", "named"), BAD_SAMPLES)
def test_a_bad_sample_is_one_line_naming_key_and_field(
    tmp_path: Path, sample: dict[str, Any], error: type[Exception], named: list[str]
) -> None:
    writer = ShardWriter(str(tmp_path / "ds"))
    with pytest.raises(error) as raised, writer:
        writer.write({"__key__": "fine", "cls": 0, "txt": "ok"})
        writer.write(sample)
    message = str(raised.value)
    assert "\n" not in message and all(part in message for part in named), message
    assert list((tmp_path / "ds").iterdir()) == []  # the block raised: nothing written


def test_a_repeated_key_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    with (
        pytest.raises(SampleError, match="'twice': the key was written before"),
        ShardWriter(str(tmp_path / "ds")) as writer,
    ):
        writer.write({"__key__": "twice", "txt": "a"})
        writer.write({"__key__": "twice", "txt": "b"})
    assert not (tmp_path / "ds" / "index.json").exists()


def test_an_error_in_the_block_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), ShardWriter(str(tmp_path / "ds")) as writer:
        for sample in python_samples(5):
            writer.write(sample)
        raise KeyboardInterrupt
    assert list((tmp_path / "ds").iterdir()) == []
    with pytest.raises(RuntimeError, match="closed"):
        writer.write({"__key__": "late", "txt": "x"})


def test_an_existing_dataset_needs_overwrite_and_foreign_files_are_kept(tmp_path: Path) -> None:
    def write(output: Path, count: int, **options: Any) -> ShardWriter:
        with ShardWriter(str(output), max_shard_samples=4, **options) as writer:
            for sample in python_samples(count, images=False):
                writer.write(sample)
        return writer

    write(tmp_path / "ds", 10)
    before = (tmp_path / "ds" / "index.json").read_bytes()
    with pytest.raises(ConversionError, match=r"already holds a dataset.*overwrite=True"):
        write(tmp_path / "ds", 6)
    assert (tmp_path / "ds" / "index.json").read_bytes() == before
    assert write(tmp_path / "ds", 6, overwrite=True).report.samples == 6  # type: ignore[union-attr]
    assert DatasetIndex.load(str(tmp_path / "ds")).num_samples == 6
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "shard-000001.tar").write_bytes(b"someone else's")
    with pytest.raises(ConversionError, match=r"already holds shard-000001\.tar.*no conversion"):
        write(tmp_path / "other", 10)
    assert (tmp_path / "other" / "shard-000001.tar").read_bytes() == b"someone else's"
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["shard-000001.tar"]


def test_no_sample_is_an_error(tmp_path: Path) -> None:
    with (
        pytest.raises(ConversionError, match="no sample was written"),
        ShardWriter(str(tmp_path / "ds")),
    ):
        pass


# ---------------------------------------------------------------------------------------------
# convert_samples


def samples_of(number: int) -> list[dict[str, Any]]:
    """Two samples per input, the second one only for even inputs (module-level: picklable)."""
    first = {"__key__": f"in{number:04d}-a", "cls": number, "txt": f"text {number}",
             "npy": np.full(3, number, dtype=np.int16)}  # fmt: skip
    second = {"__key__": f"in{number:04d}-b", "cls": number, "json": [number]}
    return [first, second] if number % 2 == 0 else [first]


def repeated_key(number: int) -> dict[str, Any]:
    return {"__key__": "same" if number in (3, 8) else f"k{number}", "cls": number}


def bad_value(number: int) -> dict[str, Any]:
    return {"__key__": f"k{number}", "cls": "x" if number == 5 else number}


@pytest.mark.parametrize("shard_format", ["tar", "parquet"])
def test_convert_samples_bytes_do_not_depend_on_workers(tmp_path: Path, shard_format: str) -> None:
    reports = [
        convert_samples(samples_of, range(40), str(tmp_path / f"w{workers}"), workers=workers,
                        format=shard_format, max_shard_samples=9, progress=False)  # type: ignore[arg-type]
        for workers in (1, 3)
    ]  # fmt: skip
    assert [r.samples for r in reports] == [60, 60]
    names = same_files(tmp_path / "w1", tmp_path / "w3")
    assert len(names) == 2 * 7 + 1
    with ShardWriter(str(tmp_path / "writer"), format=shard_format, max_shard_samples=9) as writer:  # type: ignore[arg-type]
        for number in range(40):
            for sample in samples_of(number):
                writer.write(sample)
    same_files(tmp_path / "w1", tmp_path / "writer")  # the one-process form, same bytes


def test_convert_samples_to_s3_in_forkserver_workers(tmp_path: Path, s3: Any) -> None:
    # The S3 server's threads make the workers start by forkserver: fn travels by reference.
    output = f"{s3.url}/ds"
    convert_samples(samples_of, range(20), output, workers=2, max_shard_samples=9,
                    storage_config=s3.config, progress=False)  # fmt: skip
    convert_samples(samples_of, range(20), str(tmp_path / "local"), workers=1,
                    max_shard_samples=9, progress=False)  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    listed = list_files(output, config=s3.config)
    assert sorted(url.rsplit("/", 1)[1] for url in listed) == names
    for name in names:
        remote = read_bytes(f"{output}/{name}", config=s3.config)
        assert remote == (tmp_path / "local" / name).read_bytes(), name


def test_convert_samples_names_a_repeated_key_and_the_inputs(tmp_path: Path) -> None:
    with pytest.raises(SampleError, match="'same': the key comes from inputs 3 and 8"):
        convert_samples(repeated_key, range(10), str(tmp_path / "ds"), workers=2, progress=False)
    assert not (tmp_path / "ds").exists() or list((tmp_path / "ds").iterdir()) == []


def test_convert_samples_names_the_input_of_a_bad_value(tmp_path: Path) -> None:
    with pytest.raises(SampleTypeError, match=r"'k5'.*'cls'.*\(from input 5: 5\)"):
        convert_samples(bad_value, range(10), str(tmp_path / "ds"), workers=2, progress=False)
    assert list((tmp_path / "ds").iterdir()) == []


KILLABLE = """
import sys
import numpy as np
from dataflow import convert_samples

def sample(number):
    return {"__key__": f"s{number:05d}", "cls": number, "npy": np.full(64, number)}

report = convert_samples(sample, range(600), sys.argv[1], workers=int(sys.argv[2]),
                         max_shard_samples=2, progress=False)
print(report.shards_resumed, report.samples)
"""


def test_convert_samples_killed_mid_run_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(KILLABLE)
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(script)]
    done = subprocess.run([*command, str(tmp_path / "whole"), "1"], capture_output=True,
                          text=True, timeout=300, env=environment)  # fmt: skip
    assert done.stdout.split() == ["0", "600"], done.stderr
    staging = tmp_path / "killed" / "_convert"
    job = subprocess.Popen([*command, str(tmp_path / "killed"), "2"], env=environment,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        records = list(staging.glob("shard-*.tar.json")) if staging.exists() else []
        if len(records) >= 20:
            break
        time.sleep(0.005)
    assert job.poll() is None, "the conversion ended before it could be killed"
    os.kill(job.pid, signal.SIGKILL)
    job.wait(timeout=30)
    assert not (tmp_path / "killed" / "index.json").exists()
    rerun = subprocess.run([*command, str(tmp_path / "killed"), "2"], capture_output=True,
                           text=True, timeout=300, env=environment)  # fmt: skip
    resumed, samples = rerun.stdout.split()
    assert int(resumed) >= 20 and samples == "600", rerun.stderr
    same_files(tmp_path / "whole", tmp_path / "killed")


def test_the_readme_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    assert "python examples/write_shards.py" in " ".join(readme.split())
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "write_shards.py"),
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "250 samples in 3 shards"
    same_files(tmp_path / "out" / "one", tmp_path / "out" / "two")
