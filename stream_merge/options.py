"""How a merge option is declared: one `Option` per `MergeConfig` field, and the value checks it uses.

`config.MergeConfig` declares every option once, as a dataclass field whose metadata is an `Option`: its help,
CLI flag(s), which subcommands take it, how a YAML / keyword value is checked, whether it is recorded in the
journal and `stream_merge.json`, whether it enters the resume fingerprint, and which other options it needs
or excludes. The argparse parser, YAML coercion, the recorded and fingerprinted options and every
combination check are derived from that table, so adding an option touches one declaration plus its
behaviour. Pure: no IO.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

Coerce = Callable[[str, Any], Any]

# A row block is held in memory (fp32) once per compute thread; past 1 GiB bigger blocks no longer make the
# GEMMs faster, they only make a merge run out of memory on ordinary machines.
MAX_BLOCK_SIZE_MB = 1024
# Each prefetched Hub shard is a whole base shard on disk at once (5 GB and more for large models).
MAX_PREFETCH = 16


@dataclass(frozen=True)
class Conflict:
    """`other` may not be given together with the option that declares this."""

    other: str
    message: str
    fix: str


@dataclass(frozen=True)
class Option:
    """Everything about one merge option except its name, type and default (the dataclass field's)."""

    help: str
    coerce: Coerce
    flags: tuple[str, ...] = ()                # CLI flags; () = a positional argument
    commands: tuple[str, ...] = ("merge", "plan")
    cli: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # extra argparse keywords
    from_cli: Callable[[Any], Any] | None = None  # CLI value -> the form `coerce` takes
    aliases: tuple[str, ...] = ()              # other YAML / keyword names
    record: bool = False                       # written to the journal's and stream_merge.json's "options"
    fingerprint: bool = False                  # a change refuses to resume (it changes the output bytes)
    requires: str | None = None                # given only together with this option
    conflicts: tuple[Conflict, ...] = ()
    base_kind: str | None = None               # "local" / "hub": only with that kind of BASE


def opt(default: Any = dataclasses.MISSING, *, repr: bool = True, **option: Any) -> Any:
    """A `MergeConfig` field declared with its `Option` (keyword arguments as in `Option`)."""
    return dataclasses.field(default=default, repr=repr, metadata={"option": Option(**option)})


@dataclass(frozen=True)
class Declared:
    """One option of the table: the field's name and default with its `Option`."""

    name: str
    default: Any
    option: Option

    @property
    def flag(self) -> str:
        """How a user names it on the command line (the first flag, or the positional's name)."""
        return self.option.flags[-1] if self.option.flags else self.name.upper()

    def given(self, value: Any) -> bool:
        """Whether `value` asks for something the default does not (None and the default do not)."""
        return value is not None and value != self.default


def declared(config_class: type) -> Iterator[Declared]:
    """The options of a dataclass whose fields carry `Option` metadata, in declaration order."""
    for f in dataclasses.fields(config_class):
        if "option" in f.metadata:
            default = f.default if f.default is not dataclasses.MISSING else None
            yield Declared(f.name, default, f.metadata["option"])


# ---- value checks: (key, raw value) -> field value, or ConfigError naming the key ----

def string(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string, got {value!r}", key=key)
    return value


def strings(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) and value:
        return (value,)
    if isinstance(value, Sequence) and value and all(isinstance(x, str) and x for x in value):
        return tuple(value)
    raise ConfigError(f"{key} must be a string or a non-empty list of strings, got {value!r}", key=key)


def flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}", key=key)
    return value


def whole_number(lo: int, hi: int, why: str) -> Coerce:
    """A check for an integer in [lo, hi]; `why` explains the upper bound in the error's fix."""
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ConfigError(f"{key} must be a whole number from {lo} to {hi}, got {value!r}", key=key, fix=why)
        return value
    return check


def finite_numbers(key: str, value: Any) -> tuple[float, ...]:
    """One number or a list of numbers, each finite: a NaN or Inf weight would make every patched tensor
    NaN (and with the finite check off, a complete-looking output of NaNs)."""
    values = value if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
        raise ConfigError(f"{key} must be numbers, got {value!r}", key=key)
    bad = [x for x in values if not math.isfinite(x)]
    if bad:
        raise ConfigError(f"{key} must be finite numbers, got {bad[0]!r}", key=key,
                          fix="give one finite weight per adapter, e.g. --weights 0.7 0.3")
    return tuple(float(x) for x in values)


def matching(pattern: str, what: str) -> Coerce:
    """A check for a string that fully matches `pattern`; `what` describes the expected form."""
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(pattern, value):
            raise ConfigError(f"{key} must be {what}, got {value!r}", key=key)
        return value
    return check


# transformers' `convert_file_size_to_int` units; a lowercase final "b" ("5Gb") means bits there, and here
SIZE_UNITS: Mapping[str, int] = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3,
                                 "": 1}


def file_size(key: str, value: Any) -> int:
    """A size in bytes, as transformers reads `max_shard_size`: a whole number of bytes, or digits with a unit
    (`5GB` = 5·10⁹, `5GiB` = 5·2³⁰, `500MB`, `100KB`...); must be positive."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B)?\s*", value, re.IGNORECASE) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif match:
        unit = (match.group(2) or "").upper()
        size = int(match.group(1)) * SIZE_UNITS[unit]
        if unit in ("GB", "MB", "KB") and match.group(2).endswith("b"):
            size //= 8  # transformers: "5Gb" is gigabits
    else:
        raise ConfigError(f"{key} must be a size such as 5GB, 500MB, 2GiB or a number of bytes, got {value!r}",
                          key=key)
    if size <= 0:
        raise ConfigError(f"{key} must be more than 0 bytes, got {value!r}", key=key,
                          fix="give the largest output shard size wanted, e.g. 5GB")
    return size


def worker_spec(key: str, value: Any) -> str:
    from .partition import parse_worker

    parse_worker(string(key, value))
    return value


def key_map(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    """A mapping {regex: replacement}, or a list of {pattern, replacement} / [regex, replacement]."""
    items: list[tuple[Any, Any]]
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, Sequence) and not isinstance(value, str):
        items = []
        for it in value:
            if isinstance(it, Mapping) and set(it) == {"pattern", "replacement"}:
                items.append((it["pattern"], it["replacement"]))
            elif isinstance(it, Sequence) and not isinstance(it, str) and len(it) == 2:
                items.append((it[0], it[1]))
            else:
                raise ConfigError(f"key_map entry {it!r} must be {{pattern: ..., replacement: ...}}", key=key)
    else:
        raise ConfigError("key_map must map regex patterns to replacements", key=key)
    for p, r in items:
        if not isinstance(p, str) or not isinstance(r, str):
            raise ConfigError(f"key_map entry {p!r}: pattern and replacement must be strings", key=key)
        try:
            re.compile(p)
        except re.error as exc:
            raise ConfigError(f"key_map pattern {p!r} is not a valid regex ({exc})", key=key) from None
    return tuple((p, r) for p, r in items)


def key_map_from_cli(values: Sequence[str]) -> list[list[str]]:
    """`--key-map REGEX=REPLACEMENT` (repeated) -> [[regex, replacement], ...]."""
    out = []
    for v in values:
        if "=" not in v:
            raise ConfigError(f"--key-map {v!r} must be PATTERN=REPLACEMENT", key="--key-map")
        out.append(v.split("=", 1))
    return out
