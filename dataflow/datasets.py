"""Small real image datasets built from images that packages ship — nothing is downloaded.

``write_digits_folder``: scikit-learn's handwritten digits (1,797 real 8×8 scans, 10
classes), upscaled to 32×32 and written as PNG files in class sub-folders. The demo trains
on it.

``write_photo_folder``: an ImageNet-like set of real-photo JPEGs for benchmarks: random
crops (area 10–100 %, aspect 3:4–4:3) of the two photographs scikit-learn ships, resized to
a 384-pixel long side, randomly mirrored and brightened, JPEG quality 85 — about 33 KB each,
the size of the benchmark figures in DEVELOPERS.md. Ten balanced classes: which photo, and
which fifth of it the crop is centred in. Deterministic for a given seed.
"""

from __future__ import annotations

import os

import numpy as np


def _require_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError:  # pragma: no cover - the dev/demo extras install it
        raise ImportError(
            "the demo datasets need scikit-learn: pip install 'shardflow[demo]'"
        ) from None


def write_digits_folder(
    root: str, *, upscale: int = 4, held_out: str = "", held_out_every: int = 5
) -> int:
    """Write scikit-learn's digits as ``root/<digit>/digit-NNNN.png``; returns the count.

    With ``held_out``, every ``held_out_every``-th digit goes there instead (a fixed split,
    so a held-out accuracy means the same thing on every run); the count is of ``root``.
    """
    _require_sklearn()
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    written = 0
    for number, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        image = (pixels * (255.0 / 16.0)).round().astype(np.uint8)
        image = np.kron(image, np.ones((upscale, upscale), np.uint8))
        to_held_out = bool(held_out) and number % held_out_every == held_out_every - 1
        directory = os.path.join(held_out if to_held_out else root, str(int(label)))
        os.makedirs(directory, exist_ok=True)
        Image.fromarray(image, mode="L").save(os.path.join(directory, f"digit-{number:04d}.png"))
        written += not to_held_out
    return written


def photo_jpegs(
    count: int, *, seed: int = 0, long_side: int = 384, quality: int = 85
) -> list[tuple[int, bytes]]:
    """(label, JPEG bytes) pairs of real-photo crops, see the module docstring."""
    _require_sklearn()
    import simplejpeg
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [np.ascontiguousarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    result = []
    columns = 5
    for number in range(count):
        label = number % (columns * len(photos))
        photo = photos[label // columns]
        height, width = photo.shape[:2]
        area = rng.uniform(0.10, 1.0) * height * width
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        crop_w = int(min(width, round(np.sqrt(area * aspect))))
        crop_h = int(min(height, round(np.sqrt(area / aspect))))
        top = int(rng.integers(0, height - crop_h + 1))
        # The crop's centre lies in the label's fifth of the photo, so labels are learnable.
        centre = (label % columns + rng.random()) * width / columns
        left = int(np.clip(round(centre - crop_w / 2), 0, width - crop_w))
        crop = photo[top : top + crop_h, left : left + crop_w]
        scale = long_side / max(crop_h, crop_w)
        size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
        image = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        image = np.clip(image.astype(np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
        result.append((label, simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality)))
    return result


def write_photo_folder(root: str, *, count: int = 3000, seed: int = 0) -> int:
    """Write ``count`` photo JPEGs as ``root/class-LL/photo-NNNNNN.jpg``; returns the count."""
    for number, (label, data) in enumerate(photo_jpegs(count, seed=seed)):
        directory = os.path.join(root, f"class-{label:02d}")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, f"photo-{number:06d}.jpg"), "wb") as handle:
            handle.write(data)
    return count
