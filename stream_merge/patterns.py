"""Regular expressions from adapter configs, matched by PEFT's rules within a time bound. Pure.

`target_modules` / `exclude_modules` given as a string, the keys of `rank_pattern` / `alpha_pattern` and
`layers_pattern` are regular expressions written by whoever made the adapter: untrusted input. Python's `re`
cannot be interrupted, and a pattern such as `(.*)*Z` backtracks for ever against a long module name (PEFT
hangs the same way, issue 14). They are compiled here with the `regex` package, which fails such patterns
fast and supports a per-call `timeout`; each compiled pattern also gets a total time budget over all of its
matches, so a plan with many modules cannot add many short waits into a long one. An invalid pattern raises
`PatternError` (a ValueError), a pattern over its budget `PatternTimeout`; both name the config key.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import regex

# Seconds one pattern may spend matching, summed over every module name of a plan. Real patterns need
# microseconds per name; this leaves room for models with a hundred thousand modules.
REGEX_BUDGET_S = 2.0


class PatternTimeout(Exception):
    """A config regular expression used up its time budget (catastrophic backtracking)."""

    def __init__(self, field: str, source: str, budget_s: float) -> None:
        super().__init__(f"{field} {source!r} takes more than {budget_s:g} s to match module names "
                         "(catastrophic backtracking); simplify that regular expression in adapter_config.json")
        self.field = field
        self.source = source


class PatternError(ValueError):
    """A config regular expression that does not compile; `field` names its config key."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class BoundedRegex:
    """One config regular expression, compiled once, with a time budget shared by all of its matches.

    `field` and `source` (the text as the user wrote it, before PEFT's wrapping) name it in errors."""

    def __init__(self, pattern: str, field: str, source: str | None = None,
                 budget_s: float = REGEX_BUDGET_S) -> None:
        self.field = field
        self.source = pattern if source is None else source
        self.budget_s = budget_s
        self._left = budget_s
        if not isinstance(pattern, str):
            raise PatternError(f"{field} {self.source!r} is not a string", field)
        try:
            self._rx = regex.compile(pattern)
        except (regex.error, OverflowError, RecursionError, ValueError) as exc:
            raise PatternError(f"{field} {self.source!r} is not a valid regular expression ({exc})", field) from None

    @property
    def pattern(self) -> str:
        return self._rx.pattern

    def _run(self, method: Any, text: str) -> Any:
        if self._left <= 0:
            raise PatternTimeout(self.field, self.source, self.budget_s)
        start = time.monotonic()
        try:
            return method(text, timeout=self._left)
        except TimeoutError:
            self._left = 0.0
            raise PatternTimeout(self.field, self.source, self.budget_s) from None
        finally:
            self._left -= time.monotonic() - start

    def match(self, text: str) -> Any:
        return self._run(self._rx.match, text)

    def fullmatch(self, text: str) -> Any:
        return self._run(self._rx.fullmatch, text)


def compile_patterns(patterns: Mapping[str, Any], field: str) -> list[tuple[BoundedRegex, Any]]:
    """PEFT's rank_pattern/alpha_pattern matching (peft >= 0.15): `(.*\\.)?(p)$`, first match in order."""
    return [(BoundedRegex(rf"(.*\.)?({p})$", field, source=p), v) for p, v in patterns.items()]


def pattern_value(compiled: Sequence[tuple[BoundedRegex, Any]], module: str, default: Any) -> Any:
    for rx, value in compiled:
        if rx.match(module):
            return value
    return default


@dataclass
class ModuleSelection:
    """PEFT's module selection of one adapter config (`check_target_module_exists`), regexes compiled once.

    target / exclude: a BoundedRegex (config string), a list of names (exact or `.name` suffix), None, or the
    string "all-linear" (decided by module classes, so unknown here)."""

    target: Any = None
    exclude: Any = None
    layers_to_transform: Any = None
    layers: tuple[BoundedRegex, ...] = ()

    @classmethod
    def from_config(cls, target_modules: Any, exclude_modules: Any = None, layers_to_transform: Any = None,
                    layers_pattern: Any = None) -> ModuleSelection:
        """Compile the config's regexes; ValueError naming the key when one is invalid."""
        def names(spec: Any, field: str) -> Any:
            if isinstance(spec, str) and spec != "all-linear":
                return BoundedRegex(spec, field)
            return spec

        pats = layers_pattern if isinstance(layers_pattern, list) else ([layers_pattern] if layers_pattern else [])
        layers = tuple(BoundedRegex(rf".*\.{p}\.(\d+)\.", "layers_pattern", source=p) for p in pats)
        return cls(names(target_modules, "target_modules"), names(exclude_modules, "exclude_modules"),
                   layers_to_transform, layers)

    def _matches(self, spec: Any, module: str) -> bool | None:
        if spec is None or spec == "all-linear":
            return None
        if isinstance(spec, BoundedRegex):
            return spec.fullmatch(module) is not None
        return module in spec or any(module.endswith("." + t) for t in spec)

    def _layer_index(self, module: str) -> int | None:
        if not self.layers:
            m = re.match(r".*\.[^.]*\.(\d+)\.", module)
            return int(m.group(1)) if m else None
        for rx in self.layers:
            m = rx.match(module)
            if m:
                return int(m.group(1))
        return None

    def selects(self, module: str) -> bool | None:
        """Would PEFT put a LoRA layer on `module`? None when the config cannot tell ('all-linear')."""
        if self._matches(self.exclude, module):
            return False
        hit = self._matches(self.target, module)
        if hit is False:
            return False
        if self.layers_to_transform is not None:
            wanted = ([self.layers_to_transform] if isinstance(self.layers_to_transform, int)
                      else list(self.layers_to_transform))
            idx = self._layer_index(module)
            if idx is None or idx not in wanted:
                return False
        return hit


def peft_targets(module: str, target_modules: Any, exclude_modules: Any = None,
                 layers_to_transform: Any = None, layers_pattern: Any = None) -> bool | None:
    """Would PEFT put a LoRA layer on `module` given the config? None when the config cannot tell
    (e.g. 'all-linear' depends on module classes). One-off form of `ModuleSelection.selects`."""
    return ModuleSelection.from_config(target_modules, exclude_modules, layers_to_transform,
                                       layers_pattern).selects(module)
