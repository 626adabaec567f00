"""The planner's options and its mutable working state, shared by the planner's parts. Pure.

`PlanState` collects problems (all of them, reported at once), warnings, patches and replacements while
adapters are planned; `build_plan` turns it into the frozen `MergePlan`. It never escapes the planner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .keymap import ParsedKey, TargetResolver
from .model_config import config_value
from .records import BaseIndex, LoraPatch, ModuleMapping, Replacement, TensorInfo


@dataclass(frozen=True)
class PlanOptions:
    """What the user chose that changes the plan: key_map rules, --strict, --untie, --dequantize, --dtype,
    --max-shard-size."""

    key_map: tuple[tuple[str, str], ...] = ()
    strict: bool = False
    untie: bool = False
    dequantize: bool = False
    dtype: str = "auto"  # output dtype of floating tensors: auto, bf16, fp16, fp32 (plan_dtype.out_dtype)
    max_shard_size: int | None = None  # --max-shard-size in bytes (plan_layout.reshard); None: the base's shards


@dataclass
class PlanState:
    """Mutable scratch state while planning: inputs, and everything found so far."""

    base: BaseIndex
    resolver: TargetResolver
    options: PlanOptions
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    replacements: dict[str, Replacement] = field(default_factory=dict)
    patches: dict[str, list[LoraPatch]] = field(default_factory=dict)
    mapping: list[ModuleMapping] = field(default_factory=list)
    config_updates: dict[str, object] = field(default_factory=dict)
    head_modules: list[tuple[int, str, dict[str, ParsedKey]]] = field(default_factory=list)
    tie_groups: tuple | None = None  # ties.groups_of: the base's tied groups, computed once
    fp8_block: tuple[int, int] | None = None  # fp8 block-quantized base: the scale block shape

    def config(self, key: str) -> Any:
        """A field of the base's config.json (top level, else text_config)."""
        return config_value(self.base.config, key)

    def resolve(self, name: str, what: str) -> tuple[TensorInfo | None, str]:
        """The base tensor an in-memory name refers to, and how it was found; an ambiguous name is a problem."""
        target, via, cands = self.resolver.resolve(name)
        if target is not None:
            return self.base.tensors[target], via
        if via == "ambiguous":
            self.problems.append(f"{what}: {name!r} matches several base tensors ({', '.join(cands[:6])}); "
                                 "add a key_map rule to pick one")
        return None, via

    def add(self, patch: LoraPatch, via: str) -> None:
        """Record a patch on its target tensor and its line in the printed mapping."""
        self.patches.setdefault(patch.target, []).append(patch)
        self.mapping.append(ModuleMapping(patch.adapter, patch.module, patch.target, patch.kind, patch.rank,
                                          patch.alpha, patch.scale, via))
