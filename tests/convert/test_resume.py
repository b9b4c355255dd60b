"""Restartable and multi-node conversion: interrupted runs resume into byte-identical output;
node slices merge into the same dataset as one node would write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dataflow import storage
from dataflow.convert import job
from dataflow.convert.config import ConvertConfig
from dataflow.convert.job import STAGING, ConversionError, convert, merge

from .gates import GatedFolder

ROOT = Path(__file__).resolve().parents[2]


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def without_source(files: dict[str, bytes]) -> dict[str, bytes]:
    """index.json names the input path; everything else must match byte for byte."""
    return {name: data for name, data in files.items() if name != "index.json"}


def test_failed_run_resumes_into_identical_output(small_photo_copy: Path, tmp_path: Path) -> None:
    options = {"max_shard_samples": 4, "workers": 1, "shuffle": False}
    convert(ConvertConfig(input=str(small_photo_copy), output=str(tmp_path / "clean"), **options),
            progress=False)  # fmt: skip
    victim = sorted(small_photo_copy.rglob("*.jpg"))[30]  # in shard 7 of 15
    original = victim.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = b"\0" * 64  # same size: same plan
    victim.write_bytes(bytes(damaged))
    resumed_output = tmp_path / "resumed"
    config = ConvertConfig(input=str(small_photo_copy), output=str(resumed_output), **options)
    with pytest.raises(ConversionError):
        convert(config, progress=False)
    assert not (resumed_output / "index.json").exists()
    assert len(list((resumed_output / STAGING).glob("*.json"))) == 7 + 1  # 7 shards + plan
    victim.write_bytes(original)
    report = convert(config, progress=False)
    assert report.shards_resumed == 7
    assert tree(resumed_output) == tree(tmp_path / "clean") | {
        "index.json": (resumed_output / "index.json").read_bytes()
    }
    assert not (resumed_output / STAGING).exists()
    assert (resumed_output / "index.json").read_bytes().replace(b"resumed", b"clean") == (
        tmp_path / "clean" / "index.json"
    ).read_bytes()


@pytest.mark.timeout(180)
def test_killed_run_resumes_into_identical_output(digits_folder: Path, tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "tools" / "convert.py"), "--input", str(digits_folder),
               "--max-shard-samples", "12", "--workers", "1", "--quiet"]  # fmt: skip
    subprocess.run([*command, "--output", str(tmp_path / "clean")], check=True, timeout=120)
    output = tmp_path / "killed"
    process = subprocess.Popen([*command, "--output", str(output)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        records = list((output / STAGING).glob("shard-*.json")) if output.exists() else []
        if len(records) >= 20:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL, "conversion ended before it was killed"
    assert not (output / "index.json").exists()
    subprocess.run([*command, "--output", str(output)], check=True, timeout=120)
    assert without_source(tree(output)) == without_source(tree(tmp_path / "clean"))
    assert not [p for p in output.rglob(".*") if p.name.startswith(".")]  # no temp files left


def test_changed_input_is_not_mixed_into_an_unfinished_run(
    small_photo_copy: Path, tmp_path: Path
) -> None:
    config = ConvertConfig(
        input=str(small_photo_copy), output=str(tmp_path / "out"), max_shard_samples=4, workers=1
    )
    victim = sorted(small_photo_copy.rglob("*.jpg"))[-1]
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(ConversionError):
        convert(config, progress=False)
    victim.unlink()
    with pytest.raises(ConversionError, match="different input or settings"):
        convert(config, progress=False)
    overwrite = ConvertConfig(**{**config.__dict__, "overwrite": True})
    assert convert(overwrite, progress=False).samples == 59


def test_nodes_convert_disjoint_slices_and_merge(photo_folder: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    convert(ConvertConfig(input=str(photo_folder), output=str(single), max_shard_samples=5,
                          workers=1), progress=False)  # fmt: skip
    shared = tmp_path / "shared"
    reports = []
    for rank in range(3):
        config = ConvertConfig(input=str(photo_folder), output=str(shared), max_shard_samples=5,
                               workers=1, node_rank=rank, num_nodes=3)  # fmt: skip
        reports.append(convert(config, progress=False))
    assert [r.shards for r in reports[:2]] == [4, 4]
    assert [r.index_written for r in reports] == [False, False, True]
    # The last node to finish found every shard done and wrote the index of all 12 itself.
    assert reports[-1].shards == 12 and reports[-1].samples == 60
    assert tree(shared) == tree(single)


def test_merge_refuses_unfinished_slices(photo_folder: Path, tmp_path: Path) -> None:
    config = ConvertConfig(input=str(photo_folder), output=str(tmp_path / "out"),
                           max_shard_samples=5, workers=1, node_rank=1, num_nodes=2)  # fmt: skip
    convert(config, progress=False)
    with pytest.raises(ConversionError, match="6 of 12 shards are not finished"):
        merge(str(tmp_path / "out"))


def test_node_slice_from_environment(photo_folder: Path, tmp_path: Path) -> None:
    environment = {**os.environ, "RANK": "1", "WORLD_SIZE": "2"}
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), "--input", str(photo_folder),
         "--output", str(tmp_path / "out"), "--max-shard-samples", "30", "--quiet"],
        check=True, env=environment, timeout=120,
    )  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-000001.tar"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), "--merge", "--output",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "not finished" in result.stderr


def test_following_the_skip_hint_resumes_the_failed_run(
    small_photo_copy: Path, tmp_path: Path
) -> None:
    victim = sorted(small_photo_copy.rglob("*.jpg"))[30]  # in shard 7 of 15
    damaged = bytearray(victim.read_bytes())
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = b"\0" * 64
    victim.write_bytes(bytes(damaged))
    command = [sys.executable, str(ROOT / "tools" / "convert.py"), "--input",
               str(small_photo_copy), "--output", str(tmp_path / "out"), "--no-shuffle",
               "--max-shard-samples", "4", "--workers", "1", "--quiet"]  # fmt: skip
    failed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "--on-bad-input skip" in failed.stderr
    hinted = subprocess.run([*command, "--on-bad-input", "skip"], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert hinted.returncode == 0, hinted.stderr
    assert "59 samples in 15 shards" in hinted.stdout and "1 skipped" in hinted.stdout
    assert "7 shards kept from an earlier run" in hinted.stdout


def test_resume_under_raise_rewrites_a_shard_that_skipped_under_skip(
    small_photo_copy: Path, tmp_path: Path
) -> None:
    victim = sorted(small_photo_copy.rglob("*.jpg"))[2]  # in shard 0, which node 0 writes
    victim.write_bytes(b"not a jpeg at all" * 100)
    options = {"max_shard_samples": 4, "workers": 1, "shuffle": False}
    skipping = ConvertConfig(input=str(small_photo_copy), output=str(tmp_path / "out"),
                             on_bad_input="skip", **options)  # fmt: skip
    # Stop the skipping run after its first shards, as a crash would.
    convert(ConvertConfig(**{**skipping.__dict__, "node_rank": 0, "num_nodes": 5}),
            progress=False)  # fmt: skip
    raising = ConvertConfig(**{**skipping.__dict__, "on_bad_input": "raise"})
    with pytest.raises(ConversionError, match=str(victim)):
        convert(raising, progress=False)  # the kept shard with a skip is not taken as is


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (pool workers, a forkserver and its children)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and process_state(int(entry)):
            parents[int(entry)] = process_parent(int(entry))
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def process_stat(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return []


def process_parent(pid: int) -> int:
    fields = process_stat(pid)
    return int(fields[1]) if fields else 0


def process_state(pid: int) -> str:
    """One-letter state of a live process; '' if it is gone or a zombie."""
    fields = process_stat(pid)
    return "" if not fields or fields[0] in "ZX" else fields[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_workers_die_with_a_killed_conversion(
    gated_digits: GatedFolder, tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    """Local output: forked workers. S3 output: s3fs runs a thread, so workers come from a
    forkserver (see job._run_pool); both kinds must go when the main process is killed."""
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        output = f"{s3.url}/out"
        extra = [f"--storage.endpoint_url={s3.config.endpoint_url}"]
    else:
        output, extra = str(tmp_path / "out"), []

    def records() -> int:
        staging = storage.join_url(output, STAGING)
        config = s3.config if where == "s3" else None
        names = storage.list_files(staging, config=config) if where == "s3" or os.path.isdir(
            staging) else []  # fmt: skip
        return sum(1 for name in names if os.path.basename(name).startswith("shard-"))

    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "convert.py"), "--input", str(gated_digits.root),
         "--output", output, "--max-shard-samples", "2", "--workers", "2", "--no-shuffle",
         "--on-bad-input", "skip", "--quiet", *extra],
    )  # fmt: skip
    workers: list[int] = []
    try:
        # One worker waits at the gate (the last shard); the other has finished the rest.
        deadline = time.monotonic() + 60
        while records() < 10:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        workers = descendants(process.pid)
        assert len(workers) >= 2, workers
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(process_state(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in workers if process_state(pid)] == []
    finally:
        gated_digits.release(wait_s=0)
        process.kill()
        for pid in workers:
            if process_state(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_crash_after_the_index_is_finished_by_the_rerun(
    photo_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out"
    remove_tree = job.storage.remove_tree

    def crash_before_cleanup(url: str, **kwargs: object) -> None:
        if url.endswith(STAGING):
            raise SystemExit("killed between index.json and the removal of _convert/")
        remove_tree(url, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(job.storage, "remove_tree", crash_before_cleanup)
    config = ConvertConfig(input=str(photo_folder), output=str(output), max_shard_samples=25,
                           workers=1)  # fmt: skip
    with pytest.raises(SystemExit):
        convert(config, progress=False)
    monkeypatch.undo()
    index = (output / "index.json").read_bytes()
    assert (output / STAGING / "plan.json").exists()
    rerun = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), "--input", str(photo_folder),
         "--output", str(output), "--max-shard-samples", "25", "--workers", "1", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert "60 samples in 3 shards" in rerun.stdout
    assert not (output / STAGING).exists()
    assert (output / "index.json").read_bytes() == index
