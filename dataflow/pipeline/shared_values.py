"""Nested sample values through a shared-memory segment: what crosses a pipe instead.

The transform pool (dataflow.pipeline.transform_pool) moves samples between processes this
way. ``Packer.pack`` walks a value (dicts, lists and tuples are rebuilt as such) and writes
every numpy array (object arrays excepted), strided torch tensor and ``bytes``/``bytearray``
of ``SHARED_BYTES_MIN`` or more (memoryviews always) into the segment at aligned offsets,
returning a copy of the value where each of them is a small named tuple — offset, dtype,
shape — that pickles in microseconds. ``unpack`` rebuilds the value on the other side:
views on the segment (the worker's input), or copies (the caller's results, so that the
segment is free again). ``pack_samples`` packs as many samples as fit; a sample alone too
big for the segment has its bytes carried in the named tuples instead (``inline``).
Arrays come back with their dtype and shape, C-contiguous; tensors by their raw bytes, so
dtypes numpy lacks (bfloat16) survive.
"""

from __future__ import annotations

from collections.abc import Sequence
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Final, NamedTuple

import numpy as np
import torch

ALIGNMENT: Final = 64
"""Offsets of values in a segment (a cache line: no dtype needs more)."""
SHARED_BYTES_MIN: Final = 4096
"""bytes, bytearray and memoryview values from this size travel through the segment."""

# An ``inline`` copy of the bytes replaces the offset when the segment is too small for the
# value's sample (see ``pack_samples``): raw bytes, not numpy's pickle, which loses the byte
# order of a strided big-endian array and keeps a Fortran array's order.


class SharedArray(NamedTuple):  # named tuples: pickled ~3× faster than dataclasses
    offset: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    writeable: bool
    inline: bytearray | None = None


class SharedTensor(NamedTuple):
    offset: int
    nbytes: int
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    inline: bytearray | None = None


class SharedBytes(NamedTuple):
    offset: int
    nbytes: int
    kind: type  # bytes, bytearray or memoryview
    inline: bytearray | None = None


def segment_buffer(segment: SharedMemory) -> memoryview:
    buffer = segment.buf
    assert buffer is not None, "a closed segment"
    return buffer


class SegmentFull(Exception):
    """The value does not fit what is left of the segment."""


class Packer:
    """Writes values into a segment from its start; ``pack`` returns what replaces them."""

    def __init__(self, segment: SharedMemory) -> None:
        self.buffer = segment_buffer(segment)
        self.capacity = segment.size
        self.used = 0
        self.inline = False
        """True: the bytes of arrays travel in the metadata (pickled through the pipe)."""

    def _reserve(self, nbytes: int) -> int:
        offset = -(-self.used // ALIGNMENT) * ALIGNMENT
        if offset + nbytes > self.capacity:
            raise SegmentFull
        self.used = offset + nbytes
        return offset

    def _place(self, flat: Any) -> tuple[int, bytearray | None]:
        """(offset, None) of a flat byte buffer written into the segment, or (0, a copy)."""
        if self.inline:
            return 0, bytearray(flat)
        offset = self._reserve(len(flat))
        self.buffer[offset : offset + len(flat)] = flat
        return offset, None

    def pack(self, value: Any) -> Any:
        kind = type(value)
        if kind is dict:
            return {name: self.pack(item) for name, item in value.items()}
        if kind is list:
            return [self.pack(item) for item in value]
        if kind is tuple:
            return tuple(self.pack(item) for item in value)
        if isinstance(value, np.ndarray) and not value.dtype.hasobject:
            if self.inline:
                offset, inline = self._place(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
            else:  # straight into the segment in C order, without an intermediate copy
                offset, inline = self._reserve(value.nbytes), None
                target = np.ndarray(value.shape, value.dtype, buffer=self.buffer, offset=offset)
                np.copyto(target, value, casting="no")
            return SharedArray(offset, value.dtype, value.shape, value.flags.writeable, inline)
        if isinstance(value, torch.Tensor) and value.layout == torch.strided:
            try:
                flat = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            except RuntimeError:  # e.g. a quantized tensor: pickled whole
                return value
            offset, inline = self._place(flat)
            dtype = str(value.dtype).removeprefix("torch.")
            return SharedTensor(offset, flat.nbytes, dtype, tuple(value.shape), inline)
        if kind is memoryview or (kind in (bytes, bytearray) and len(value) >= SHARED_BYTES_MIN):
            if self.inline and kind is not memoryview:
                return value  # pickles as it is
            data = memoryview(value).cast("B")
            offset, inline = self._place(data)
            return SharedBytes(offset, data.nbytes, kind, inline)
        return value


def unpack(value: Any, buffer: memoryview, *, copy: bool) -> Any:
    """The value ``pack`` replaced: views on the segment, or (``copy``) copies."""
    kind = type(value)
    if kind is dict:
        return {name: unpack(item, buffer, copy=copy) for name, item in value.items()}
    if kind is list:
        return [unpack(item, buffer, copy=copy) for item in value]
    if kind is tuple:
        return tuple(unpack(item, buffer, copy=copy) for item in value)
    if kind is SharedArray:
        source = buffer if value.inline is None else value.inline
        array = np.ndarray(value.shape, value.dtype, buffer=source, offset=value.offset)
        if copy:
            return array.copy()
        array.flags.writeable = value.writeable
        return array
    if kind is SharedTensor:
        source = buffer if value.inline is None else value.inline
        raw = np.ndarray((value.nbytes,), np.uint8, buffer=source, offset=value.offset)
        flat = torch.from_numpy(raw.copy() if copy else raw)
        return flat.view(getattr(torch, value.dtype)).reshape(value.shape)
    if kind is SharedBytes:
        source = buffer if value.inline is None else memoryview(value.inline)
        data = source[value.offset : value.offset + value.nbytes]
        if value.kind is memoryview:
            return memoryview(bytes(data)) if copy else data
        return value.kind(data)
    if copy and isinstance(value, torch.Tensor):
        return value.contiguous()  # one pickled whole, in the layout it had
    return value


def pack_samples(packer: Packer, samples: Sequence[Any], start: int) -> tuple[list[Any], int, bool]:
    """Packs ``samples[start:]`` until the segment is full: (metadata, how many, whether the
    first of them had to be pickled because it alone exceeds the segment)."""
    packer.used, packer.inline = 0, False
    packed: list[Any] = []
    for sample in samples[start:]:
        mark = packer.used
        try:
            packed.append(packer.pack(sample))
        except SegmentFull:
            packer.used = mark
            if packed:
                break
            packer.inline = True  # alone and too big: its arrays go through the pipe
            packed.append(packer.pack(sample))
            return packed, 1, True
    return packed, len(packed), False
