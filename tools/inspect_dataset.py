#!/usr/bin/env python
"""Print a readable summary of a dataset: samples, shards, sizes, fields, class histogram.

python tools/inspect.py DST        (or python tools/inspect_dataset.py DST)
"""

from __future__ import annotations

import _cli

from dataflow.summary import describe


def main() -> int:
    arguments = _cli.parser(__doc__.split("\n\n")[0])
    arguments.add_argument("dataset", help="dataset root: a path or s3:// URL")
    args, config = _cli.parse(arguments)
    print(describe(args.dataset, config.storage))
    return 0


if __name__ == "__main__":
    _cli.run(main)
