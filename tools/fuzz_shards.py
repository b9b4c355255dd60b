#!/usr/bin/env python
"""Fuzz shards: seeded hostile and broken tars and Parquet files through indexing, loading
and verification; every case must end in success or a typed error naming shard and offset.

    python tools/fuzz_shards.py [--cases 1000] [--seed 0] [--out reports/]

Even cases damage a tar (tests/support/fuzz.py: truncation, flipped header and payload bytes,
headers with a right checksum but wrong fields, huge and negative sizes, duplicate keys,
``../`` and absolute names, links and devices, PAX records, image bombs, hostile values,
missing fields, an early end, a truncated JPEG); the attacker also writes the index
(``index_existing_tars``), then one epoch is loaded with ``on_bad_sample = "skip"``, the
dataset is verified, and the tars are re-sharded by ``convert`` with ``on_bad_input =
"skip"``. Odd cases damage a Parquet shard (footer bytes, footer length, truncation, body
bytes) under the index written before. A finding is any other exception, a case over 20 s,
the interpreter dying (``--verbose`` prints each case before it runs), a file written
outside the case's folder, a sample neither delivered (or written) nor counted as skipped,
verify passing a damaged Parquet shard, or a re-shard copying an image that does not
decode. Prints a table per mutation and the peak RSS; writes ``<out>/fuzz_shards.json``;
exits 1 when there are findings.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import _cli
from _bench import write_report
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from support import fuzz  # noqa: E402


def parquet_base(folder: str) -> str:
    """A small Parquet dataset of token rows (3 shards of 8 rows)."""
    from dataflow.convert.config import ConvertConfig
    from dataflow.convert.job import convert

    source = os.path.join(folder, "rows.jsonl")
    with open(source, "w") as handle:
        for number in range(24):
            tokens = [(number + 3 * i) % 50 for i in range(17)]
            handle.write(json.dumps({"id": f"r{number:03d}", "tokens": tokens,
                                     "text": f"row {number}"}) + "\n")  # fmt: skip
    output = os.path.join(folder, "parquet-base")
    convert(ConvertConfig(input=source, output=output, format="parquet", key_field="id",
                          row_group_rows=4, max_shard_samples=8, workers=0, overwrite=True),
            progress=False)  # fmt: skip
    return output


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--cases", type=int, default=1000)
    arguments.add_argument("--seed", type=int, default=0)
    arguments.add_argument("--out", default=os.path.join(REPO, "reports"))
    args, _ = _cli.parse(arguments)
    if args.cases < 1:
        arguments.error("--cases must be >= 1")
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        base = parquet_base(folder)
        sandbox = os.path.join(folder, "cases")
        os.makedirs(sandbox)
        bar = tqdm(total=args.cases, unit="case", desc="fuzz", disable=args.quiet)

        def seen(outcome: fuzz.Outcome) -> None:
            bar.update(1)
            if outcome.result not in ("ok", "typed"):
                bar.write(f"case {outcome.case} {outcome.kind}:{outcome.mutation}: "
                          f"{outcome.result}: {outcome.detail}")  # fmt: skip

        def starting(number: int) -> None:
            if args.verbose:
                kind, mutation, _ = fuzz.plan(number, args.seed)
                print(f"case {number} {kind}:{mutation}", file=sys.stderr, flush=True)

        summary = fuzz.run_cases(range(args.cases), seed=args.seed, sandbox=sandbox,
                                 parquet_base=base, on_case=seen, on_start=starting)  # fmt: skip
        bar.close()
    table = summary.table()
    results = ("ok", "typed", "crash", "untyped", "timeout", "escaped", "lost", "missed")
    print(f"\n{'mutation':<28}" + "".join(f"{r:>9}" for r in results))
    for name in sorted(table):
        print(f"{name:<28}" + "".join(f"{table[name][r]:>9}" for r in results))
    slowest = max(summary.outcomes, key=lambda o: o.seconds)
    print(f"\n{len(summary.outcomes)} cases, {len(summary.findings)} findings; slowest case "
          f"{slowest.seconds:.2f} s ({slowest.kind}:{slowest.mutation}); peak RSS "
          f"{summary.peak_rss_mb:.0f} MB (from {summary.start_rss_mb:.0f} MB)")  # fmt: skip
    write_report(args.out, "fuzz_shards", __doc__, {
        "seed": args.seed,
        "peak_rss_mb": summary.peak_rss_mb,
        "start_rss_mb": summary.start_rss_mb,
        "table": {name: dict(counts) for name, counts in sorted(table.items())},
        "findings": [vars(o) for o in summary.findings],
    })  # fmt: skip
    print(f"wrote {args.out}/fuzz_shards.json")
    return 1 if summary.findings else 0


if __name__ == "__main__":
    _cli.run(main)
