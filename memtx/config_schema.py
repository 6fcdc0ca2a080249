"""What a config field may hold, declared beside it: `Literal[...]` for a choice of names, and
`bounded(default, ...)` for a number's range. `check_fields` checks every field of a config
section against its declaration and raises a one-line ConfigError naming the key; every float
must be finite. No JAX here (a kind's options use it too).

    dtype: Literal["float32", "bfloat16"] = "float32"
    num_layers: int = bounded(4, gt=0)
    dropout: float = bounded(0.0, ge=0, lt=1)
    clamp_len: int = bounded(0, ge=0, note="0: no clamping")
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from memtx.errors import ConfigError


@dataclass(frozen=True)
class Range:
    ge: float | None = None
    gt: float | None = None
    lt: float | None = None
    le: float | None = None
    note: str = ""  # what a boundary value means: "(0: no limit)" follows the range in the message
    text: str = ""  # the range in words, instead of the one derived from the bounds

    def holds(self, value) -> bool:
        return not ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                    or (self.lt is not None and value >= self.lt) or (self.le is not None and value > self.le))

    def describe(self) -> str:
        if self.text:
            words = self.text
        else:
            low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
            high = f"{_num(self.lt)})" if self.lt is not None else f"{_num(self.le)}]" if self.le is not None else None
            if low and high:
                words = f"in {low}, {high}"
            elif low:
                words = f"{'>=' if self.ge is not None else '>'} {low[1:]}"
            else:
                words = f"{'<' if self.lt is not None else '<='} {high[:-1]}"
        return words + (f" ({self.note})" if self.note else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def bounded(default, *, ge=None, gt=None, lt=None, le=None, note: str = "", text: str = ""):
    """A numeric field with its allowed range (the dataclass field's metadata)."""
    return field(default=default, metadata={"range": Range(ge, gt, lt, le, note, text)})


def choices(typ) -> tuple | None:
    """The values of a Literal type (None for any other type)."""
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else None


def describe_choices(values: tuple) -> str:
    names = [str(v) for v in values if v != ""]
    listed = names[0] if len(names) == 1 else (f"{names[0]} or {names[1]}" if len(names) == 2
                                               else f"one of {', '.join(names)}")
    return f"empty or {listed}" if "" in values else listed


def type_problem(value, typ) -> str | None:
    """What is wrong with the type of `value` for a field of type `typ` (a config file sets fields
    directly: nothing parsed them), or None."""
    allowed = choices(typ)
    if allowed is not None:
        typ = type(allowed[0])
    if isinstance(typ, type) and dataclasses.is_dataclass(typ):
        return None if isinstance(value, typ) else f"a {typ.__name__} section"
    if typ is bool:
        return None if isinstance(value, bool) else "true or false"
    if typ is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if typ is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if typ is str:
        return None if isinstance(value, str) else "a string"
    if typing.get_origin(typ) is tuple:
        if not isinstance(value, (tuple, list)):
            return "a tuple"
        args = typing.get_args(typ)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (int, str):
            bad = [v for v in value if type_problem(v, args[0])]
            return f"a tuple of {args[0].__name__}" if bad else None
    return None


def check_fields(section: Any, prefix: str) -> None:
    """Every field of the dataclass `section` against its type (as a config file may set anything;
    a sub-section must be one, its fields are not looked into), its Literal and its range;
    `prefix` names the section ("model.knn.", "" for the config)."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, typ, key = getattr(section, f.name), hints[f.name], f"{prefix}{f.name}"
        wanted = type_problem(value, typ)
        if wanted is not None:
            raise ConfigError(f"config key '{key}' must be {wanted}, got {value!r:.60} ({type(value).__name__})")
        allowed = choices(typ)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"config key '{key}' must be {describe_choices(allowed)}, got {value!r}")
        if typ is float and isinstance(value, (int, float)) and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
        bounds = f.metadata.get("range")
        if bounds is not None and isinstance(value, (int, float)) and not bounds.holds(value):
            raise ConfigError(f"config key '{key}' must be {bounds.describe()}, got {value}")
