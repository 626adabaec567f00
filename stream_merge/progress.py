"""Progress reporting for the shard loops (local and Ray): a tqdm bar over the bytes to write, a user's
callback, or nothing. The library never prints; tqdm writes to stderr only when it is a terminal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .records import MergePlan

Progress = Callable[[int, str], None]


def progress_callback(plan: MergePlan, wanted: set[str], progress: bool | Progress) -> tuple[Progress, Any]:
    """(callback(bytes, shard), tqdm bar or None): a bar over the bytes to write, a user callback, or nothing."""
    if progress is True:
        from tqdm import tqdm

        total = sum(s.out_data_bytes for s in plan.shards if s.file in wanted)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)
        return (lambda n, f: (bar.set_postfix_str(f, refresh=False), bar.update(n))), bar
    if not progress:
        return (lambda n, f: None), None
    return progress, None
