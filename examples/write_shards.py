"""Write shards from Python: a ShardWriter loop, and the same samples by convert_samples.

    python examples/write_shards.py OUTPUT_DIR

README.md ("Writing shards from Python") shows this file; tests/convert/test_writer.py runs it.
"""

import sys

import numpy as np

from dataflow import DatasetIndex, ShardWriter, convert_samples


def make_sample(number: int) -> dict[str, object]:
    """One sample in WebDataset convention: ``__key__`` plus fields named by extension."""
    return {
        "__key__": f"sample-{number:06d}",  # unique; no dots or slashes
        "cls": number % 10,  # int → ASCII
        "txt": f"caption of sample {number}",  # str → UTF-8
        "json": {"number": number, "even": number % 2 == 0},  # object → JSON
        "npy": np.full((4, 4), number, dtype=np.float32),  # ndarray → .npy
    }


if __name__ == "__main__":
    output = sys.argv[1] if len(sys.argv) > 1 else "shards-from-python"
    with ShardWriter(f"{output}/one", format="tar", max_shard_samples=100) as writer:
        for number in range(250):
            writer.write(make_sample(number))
    # The parallel form: make_sample runs in 2 processes; the bytes are those of workers=1.
    convert_samples(make_sample, range(250), f"{output}/two", workers=2, max_shard_samples=100)
    index = DatasetIndex.load(f"{output}/two")
    print(f"{index.num_samples} samples in {len(index.shards)} shards")
