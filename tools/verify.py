#!/usr/bin/env python
"""Check every shard of a dataset against its index.json.

    python tools/verify.py DST [--decode]

Exits 0 only if every shard exists with the indexed size and checksum, its structure
matches its sample table, and (with --decode) every sample decodes; otherwise prints each
bad shard and sample and exits 1.
"""

from __future__ import annotations

import _cli

from dataflow.config import ConfigError, format_bytes
from dataflow.verify import verify_dataset


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("dataset", help="dataset root: a path or s3:// URL")
    arguments.add_argument("--decode", action="store_true", help="decode every sample too")
    arguments.add_argument("--threads", type=int, default=4)
    arguments.add_argument("--allow-pickle", action="store_true")
    args, config = _cli.parse(arguments)
    if args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: must be >= 1 (shards checked at once)")
    report = verify_dataset(
        args.dataset,
        config.storage,
        decode=args.decode,
        threads=args.threads,
        progress=not args.quiet,
        allow_pickle=args.allow_pickle,
    )
    for problem in report.problems:
        print(f"BAD {problem}")
    verdict = "OK" if report.ok else f"FAILED: {len(report.problems)} problem(s)"
    print(
        f"{verdict} — {report.shards} shards, {report.samples} samples, "
        f"{format_bytes(report.bytes)} checked{' and decoded' if args.decode else ''}"
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    _cli.run(main)
