"""Typed errors for bad data. Each names where the problem is and what to do next.

``DataError`` carries the shard (URL or relative path), the sample key and the byte offset
when they are known, so a log line or a skip record is enough to find the bytes again.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: a sample, a shard, a record or an index that cannot be used."""

    def __init__(
        self,
        message: str,
        *,
        shard: str | None = None,
        key: str | None = None,
        offset: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.shard = shard
        self.key = key
        self.offset = offset
        self.reason = message
        where = []
        if shard is not None:
            where.append(f"shard {shard}")
        if key is not None:
            where.append(f"sample {key!r}")
        if offset is not None:
            where.append(f"byte {offset}")
        text = f"{', '.join(where)}: {message}" if where else message
        if hint:
            text += f" ({hint})"
        super().__init__(text)

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries (conversion workers): keep message and fields.
        return (_rebuild, (type(self), str(self), dict(self.__dict__)))


def _rebuild(kind: type[DataError], text: str, state: dict[str, object]) -> DataError:
    error = kind.__new__(kind)
    Exception.__init__(error, text)
    error.__dict__.update(state)
    return error


class BadSampleError(DataError):
    """One sample cannot be decoded or lacks a field; the rest of its shard is fine."""


class BadShardError(DataError):
    """A shard is truncated, corrupt or does not match the index."""


class UnsafeMemberError(BadShardError):
    """A tar member whose name or type could escape a directory or reach outside the shard."""


class DatasetIndexError(DataError):
    """The dataset index (index.json or a sample table) is missing, corrupt or too new."""


class DatasetChangedError(DatasetIndexError):
    """The dataset was replaced or removed while a loader was reading it."""


class TooManySkipsError(DataError):
    """More samples were skipped in an epoch than ``data.max_skip_fraction`` allows."""


class SourceError(DataError):
    """A conversion input record is unreadable or incomplete."""

    def __init__(self, message: str, *, source: str, hint: str | None = None) -> None:
        self.source = source
        super().__init__(f"{source}: {message}", hint=hint)
