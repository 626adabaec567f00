"""Deterministic split of a plan's shards over N workers, balanced by bytes. Pure.

Every worker of a job array computes the same split from the same plan, so `--worker I/N` needs no
coordination: largest shards first, each to the currently lightest worker (ties: lowest index), which keeps
the heaviest worker within one shard of the average.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .errors import ConfigError


def parse_worker(spec: str) -> tuple[int, int]:
    """'I/N' with 0 <= I < N (Slurm arrays and Kubernetes indexed jobs count from 0)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise ConfigError(f"--worker {spec!r} must be I/N with 0 <= I < N (e.g. 0/4 ... 3/4)", key="worker",
                          fix="use $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT or $JOB_COMPLETION_INDEX/N")
    return int(m.group(1)), int(m.group(2))


def split(sizes: Sequence[tuple[str, int]], n: int) -> list[list[str]]:
    """Assign (name, bytes) items to n workers; each worker's list keeps the input order."""
    loads = [0] * n
    owner: dict[str, int] = {}
    for name, size in sorted(sizes, key=lambda x: (-x[1], x[0])):
        w = min(range(n), key=lambda i: (loads[i], i))
        owner[name] = w
        loads[w] += size
    return [[name for name, _ in sizes if owner[name] == i] for i in range(n)]
