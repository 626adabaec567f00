"""stream-merge: merge LoRA adapters into huge safetensors checkpoints out of core, bitwise like PEFT."""

from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"


def merge(base: str, adapter: "str | list[str] | tuple[str, ...]", output: "str | None" = None, *,
          config: "str | None" = None, progress: Any = False, **options: Any) -> "MergeReport":
    """Merge one or more PEFT LoRA adapters into BASE and write the result to OUTPUT.

    base/adapter: local folders or Hub repo ids (`org/name[@revision]`). options: the CLI flags with underscores (device, weights, dry_run, fresh,
    strict, allow_pickle, key_map, block_size_mb, check_finite, checksums, copy_extras). `config` is a YAML file with
    the same keys; explicit arguments win. Returns a MergeReport; raises StreamMergeError subclasses on
    bad input.
    """
    from .config import build_config, load_yaml
    from .runner import run

    adapters = [adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter)
    cfg = build_config(load_yaml(config) if config else None, base=str(base), adapters=[str(a) for a in adapters],
                       output=None if output is None else str(output), **options)
    return run(cfg, progress=progress)


def plan(base: str, adapter: "str | list[str]", **options: Any) -> "MergePlan":
    """Build the merge plan without writing anything (raises PlanError listing every problem)."""
    from .config import build_config
    from .runner import plan_merge

    adapters = [adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter)
    cfg = build_config(base=str(base), adapters=[str(a) for a in adapters], **options)
    return plan_merge(cfg)[0]


from .errors import StreamMergeError  # noqa: E402
from .records import MergePlan, MergeReport  # noqa: E402

__all__ = ["merge", "plan", "MergeReport", "MergePlan", "StreamMergeError", "__version__"]
