"""Name → factory tables for the trainer's pluggable parts: models, tasks, optimizers and
gradient compressors.

A config names a part either by a registered name (``model.name = "gpt"``) or by an import
path, ``"package.module:function"`` (dataflow's ``load_callable``, the form data transforms
use), so a user's own model, task, optimizer or compressor needs no change to the trainer.
An unknown name is a ``ConfigError`` naming the config key and the names that exist — never
a fall-through to some default. Registering from Python::

    from trainer.optim import OPTIMIZERS

    @OPTIMIZERS.register("my_sgd")
    def build(config, params): ...

Cost: one dict look-up (or one import) when the trainer is built; nothing per step.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from dataflow.config import ConfigError
from dataflow.pipeline.transform import load_callable

Factory = TypeVar("Factory", bound=Callable[..., object])


def is_import_path(name: str) -> bool:
    """Whether a configured name is ``"package.module:function"`` rather than a registered name."""
    return ":" in name


class Registry(Generic[Factory]):
    """Factories by name for one kind of part; ``setting`` is the config key that names one."""

    def __init__(self, kind: str, setting: str) -> None:
        self.kind = kind
        self.setting = setting
        self._factories: dict[str, Factory] = {}

    def register(self, name: str) -> Callable[[Factory], Factory]:
        """A decorator adding ``factory`` under ``name`` (a second one of a name is refused)."""

        def add(factory: Factory) -> Factory:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered already")
            if is_import_path(name):
                raise ValueError(f"{self.kind} name {name!r} may not contain ':'")
            self._factories[name] = factory
            return factory

        return add

    @property
    def names(self) -> list[str]:
        return sorted(self._factories)

    def check(self, name: str) -> None:
        """A ConfigError unless ``name`` is registered or has the form of an import path
        (which is imported only when the part is built: it may live where the config
        loader does not run)."""
        if name in self._factories or is_import_path(name):
            return
        close = difflib.get_close_matches(name, self.names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{self.setting} = {name!r} is no known {self.kind}{hint} (known: "
            f"{', '.join(self.names)}; or name your own as 'package.module:function')"
        )

    def get(self, name: str) -> Factory:
        """The factory for ``name``: registered, or imported from ``package.module:function``."""
        self.check(name)
        if name in self._factories:
            return self._factories[name]
        loaded: Factory = load_callable(name, setting=self.setting)  # type: ignore[assignment]
        return loaded
