"""Fields decoded by kind: what a sample's fields are before a transform sees them.

Each field of a sample arrives as the bytes stored in the shard (a tar member) or as a
Parquet cell, and leaves as a Python value chosen in this order:

1. a decoder the user registered (``register_decoder``) for the field's full name
   (``"seg.png"``), then for its last extension (``"png"``), then for its kind (``"image"``);
2. the built-in decoder for its extension: ``wav`` and ``flac`` → ``(float32 array, rate)``
   through soundfile (shape (frames,) for mono, (frames, channels) otherwise);
3. the built-in decoder for its kind (dataflow.formats.codec): ``str`` → str, ``json`` →
   object, ``npy``/``tokens`` → array, ``int`` → int, ``float`` → float, anything else → bytes.

The image field is the exception: ``data.image_pipeline`` decides it (``IMAGE_PIPELINES``).
``"train"`` and ``"eval"`` crop while decoding (dataflow.decode.image: only the crop of a
JPEG is decoded, straight into the batch's array), so no registered decoder applies to them;
``"decode"`` gives the full image as an H×W×3 ``uint8`` array (a registered decoder for the
image field's name, extension or kind replaces that decode); ``"none"`` leaves the encoded
bytes. Images come out RGB whatever they hold: CMYK/YCCK JPEGs are converted as Pillow
converts them, greyscale and palette images expanded, alpha dropped (the colour channels as
stored, not composited), 16-bit levels reduced to their high byte (codec.decode_image).

Registered decoders are process-wide and are looked up when a Loader is built: register
before building it. They run in the loader's decode threads, in this process, also with
``transform_pool = "process"`` (only the transform runs in the workers). A decoder that
raises follows ``data.on_bad_sample`` like a damaged image, named in the reason. Cost: the
lookup is done once per field and loader (``FieldDecoders``), not per sample.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any, Final

import numpy as np

from dataflow.formats import codec
from dataflow.pipeline.transform import callable_name

FieldDecoder = Callable[[bytes], Any]
"""Bytes of one field → its value."""

IMAGE_PIPELINES: Final = ("train", "eval", "decode", "none")

_REGISTERED: dict[str, FieldDecoder] = {}
_REGISTERED_LOCK = threading.Lock()


def register_decoder(extension_or_kind: str, decoder: FieldDecoder) -> None:
    """Decode fields named ``extension_or_kind`` (a full field name such as ``"seg.png"``,
    a last extension such as ``"png"``) or of that kind (``"image"``, ``"bytes"``…) with
    ``decoder(data: bytes) -> value``; see the module docstring for the precedence.
    Registering the same name again replaces the decoder."""
    name = extension_or_kind.strip().lower().lstrip(".")
    if not name:
        raise ValueError("register_decoder needs an extension or a kind, got an empty string")
    if not callable(decoder):
        raise TypeError(f"register_decoder({name!r}, …): {decoder!r} is not callable")
    with _REGISTERED_LOCK:
        _REGISTERED[name] = decoder


def unregister_decoder(extension_or_kind: str) -> None:
    """Forget a registered decoder (a no-op when none is registered)."""
    with _REGISTERED_LOCK:
        _REGISTERED.pop(extension_or_kind.strip().lower().lstrip("."), None)


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """``(samples, rate)``: float32 samples in [-1, 1] and the sampling rate, via soundfile."""
    try:
        import soundfile
    except ImportError:
        raise ImportError(
            "decoding wav/flac fields needs soundfile: pip install 'shardflow[audio]' "
            "(or register_decoder('wav', …) with a decoder of your own)"
        ) from None
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except (RuntimeError, soundfile.LibsndfileError) as error:
        raise ValueError(f"undecodable audio: {error}") from None
    return samples, int(rate)


_BUILT_IN_BY_EXTENSION: Final[dict[str, FieldDecoder]] = {
    "wav": decode_audio,
    "flac": decode_audio,
}


def _last_extension(name: str) -> str:
    return name.lower().rsplit(".", 1)[-1]


def registered_decoder(name: str, kind: str) -> FieldDecoder | None:
    """The user's decoder for a field (by full name, last extension, then kind), or None.

    Whatever it raises becomes a ``ValueError`` naming it, so on_bad_sample applies."""
    with _REGISTERED_LOCK:
        found = next(((c, _REGISTERED[c]) for c in (name.lower(), _last_extension(name), kind)
                      if c in _REGISTERED), None)  # fmt: skip
    if found is None:
        return None
    registered_as, decoder = found
    described = f"the decoder registered for {registered_as!r} ({callable_name(decoder)})"

    def guarded(data: bytes) -> Any:
        try:
            return decoder(data)
        except Exception as error:  # the user's code: any exception is this sample's
            raise ValueError(f"{described} raised {type(error).__name__}: {error}") from error

    return guarded


class FieldDecoders:
    """The decoder of each non-image field of one dataset, resolved once per loader."""

    def __init__(self, fields: list[tuple[str, str]], *, allow_pickle: bool = False) -> None:
        self.allow_pickle = allow_pickle
        self._by_name: dict[str, FieldDecoder] = {}
        for name, kind in fields:
            self._by_name[name] = self._resolve(name, kind)
        self._registered_image = {
            name: registered_decoder(name, kind) for name, kind in fields if kind == "image"
        }

    def _resolve(self, name: str, kind: str) -> FieldDecoder:
        registered = registered_decoder(name, kind)
        if registered is not None:
            return registered
        built_in = _BUILT_IN_BY_EXTENSION.get(_last_extension(name))
        if built_in is not None:
            return built_in
        allow_pickle = self.allow_pickle

        def by_kind(data: bytes) -> Any:
            return codec.decode(kind, data, allow_pickle=allow_pickle)

        return by_kind

    def for_field(self, name: str) -> FieldDecoder:
        return self._by_name[name]

    def decode(self, name: str, data: bytes | memoryview) -> Any:
        """A tar member's value."""
        return self._by_name[name](bytes(data))

    def decode_cell(self, name: str, value: Any) -> Any:
        """A Parquet cell's value (already decoded by its column type): only bytes cells
        go through the registered and extension decoders; a bytes field stays bytes."""
        if not isinstance(value, bytes):
            return value
        return self._by_name[name](value)

    def decode_image(self, name: str, data: bytes | memoryview, pipeline: str) -> Any:
        """The image field's value under ``"decode"`` or ``"none"`` (``"train"`` and
        ``"eval"`` crop in dataflow.decode.image instead)."""
        if pipeline == "none":
            return bytes(data)
        registered = self._registered_image.get(name)
        if registered is not None:
            return registered(bytes(data))
        return codec.decode_image(data)
