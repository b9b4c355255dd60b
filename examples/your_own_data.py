"""Your own data: write a caption dataset, load it with your own transform, mix in a second set.

    python examples/your_own_data.py [WORK_DIR]

1. Two caption datasets are written with ``ShardWriter``: scikit-learn's handwritten digits
   (PNG, caption "a handwritten seven", class) and photo crops (JPEG, caption naming the
   scene, class).
2. A ``Loader`` mixes them 70 / 30 (``data.mix``). Images are decoded and cropped by the
   built-in ``image_pipeline = "train"`` path (random-resized-crop + flip), then
   ``caption_transform`` — plain Python and numpy, yours to change — normalises the image
   to float CHW and tokenises the caption, dropping words at random with the ``rng`` it is
   given. That generator is seeded by (seed, epoch, sample), so a resumed run sees the same
   dropped words. ``pad_collate`` pads the ragged token lists and adds a mask.

README.md ("Your own data") shows this file; tests/pipeline/test_examples.py runs it.
"""

from __future__ import annotations

import io
import sys
import zlib
from typing import Any

import numpy as np
from PIL import Image

from dataflow import DataConfig, Loader, ShardWriter
from dataflow.datasets import photo_jpegs
from dataflow.pipeline.collate import pad_collate
from dataflow.pipeline.config import MixSource

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
VOCABULARY = 4096
BEGIN = 1  # token ids 0 (padding) and 1 (begin) are reserved
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SCENES = ["a temple roof", "a flower"]  # load_sample_images(): china.jpg, flower.jpg


def tokenize(text: str) -> np.ndarray:
    """Word ids by hashing (no vocabulary file to ship): begin, then one id per word."""
    ids = [2 + zlib.crc32(word.encode()) % (VOCABULARY - 2) for word in text.lower().split()]
    return np.array([BEGIN, *ids], dtype=np.int64)


def caption_transform(sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The cropped uint8 image → normalised float CHW; the caption → token ids, 10 % of the
    words dropped at random (from ``rng``: reproducible)."""
    image = (sample["image"].astype(np.float32) - MEAN) / STD
    tokens = tokenize(sample["txt"])
    keep = rng.random(len(tokens)) >= 0.1
    keep[0] = True
    return {
        "__key__": sample["__key__"],
        "image": np.ascontiguousarray(image.transpose(2, 0, 1)),
        "tokens": tokens[keep],
        "label": sample["label"],
    }


def write_digits(output: str) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    with ShardWriter(output, format="tar", max_shard_samples=400) as writer:
        for number, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            grey = (pixels * (255 / 16)).round().astype(np.uint8)
            rgb = np.repeat(np.kron(grey, np.ones((4, 4), np.uint8))[..., None], 3, axis=2)
            png = io.BytesIO()
            Image.fromarray(rgb).save(png, format="PNG")
            writer.write({
                "__key__": f"digit-{number:05d}",
                "png": png.getvalue(),
                "txt": f"a handwritten {NUMBERS[int(label)]}",
                "cls": int(label),
            })  # fmt: skip


def write_photos(output: str, count: int = 400) -> None:
    with ShardWriter(output, format="tar", max_shard_samples=100) as writer:
        for number, (label, jpeg) in enumerate(photo_jpegs(count, long_side=128)):
            scene, column = SCENES[label // 5], label % 5
            writer.write({
                "__key__": f"photo-{number:05d}",
                "jpg": jpeg,
                "txt": f"a photo of {scene}, part {NUMBERS[column]} from the left",
                "cls": 10 + label,
            })  # fmt: skip


def main(work: str) -> dict[str, int]:
    write_digits(f"{work}/digits")
    write_photos(f"{work}/photos")
    config = DataConfig(
        mix=MixSource.from_weights({f"{work}/digits": 0.7, f"{work}/photos": 0.3}),
        global_batch=64,
        image_size=32,
        crop_scale=[0.5, 1.0],
        image_pipeline="train",
    )
    loader = Loader(config, sample_transform=caption_transform, collate=pad_collate)
    batches = 0
    for batch in loader:
        batches += 1
        if batches == 1:
            print(f"image {tuple(batch['image'].shape)} {batch['image'].dtype}, tokens "
                  f"{tuple(batch['tokens'].shape)} (mask {tuple(batch['tokens_mask'].shape)}), "
                  f"labels {batch['label'][:8].tolist()}…")  # fmt: skip
    counts: dict[str, int] = loader.metrics()["mix"]
    total = sum(counts.values())
    shares = ", ".join(
        f"{url.rsplit('/', 1)[-1]} {count} ({count / total:.1%})" for url, count in counts.items()
    )
    print(f"{batches} batches in the epoch: {shares}")
    loader.close()
    return counts


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "your-own-data")
