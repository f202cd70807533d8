"""A sweep's search space and its trials: `KEY=V1,V2` axes form a grid, `KEY=loguniform:LOW:HIGH` (or
`uniform:`, `randint:`) axes are drawn `--samples` times. Pure config-level code: the trials are fixed
by the command line and the seed, so rerunning a sweep finds the same trials under the same names.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass

from pipeline.errors import SweepError

DISTRIBUTIONS = ("loguniform", "uniform", "randint")


@dataclass(frozen=True)
class Axis:
    """One swept key: a list of values (grid), or a distribution to draw from (random)."""

    key: str
    values: tuple[str, ...] = ()
    distribution: str | None = None
    low: float = 0.0
    high: float = 0.0

    @property
    def values_text(self) -> str:
        """What the command line gave after `KEY=`: `1e-3,3e-4` or `loguniform:0.0001:0.01`."""
        return ",".join(self.values) if self.distribution is None else f"{self.distribution}:{self.low:g}:{self.high:g}"

    def draw(self, rng: random.Random) -> str:
        """One value of a random axis, as override text (floats to 3 significant digits, so the trial
        name shows the exact value the trial uses)."""
        if self.distribution == "randint":
            return str(rng.randrange(int(self.low), int(self.high)))
        if self.distribution == "loguniform":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return f"{value:.3g}"


@dataclass(frozen=True)
class Trial:
    """One trial of a sweep: its run name and the overrides that make its config."""

    name: str
    overrides: tuple[str, ...]


def split_values(text: str) -> list[str]:
    """`1e-3,3e-4` -> ["1e-3", "3e-4"]; commas inside [] or {} belong to a YAML value."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_axis(text: str) -> Axis:
    """`train.lr=1e-3,3e-4` -> a grid axis; `train.lr=loguniform:1e-4:1e-2` -> a random axis."""
    key, sep, values_text = text.partition("=")
    key = key.strip()
    example = "e.g. train.lr=1e-3,3e-4 or train.lr=loguniform:1e-4:1e-2"
    if not key or "." not in key or not sep or not values_text.strip():
        raise SweepError(f"sweep axis `{text}` must look like section.key=value1,value2 ({example})")
    name, _, bounds = values_text.partition(":")
    if name in DISTRIBUTIONS:
        return _random_axis(text, key, name, bounds)
    values = split_values(values_text)
    if "" in values:
        raise SweepError(f"sweep axis `{text}` has an empty value ({example})")
    if len(set(values)) != len(values):
        raise SweepError(f"sweep axis `{text}` repeats a value")
    return Axis(key, tuple(values))


def _random_axis(text: str, key: str, distribution: str, bounds: str) -> Axis:
    try:
        low, high = (float(part) for part in bounds.split(":"))
    except ValueError:
        raise SweepError(f"sweep axis `{text}` must look like {key}={distribution}:LOW:HIGH") from None
    if not low < high or (distribution == "loguniform" and low <= 0):
        raise SweepError(f"sweep axis `{text}`: LOW must be below HIGH (and above 0 for loguniform)")
    return Axis(key, distribution=distribution, low=low, high=high)


def parse_axes(texts: list[str]) -> list[Axis]:
    axes = [parse_axis(text) for text in texts]
    keys = [axis.key for axis in axes]
    if len(set(keys)) != len(keys):
        raise SweepError(f"a sweep names a key twice: {', '.join(keys)}")
    return axes


def grid_combinations(axes: list[Axis]) -> list[list[str]]:
    """The cartesian product of the grid axes as override lists, first axis varying slowest."""
    grid = [axis for axis in axes if axis.distribution is None]
    return [
        [f"{axis.key}={value}" for axis, value in zip(grid, combo)]
        for combo in itertools.product(*(axis.values for axis in grid))
    ]


def sweep_trials(base_name: str, axes: list[Axis], samples: int = 1, seed: int = 0) -> list[Trial]:
    """Every trial: each grid combination once per sample, with the random axes drawn anew per trial
    (seeded: the same command gives the same trials). A name shows the values that vary."""
    random_axes = [axis for axis in axes if axis.distribution is not None]
    if samples > 1 and not random_axes:
        raise SweepError(
            "--samples draws random values, and no axis has a range to draw from; give one such as "
            "train.lr=loguniform:1e-4:1e-2, or leave --samples out"
        )
    varying = {axis.key for axis in axes if axis.distribution is not None or len(axis.values) > 1}
    rng = random.Random(seed)
    trials = []
    for _ in range(samples):
        for combination in grid_combinations(axes):
            drawn = [f"{axis.key}={axis.draw(rng)}" for axis in random_axes]
            overrides = [*combination, *drawn]
            shown = [item for item in overrides if item.split("=", 1)[0] in varying]
            trials.append(Trial(combination_name(base_name, shown), tuple(overrides)))
    names = [trial.name for trial in trials]
    if len(set(names)) != len(names):
        raise SweepError(
            "two trials get the same run name (names use the last part of each key, and random values "
            "to 3 significant digits): sweep keys whose last parts differ, or a wider range"
        )
    return trials


def combination_name(base: str, combination: list[str]) -> str:
    """`gpt-tiny` + [train.lr=1e-3, model.n_layers=2] -> `gpt-tiny-lr=1e-3-n_layers=2` (safe as a dir name)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in (item.split("=", 1) for item in combination)]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join([base, *parts]))
