"""stream-merge: merge LoRA adapters into huge safetensors checkpoints out of core, bitwise like PEFT.

The public API is `merge`, `plan`, `verify_output` and `finalize`; each raises a `StreamMergeError` subclass (see
`stream_merge.errors`) for anything the caller can act on, and never prints. (`verify_output`, not `verify`:
importing the submodule `stream_merge.verify` would rebind a package attribute of that name.)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .verify import VerifyReport


def _paths(adapter: Any) -> list[str]:
    return [str(adapter)] if isinstance(adapter, (str, os.PathLike)) else [str(a) for a in adapter]


def merge(base: str | os.PathLike[str], adapter: str | os.PathLike[str] | list[str] | tuple[str, ...],
          output: str | os.PathLike[str] | None = None, *, config: str | None = None, progress: Any = False,
          **options: Any) -> MergeReport:
    """Merge one or more PEFT LoRA adapters into BASE and write the result to OUTPUT.

    Args:
        base: a local checkpoint folder or a Hub repo id `org/name[@revision]`.
        adapter: one adapter (folder or Hub repo id) or a list of them.
        output: the output folder; None only plans (like `dry_run=True`). Re-running the same call on the
            same folder resumes it.
        config: a YAML file with option keys; explicit arguments win.
        progress: False (silent), True (a progress bar), or a callback `(bytes_done, shard_file)`.
        **options: any merge option of `stream_merge.config.MergeConfig` (the CLI flags with underscores:
            weights, device, dry_run, fresh, strict, untie, dequantize, allow_pickle, key_map, block_size_mb,
            check_finite, checksums, token, prefetch, keep_downloads, push_to_hub, private, local_copy,
            worker, ray).

    Returns:
        A MergeReport: the plan, the shards written or resumed, bytes, time and peak memory.

    Raises:
        ConfigError: an unknown option, a bad value or a conflicting combination (before anything is touched).
        InputError, HubError, CheckpointFormatError, UnsupportedAdapterError: an input cannot be used.
        PlanError: the adapter does not fit the base (every problem listed; nothing written).
        CompatibilityError: with strict=True, the adapter looks trained on another model.
        OutputError, NonFiniteError: the output folder cannot be used, or a merged tensor is not finite.
        MergeInterrupted: Ctrl-C / SIGTERM; finished shards are kept for a resume.
    """
    from .config import build_config, load_yaml
    from .planning import merge_planned

    cfg = build_config(load_yaml(config) if config else None, base=str(base), adapters=_paths(adapter),
                       output=None if output is None else str(output), **options)
    return merge_planned(cfg, progress=progress)


def plan(base: str | os.PathLike[str], adapter: str | os.PathLike[str] | list[str] | tuple[str, ...],
         **options: Any) -> MergePlan:
    """Build the merge plan (what `stream-merge plan` prints) from headers only, without writing anything.

    Args:
        base, adapter: as for `merge`.
        **options: the options that change a plan (weights, key_map, strict, untie, dequantize, allow_pickle,
            token); the others are accepted and checked too.

    Returns:
        The MergePlan: per shard the tensors patched and copied, the module -> tensor mapping, warnings.

    Raises:
        ConfigError, InputError, HubError as for `merge`; PlanError listing every problem, with the plan itself
        in its `plan` attribute; CompatibilityError with strict=True.
    """
    from .config import build_config
    from .planning import plan_merge

    cfg = build_config(base=str(base), adapters=_paths(adapter), **options)
    return plan_merge(cfg)[0]


def verify_output(output: str | os.PathLike[str], full: bool = False, progress: Any = False) -> VerifyReport:
    """Check an output folder against its `stream_merge.json` record (what `stream-merge verify` does).

    Args:
        output: a folder written by `merge`.
        full: recompute every tensor from the recorded inputs, not only shards without a recorded digest.
        progress: False (silent), True (a progress bar), or a callback `(bytes_done, label)` for the bytes
            hashed (label: the shard) and recomputed (label: "<shard> (recomputed)").

    Returns:
        A VerifyReport; `report.ok` is False and `report.problems` names each differing shard and tensor.

    Raises:
        VerificationError: the record or index is missing or unreadable (exit code 1 in the CLI).
        ConfigError, InputError, PlanError: the recorded inputs cannot be planned again.
    """
    from .verify import verify

    return verify(str(output), full=full, progress=progress)


def finalize(output: str | os.PathLike[str]) -> MergeReport:
    """After partitioned `worker="I/N"` merges into one folder: check every shard against the journal, then
    write the side files, the record and, last, the index (what `stream-merge finalize` does).

    Args:
        output: the shared output folder of the worker runs.

    Returns:
        A MergeReport of the finished folder.

    Raises:
        OutputError: no journal in the folder, or shards missing or not matching it (run the missing workers).
        ConfigError, InputError, PlanError: the journal's inputs cannot be planned again.
    """
    from .runner import finalize as _finalize

    return _finalize(output)


from .errors import StreamMergeError  # noqa: E402
from .records import MergePlan, MergeReport  # noqa: E402

__all__ = ["merge", "plan", "verify_output", "finalize", "MergeReport", "MergePlan", "StreamMergeError", "__version__"]
