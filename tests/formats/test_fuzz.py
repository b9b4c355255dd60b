"""The shard fuzzer (tools/fuzz_shards.py, tests/support/fuzz.py) in CI: 200 seeded cases
of hostile and damaged tars and Parquet files through indexing, loading and verification,
in a child process so that a crash of the interpreter is a failure here, not the end of the
test run. ``python tools/fuzz_shards.py`` runs the full 1,000 (about 90 s here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.fuzz import INDEX_FORGERIES, PARQUET_MUTATIONS, TAR_MUTATIONS

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_damaged_shard_ends_in_success_or_a_typed_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "tools/fuzz_shards.py", "--cases", "200", "--seed", "1", "--quiet",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr[-4000:]  # not killed by a signal
    report = json.loads((tmp_path / "fuzz_shards.json").read_text())
    assert report["findings"] == [], report["findings"][:5]
    assert done.returncode == 0
    table = report["table"]
    assert sum(sum(counts.values()) for counts in table.values()) == 200
    # Every mutation was tried, and the hostile ones were refused with a typed error.
    tar_mutations = {f"tar:{m}" for m in [*TAR_MUTATIONS, *INDEX_FORGERIES]}
    assert tar_mutations | {f"parquet:{m}" for m in PARQUET_MUTATIONS} == set(table)
    for refused in ("escaping_name", "link_member", "huge_size", "duplicate_key"):
        assert set(table[f"tar:{refused}"]) == {"typed"}, (refused, table[f"tar:{refused}"])
    # Memory stays bounded (image bombs are refused from their headers).
    assert report["peak_rss_mb"] - report["start_rss_mb"] < 512


@pytest.mark.timeout(120)
def test_a_damaged_parquet_footer_does_not_abort_verify(tmp_path: Path) -> None:
    """Case 281 of seed 3 flips body bytes into column metadata that makes pyarrow 26 call
    std::terminate ("Definition level histogram size mismatch") when verify parsed it."""
    code = (
        "import os, sys; sys.path[:0] = ['tests', 'tools']\n"
        "from support import fuzz; import fuzz_shards\n"
        f"root = {str(tmp_path)!r}; os.makedirs(os.path.join(root, 'cases'))\n"
        "outcome = fuzz.run_parquet_case(281, 3, os.path.join(root, 'cases'),\n"
        "                                fuzz_shards.parquet_base(root))\n"
        "print(outcome.mutation, outcome.result, outcome.skipped)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=110)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["flip_body", "ok", "8"]  # every sample skipped, counted


@pytest.mark.timeout(120)
def test_a_reshard_never_passes_a_truncated_or_oversized_jpeg(tmp_path: Path) -> None:
    """Issue 17.11: re-sharding tars copied truncated JPEGs and image bombs (a 60,000² JPEG)
    with "0 skipped". In the fuzzer's cases holding one, the re-shard skips and counts it."""
    from support import fuzz

    cases = {mutation: [n for n in range(0, 400, 2) if fuzz.plan(n, 1)[1] == mutation][:4]
             for mutation in ("truncated_image", "image_bomb")}  # fmt: skip
    for mutation, numbers in cases.items():
        assert len(numbers) == 4, mutation
        for number in numbers:
            outcome = fuzz.run_tar_case(number, 1, str(tmp_path))
            assert outcome.result == "ok", (mutation, number, outcome.detail)
            assert outcome.resharded_skipped == 1, (mutation, number)


@pytest.mark.timeout(180)
def test_a_forged_index_or_table_takes_no_memory_it_names(tmp_path: Path) -> None:
    """Issue 17.10: shard sizes of 1e12, sample counts of 2e9 and sample tables that inflate
    or declare 2**40 rows, in an index the attacker wrote over intact tars. Each case runs in
    a child whose address space is capped: allocating by a forged number is a MemoryError
    there (a "crash" outcome), not this machine's memory."""
    from support import fuzz

    by_mutation: dict[str, list[int]] = {name: [] for name in INDEX_FORGERIES}
    for number in range(0, 600, 2):
        by_mutation.get(fuzz.plan(number, 1)[1], []).append(number)
    cases = [number for numbers in by_mutation.values() for number in numbers[:3]]
    assert len(cases) == 3 * len(INDEX_FORGERIES)
    code = (
        "import json, os, resource, sys; sys.path[:0] = ['tests']\n"
        "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
        "from support import fuzz\n"
        f"summary = fuzz.run_cases({cases!r}, seed=1, sandbox={str(tmp_path)!r},\n"
        "                         parquet_base='')\n"
        "print(json.dumps([[o.mutation, o.result, o.detail] for o in summary.outcomes]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=170)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = json.loads(done.stdout.splitlines()[-1])
    for mutation, result, detail in outcomes:
        expected = "ok" if mutation == "forged_shard_bytes" else "typed"
        assert result == expected, (mutation, result, detail)
