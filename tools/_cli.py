"""Shared command-line plumbing for tools/: --config FILE, --section.key=value overrides,
logging, and one exit path that prints typed errors as one readable line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from dataflow.config import ConfigError
from dataflow.errors import DataError
from dataflow.storage import StorageError
from trainer.config import Config, load

T = TypeVar("T")


def parser(description: str) -> argparse.ArgumentParser:
    result = argparse.ArgumentParser(
        description=description,
        epilog="Any config field can be overridden as --section.key=value "
        "(e.g. --storage.endpoint_url=http://127.0.0.1:9000).",
    )
    result.add_argument("--config", help="TOML config file (see configs/)")
    result.add_argument("--quiet", action="store_true", help="no progress bars")
    result.add_argument("--verbose", action="store_true", help="debug logging")
    return result


def parse(
    arguments: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, Config]:
    from dataflow.config import split_overrides

    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = arguments.parse_args(rest)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = load(args.config, overrides)
    except ConfigError as error:
        arguments.exit(2, f"{arguments.prog}: config error: {error}\n")
    return args, config


def apply_flags(section: T, args: argparse.Namespace) -> T:
    """``section`` (a config dataclass) with the fields given as flags replaced (--max-shard-bytes
    sets max_shard_bytes). A value the section refuses becomes a ConfigError that names the
    flag as typed, so the user sees one line, not a traceback from ``__post_init__``."""
    fields = dataclasses.fields(section)  # type: ignore[arg-type]
    flags = {
        f.name: getattr(args, f.name) for f in fields if getattr(args, f.name, None) is not None
    }
    try:
        return dataclasses.replace(section, **flags)  # type: ignore[type-var]
    except ValueError as error:
        named = [name for name in flags if re.search(rf"\b{name}\b", str(error))] or list(flags)
        given = ", ".join(f"--{name.replace('_', '-')} {flags[name]}" for name in named)
        raise ConfigError(f"{given}: {error}") from None


def run(main: Callable[[], Any]) -> None:
    """Call ``main``; typed failures become one line on stderr and exit status 1."""
    try:
        status = main()
    except (DataError, StorageError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(status or 0))
