"""The search: coordinate ascent led by the bottleneck stage, inside time and memory budgets.

Each round measures the current setting and reads which stage is the bottleneck; then:

1. single knobs, that stage's first: one step up, or (if up did not pay) one step down —
   more threads than cores can lose. A change stays only if it gains ``min_gain``, and a
   knob that gained is pushed further the same way;
2. when a step up that would pay does not fit the memory budget: the same step with another
   knob, of any stage, stepped down until it fits (more connections for smaller ranges, or
   for fewer prefetched batches); if none gains at once, the best of them gets one pass of
   single steps around it, a step that does not fit paid for by another knob one step down;
3. when no single knob gains: all of the bottleneck stage's knobs one step up together —
   limits that hold each other back (connections capped by the shards in flight, those by
   read-ahead) give way only jointly.

When nothing gains, the search has converged. A setting whose memory estimate exceeds the
budget is never measured; one whose measured memory exceeds it is never chosen. Every
measured setting is remembered, so none is measured twice.

``measure(values)`` returns a ``Measurement`` (samples/s, the bottleneck stage, the memory
it held, the seconds it took); the clock is the sum of those seconds, so a simulated
pipeline runs the same search in no time (``simulated``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dataflow.tuning.space import Knob


@dataclass(frozen=True)
class Measurement:
    rate: float
    """Samples per second."""
    bottleneck: str
    """The busiest stage (fetch, decode, batch), or "consumer" when the data path keeps up."""
    memory: float
    """Bytes the setting held (measured peak above the base, or an estimate)."""
    seconds: float
    """How long the measurement took."""


@dataclass
class Trial:
    number: int
    values: dict[str, Any]
    measurement: Measurement | None
    """None: not measured (over the memory budget by its estimate)."""
    accepted: bool = False
    changed: str = ""
    """The knob this trial moved from the setting it was compared with ("" for the start)."""
    elapsed: float = 0.0
    """Search seconds spent when it finished."""


@dataclass
class Result:
    best: Trial
    start: Trial
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0
    converged: bool = False

    @property
    def gain(self) -> float:
        assert self.best.measurement and self.start.measurement
        return self.best.measurement.rate / max(self.start.measurement.rate, 1e-12)


def key(values: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(values.items()))


def tune(
    knobs: list[Knob],
    start: dict[str, Any],
    measure: Callable[[dict[str, Any]], Measurement],
    *,
    budget_s: float,
    memory_budget: float,
    estimate: Callable[[dict[str, Any]], float],
    min_gain: float = 0.03,
) -> Result:
    """Search ``knobs`` from ``start`` (every knob's path must be in it)."""
    missing = [k.path for k in knobs if k.path not in start]
    if missing:
        raise ValueError(f"the starting values lack {missing}")
    seen: dict[tuple[tuple[str, Any], ...], Trial] = {}
    trials: list[Trial] = []
    clock = 0.0

    def run(values: dict[str, Any], changed: str) -> Trial:
        nonlocal clock
        known = seen.get(key(values))
        if known is not None:
            return known
        trial = Trial(len(trials), dict(values), None, changed=changed)
        if estimate(values) <= memory_budget:
            trial.measurement = measure(values)
            clock += trial.measurement.seconds
        trial.elapsed = clock
        seen[key(values)] = trial
        trials.append(trial)
        return trial

    def fits(trial: Trial) -> bool:
        return trial.measurement is not None and trial.measurement.memory <= memory_budget

    current = run(start, "")
    current.accepted = True

    def index_of(knob: Knob, values: dict[str, Any]) -> int | None:
        value = values[knob.path]
        return knob.values.index(value) if not isinstance(value, str) and (
            value in knob.values) else None  # fmt: skip

    def trade(stage: str) -> bool:
        nonlocal current
        ordered = [k for k in knobs if k.stage == stage] + [k for k in knobs if k.stage != stage]
        options = []
        for steps in (1, 2, 3):  # along the memory frontier, nearest first
            for up in ordered:
                i = index_of(up, current.values)
                if i is None or i + steps >= len(up.values):
                    continue
                raised = {**current.values, up.path: up.values[i + steps]}
                if estimate({**current.values, up.path: up.values[i + 1]}) <= memory_budget:
                    continue  # not held back by memory: the single-knob pass tried it
                for down in knobs:  # any stage may give memory back
                    j = index_of(down, current.values)
                    if down is up or j is None:
                        continue
                    for lower in range(j - 1, -1, -1):
                        traded = {**raised, down.path: down.values[lower]}
                        if estimate(traded) <= memory_budget:
                            options.append((traded, f"{up.path} up {steps}, {down.path} down"))
                            break
        tried, first_new = [], len(trials)
        for values, change in options:
            if clock >= budget_s:
                break
            candidate = run(values, change)
            if better(candidate, current):
                candidate.accepted = True
                current = candidate
                return True
            if fits(candidate) and candidate.number >= first_new:  # settings left before
                tried.append(candidate)
        # None gains at once; the best of them may, once the knobs it stepped down are
        # re-balanced around it (one pass of single steps from there).
        for candidate in sorted(tried, key=lambda t: -t.measurement.rate)[:2]:  # type: ignore[union-attr]
            point = candidate
            for knob in knobs:
                i = index_of(knob, point.values)
                if i is None and not isinstance(point.values[knob.path], str):
                    continue
                moves = range(len(knob.values)) if i is None else (i + 1, i - 1)
                for j in moves:
                    if clock >= budget_s or not 0 <= j < len(knob.values):
                        continue
                    for values in fitted({**point.values, knob.path: knob.values[j]}, knob):
                        moved = run(values, knob.path)
                        if better(moved, point, 0.0):
                            point = moved
                            break
            if better(point, current):
                candidate.accepted = point.accepted = True
                current = point
                return True
        return False

    def fitted(values: dict[str, Any], moved: Knob) -> list[dict[str, Any]]:
        """``values`` if within the memory budget; else each way one other knob one step
        down makes it fit (a step up that must be paid for, when re-balancing a trade)."""
        if estimate(values) <= memory_budget:
            return [values]
        variants = []
        for knob in knobs:
            j = index_of(knob, values)
            if knob is not moved and j is not None and j > 0:
                lowered = {**values, knob.path: knob.values[j - 1]}
                if estimate(lowered) <= memory_budget:
                    variants.append(lowered)
        return variants

    def better(candidate: Trial, than: Trial, gain: float | None = None) -> bool:
        assert than.measurement is not None
        return fits(candidate) and candidate.measurement is not None and (
            candidate.measurement.rate
            >= than.measurement.rate * (1 + (min_gain if gain is None else gain))
        )  # fmt: skip

    best = current
    converged = False
    while clock < budget_s:
        assert current.measurement is not None
        stage = current.measurement.bottleneck
        order = [k for k in knobs if k.stage == stage] + [k for k in knobs if k.stage != stage]
        improved = False
        for knob in order:
            if clock >= budget_s:
                break
            index = knob.values.index(current.values[knob.path]) if (
                current.values[knob.path] in knob.values) else 0  # fmt: skip
            for direction in (1, -1):
                moved = False
                step = index + direction
                while 0 <= step < len(knob.values) and clock < budget_s:
                    candidate = run({**current.values, knob.path: knob.values[step]}, knob.path)
                    if not better(candidate, current):
                        break
                    candidate.accepted = True
                    current, moved, improved = candidate, True, True
                    step += direction
                if moved:
                    break  # pushed this knob as far as it paid; next knob
            if improved and current.measurement is not None and (
                current.measurement.bottleneck != stage
            ):  # fmt: skip
                break  # the bottleneck moved: start the round from its stage
        if not improved and clock < budget_s:
            # Held back by memory: a knob that would pay but does not fit may fit when
            # another knob of the stage gives some back (more connections, smaller ranges).
            improved = trade(stage)
        if not improved and clock < budget_s:
            # Coupled limits (connections capped by shards in flight, shards by read-ahead):
            # no single knob pays, all of the bottleneck stage's together may.
            while clock < budget_s:
                joint = dict(current.values)
                for knob in knobs:
                    value = current.values[knob.path]
                    numeric = not isinstance(value, str) and value in knob.values
                    if knob.stage == stage and numeric:
                        joint[knob.path] = knob.values[min(knob.values.index(value) + 1,
                                                           len(knob.values) - 1)]  # fmt: skip
                if joint == current.values:
                    break
                candidate = run(joint, f"{stage} (all its knobs)")
                if not better(candidate, current):
                    break
                candidate.accepted = True
                current, improved = candidate, True
        if current.measurement and (best.measurement is None or
                                    current.measurement.rate > best.measurement.rate):  # fmt: skip
            best = current
        if not improved:
            converged = True
            break
    return Result(best=best, start=trials[0], trials=trials, seconds=clock, converged=converged)
