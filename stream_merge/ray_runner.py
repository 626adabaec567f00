"""Run a plan's shards as Ray tasks (`--ray [ADDRESS]`): the driver plans and finalizes, each task merges one
shard with the same worker code and writes its own journal record, so a task that dies is simply retried
and finished shards are never redone. Needs the optional extra `stream-merge[ray]` and a base and output on
a file system every node can read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError, MergeInterrupted, StreamMergeError
from .journal import record_shard
from .progress import progress_callback
from .records import MergePlan, ShardResult

FAIL_ONCE_ENV = "STREAM_MERGE_TEST_FAIL_ONCE"  # testing hook: "<shard file>:<marker path>"
PROGRESS_EVERY = 32 * 1024 * 1024


def _merge_task(plan: MergePlan, base_dir: str, out: str, file: str, device: str, block_bytes: int,
                check_finite: bool, checksum: bool, progress_actor: object) -> ShardResult:
    """One output shard (reading its base shards), inside a Ray worker process, computed on the kind of
    device the driver asked for (`cuda`: the GPU Ray assigned to this task), and recorded in OUT's journal by
    this task."""
    import torch

    from .adapter import AdapterReader
    from .shard_inputs import Readers
    from .shard_rows import OtherShards
    from .sources import LocalSource
    from .worker import Compute, merge_shard

    hook = os.environ.get(FAIL_ONCE_ENV, "")
    if hook.startswith(file + ":"):
        marker = Path(hook.split(":", 1)[1])
        if not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError(f"injected failure for {file} ({FAIL_ONCE_ENV})")
    torch.set_num_threads(1)  # one task per CPU (num_cpus=1)
    shard = next(s for s in plan.shards if s.file == file)
    adapters = [AdapterReader(spec) for spec in plan.adapters]
    pending = 0

    def on_bytes(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= PROGRESS_EVERY:
            progress_actor.add.remote(pending)  # type: ignore[attr-defined]
            pending = 0

    base = LocalSource(spec=base_dir, path=Path(base_dir))
    headers = {h.file: h for h in plan.base.shards}
    others = OtherShards(base.read_range, headers)  # fp8 scales in other shards
    try:
        with Readers.of(base.shard_path, headers).open(shard.inputs) as readers:
            res = merge_shard(shard, readers, adapters, Path(out) / file,
                              Compute(device=torch.device(device), block_bytes=block_bytes,
                                      check_finite=check_finite), on_bytes, checksum, others)
    finally:
        for a in adapters:
            a.close()
    progress_actor.add.remote(pending)  # type: ignore[attr-defined]
    record_shard(Path(out), res)
    return res


def _submit(ray: Any, plan: MergePlan, base_dir: Path, out: Path, todo: Sequence[str], compute: Any,
            checksum: bool, actor: Any) -> dict[Any, str]:
    """One task per shard, on the kind of device the driver asked for (one GPU per task for CUDA)."""
    mem = 3 * compute.buffer_bytes + 512 * 1024 * 1024
    task = ray.remote(_merge_task).options(num_cpus=1, num_gpus=0 if compute.device.type == "cpu" else 1,
                                           memory=mem, max_retries=3, retry_exceptions=True)
    plan_ref = ray.put(plan)
    return {task.remote(plan_ref, str(base_dir), str(out), f, compute.device.type, compute.block_bytes,
                        compute.check_finite, checksum, actor): f for f in todo}


def _progress_actor(ray: Any) -> Any:
    @ray.remote
    class Progress:
        def __init__(self) -> None:
            self.n = 0

        def add(self, n: int) -> None:
            self.n += n

        def take(self) -> int:
            n, self.n = self.n, 0
            return n

    return Progress.remote()


def _collect(ray: Any, pending: dict[Any, str], actor: Any, report: Callable[[int, str], None],
             on_done: Callable[[ShardResult], None] | None) -> dict[str, ShardResult]:
    """Wait for the tasks; each result goes to `on_done` in the driver as soon as it is in."""
    results: dict[str, ShardResult] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        n = ray.get(actor.take.remote())
        if n:
            report(n, f"{len(pending)} shards in flight")
        for ref in ready:
            file = pending.pop(ref)
            try:
                res = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.as_instanceof_cause()
                if isinstance(cause, StreamMergeError):
                    raise cause from None
                raise
            results[file] = res
            if on_done is not None:
                on_done(res)
    return results


def merge_on_ray(plan: MergePlan, base_dir: Path, out: Path, done: dict[str, ShardResult], todo: Sequence[str],
                 compute: Any, progress: bool | Callable[[int, str], None], address: str | None,
                 checksum: bool = False, on_done: Callable[[ShardResult], None] | None = None) -> list[ShardResult]:
    """Merge `todo` as one Ray task each (retried on failure); returns results in plan order. Each task
    publishes and journals its shard; `on_done` runs in the driver as each one finishes (the Hub upload)."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'stream-merge[ray]'", key="ray") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k == FAIL_ONCE_ENV}})
    report, bar = progress_callback(plan, set(todo), progress)
    try:
        actor = _progress_actor(ray)
        pending = _submit(ray, plan, base_dir, out, todo, compute, checksum, actor)
        results = {**done, **_collect(ray, pending, actor, report, on_done)}
        return [results[s.file] for s in plan.shards if s.file in results]
    except KeyboardInterrupt:
        raise MergeInterrupted("interrupted; finished shards are kept", file=str(out),
                               fix="re-run the same command to resume") from None
    finally:
        if bar is not None:
            bar.close()
        if started:
            ray.shutdown()
