#!/usr/bin/env python
"""Convert a dataset into shards plus index.json, or index existing tars in place.

    python tools/convert.py --input SRC --output DST
        [--input-format imagefolder|jsonl|parquet|csv|webdataset] [--format tar|parquet]
        [--max-shard-bytes 256MB] [--max-shard-samples N] [--workers N]
        [--on-bad-input raise|skip] [--jpeg-row-restarts] [--node-rank R --num-nodes N]
    python tools/convert.py --merge --output DST          # after a multi-node conversion
    python tools/convert.py --index-only --input TARS     # index existing WebDataset tars

SRC and DST are local paths or s3:// URLs. An interrupted run resumes when run again.
--jpeg-row-restarts stores an image folder's JPEGs with a restart marker per row of blocks
(the same pixels; crops then decode from their own row).
"""

from __future__ import annotations

import _cli

from dataflow.config import parse_bytes
from dataflow.convert.existing import index_existing_tars
from dataflow.convert.job import convert, merge
from dataflow.convert.output import ConversionError, same_place


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("--input")
    arguments.add_argument("--output")
    arguments.add_argument(
        "--input-format", choices=["auto", "imagefolder", "jsonl", "parquet", "csv", "webdataset"]
    )
    arguments.add_argument("--format", choices=["tar", "parquet"])
    arguments.add_argument("--max-shard-bytes", type=parse_bytes, metavar="SIZE")
    arguments.add_argument("--max-shard-samples", type=int, metavar="N")
    arguments.add_argument("--workers", type=int, metavar="N", help="0: one per core")
    arguments.add_argument("--on-bad-input", choices=["raise", "skip"])
    arguments.add_argument("--validate-images", choices=["decode", "header", "none"])
    arguments.add_argument("--no-shuffle", dest="shuffle", action="store_false", default=None)
    arguments.add_argument("--jpeg-row-restarts", action="store_true", default=None)
    arguments.add_argument("--seed", type=int)
    arguments.add_argument("--key-field")
    arguments.add_argument("--fields", type=lambda text: text.split(","), metavar="A,B,…")
    arguments.add_argument("--row-group-rows", type=int)
    arguments.add_argument("--node-rank", type=int)
    arguments.add_argument("--num-nodes", type=int)
    arguments.add_argument("--allow-pickle", action="store_true", default=None)
    arguments.add_argument("--overwrite", action="store_true", default=None)
    mode = arguments.add_mutually_exclusive_group()
    mode.add_argument("--merge", action="store_true", help="write index.json of DST")
    mode.add_argument("--index-only", action="store_true", help="index the tars of SRC in place")
    args, config = _cli.parse(arguments)
    convert_config = _cli.apply_flags(config.convert, args)

    if args.merge:
        index = merge(convert_config.output, config.storage)
        print(f"merged {index.num_samples} samples in {len(index.shards)} shards")
        return 0
    if args.index_only:
        if (
            convert_config.input
            and convert_config.output
            and not same_place(convert_config.input, convert_config.output)
        ):
            raise ConversionError(
                f"--index-only writes index.json beside the tars of --input "
                f"{convert_config.input}, not into --output {convert_config.output}",
                hint="drop --output, or convert into it without --index-only",
            )
        index = index_existing_tars(
            convert_config.input or convert_config.output,
            config.storage,
            overwrite=convert_config.overwrite,
            progress=not args.quiet,
            allow_pickle=convert_config.allow_pickle,
        )
        print(
            f"indexed {index.num_samples} samples in {len(index.shards)} tars; "
            f"fields {[f.name for f in index.fields]}"
        )
        return 0
    report = convert(convert_config, config.storage, progress=not args.quiet)
    print(report.summary())
    return 0


if __name__ == "__main__":
    _cli.run(main)
