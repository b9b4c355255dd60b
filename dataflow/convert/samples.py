"""Samples as Python programs give them to ShardWriter and convert_samples: checked, encoded.

A sample is a dict in WebDataset convention: ``__key__`` plus one entry per field, named by
extension. The extension says the field's kind (dataflow.formats.codec.kind_for_extension),
and the value is encoded by it: ``cls`` int → ASCII, ``txt`` str → UTF-8, ``json`` object →
JSON, ``npy`` ndarray → .npy. Bytes are taken as the stored encoding, checked to decode as
that kind (images as ``validate_images`` asks), so the loader cannot meet them later as bad
data. Values of another type are refused, never ``str()``-ed; keys that would split a sample
or move it in the tar (dots, slashes) are refused. Every refusal names the key and the field.
Cost: one encode per field, and for image bytes the CLI's image check (a 1/8-scale decode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from dataflow.convert.sources import ImageFolderSource, image_problem
from dataflow.errors import DataError
from dataflow.formats import codec

KEY = "__key__"
_KEY_FORBIDDEN = {".": "a '.'", "/": "a '/'", "\\": "a '\\'"}


class SampleError(DataError):
    """A sample given to ShardWriter or convert_samples cannot be written as it is."""


class SampleTypeError(SampleError, TypeError):
    """A field's value is not of a type its extension can be encoded from."""


# ---------------------------------------------------------------------------------------------
# Validating and encoding one sample


def check_key(key: Any) -> str:
    """``key`` if it is a usable sample key; tar member names are ``<key>.<field>``, split
    at the first dot, so a dot or a path separator would split or move the sample."""
    if not isinstance(key, str) or not key:
        raise SampleError(
            f"{KEY} must be a non-empty str, got {key!r}",
            hint="give every sample a unique name, e.g. {'__key__': 'sample-000001', ...}",
        )
    for character, name in _KEY_FORBIDDEN.items():
        if character in key:
            safe = "".join("_" if c in _KEY_FORBIDDEN or not c.isprintable() else c for c in key)
            raise SampleError(
                f"{KEY} has {name}, which would split the sample or move it into a directory "
                "of the tar",
                key=key,
                hint=f"use a key without dots and slashes, e.g. {safe!r}",
            )
    if not key.isprintable():
        raise SampleError(f"{KEY} has a control character", key=key, hint="use printable keys")
    return key


def check_field_name(key: str, name: Any) -> str:
    if (
        not isinstance(name, str) or not name or name.startswith((".", "__")) or name.endswith(".")
        or "/" in name or "\\" in name or ".." in name or not name.isprintable()
    ):  # fmt: skip
        raise SampleError(
            f"field {name!r} is not a usable extension",
            key=key,
            hint="name fields by extension, e.g. 'jpg', 'cls', 'txt', 'json', 'npy', 'seg.png'",
        )
    return name


# Python types each kind is encoded from; anything else is refused rather than str()-ed.
_ACCEPTED: dict[str, tuple[type, ...]] = {
    "int": (int, np.integer),
    "float": (float, int, np.floating, np.integer),
    "str": (str,),
    "tokens": (np.ndarray, list),
    "npy": (np.ndarray,),
}
_EXAMPLES = {
    "image": "the encoded file's bytes",
    "bytes": "bytes",
    "int": "an int",
    "float": "a float",
    "str": "a str",
    "tokens": "a 1-D integer ndarray",
    "npy": "an ndarray",
}


def encode_field(
    key: str, name: str, value: Any, *, validate_images: str, allow_pickle: bool
) -> bytes:
    """The stored bytes of field ``name`` = ``value``; a wrong type names key and field."""
    kind = codec.kind_for_extension(name)
    try:
        if isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
            # Stored bytes as they are, but proven decodable: the loader would fail later.
            if kind == "image":
                try:
                    ImageFolderSource._validate(data, validate_images)
                except ValueError as error:
                    raise SampleError(
                        f"field {name!r} (image): {image_problem(error)}", key=key
                    ) from None
            elif kind == "pickle" and not allow_pickle:
                raise codec.PickleRefusedError("pickle can run code; pass allow_pickle=True")
            elif kind not in ("bytes", "pickle"):
                codec.decode(kind, data)
            return data
        accepted = _ACCEPTED.get(kind)
        if kind in ("image", "bytes") or (accepted and not isinstance(value, accepted)):
            raise SampleTypeError(
                f"field {name!r} ({kind}) needs {_EXAMPLES[kind]}, got {type(value).__name__}",
                key=key,
                hint="pass a value of that type, or its stored bytes",
            )
        return codec.encode(kind, value, allow_pickle=allow_pickle)
    except SampleError:
        raise
    except (TypeError, ValueError) as error:
        kind_of_error = SampleTypeError if isinstance(error, TypeError) else SampleError
        raise kind_of_error(f"field {name!r} ({kind}): {error}", key=key) from None


def encode_sample(
    sample: Any, *, validate_images: str, allow_pickle: bool
) -> tuple[str, list[tuple[str, bytes]]]:
    """(key, [(field, stored bytes), …]) of one sample dict, checked."""
    if not isinstance(sample, Mapping):
        raise SampleTypeError(
            f"a sample must be a dict with {KEY} and fields by extension, "
            f"got {type(sample).__name__}"
        )
    if KEY not in sample:
        raise SampleError(
            f"a sample has no {KEY} (fields {sorted(map(str, sample))[:5]})",
            hint="add '__key__': a unique name without dots or slashes",
        )
    key = check_key(sample[KEY])
    members = [
        (check_field_name(key, name), encode_field(key, name, value,
         validate_images=validate_images, allow_pickle=allow_pickle))
        for name, value in sample.items() if name != KEY
    ]  # fmt: skip
    if not members:
        raise SampleError("the sample has no fields", key=key, hint="add e.g. 'txt' or 'jpg'")
    return key, members
