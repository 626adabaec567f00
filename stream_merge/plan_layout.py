"""`--max-shard-size`: the output's shard layout, re-cut from the planned tensors (pure).

Without the option an output shard is the base shard of the same name (`planner._base_shard_plan`). With it,
the planned tensors are taken in base order (the base's shard order, each shard's tensors in header order, a
tensor the merge adds right after its shard's own) and cut the way huggingface_hub's
`split_torch_state_dict_into_shards` cuts a state dict for transformers' `save_pretrained`: greedily, a new
shard when the next tensor would push the current one past the maximum, and a tensor bigger than the maximum
in a shard of its own (the open shard stays open after it). Sizes are OUTPUT bytes (after --dtype). Names are
the ones transformers writes: `model.safetensors` for one shard, else `model-0000i-of-0000n.safetensors`.
Each output tensor keeps its `source_file`, so an output shard may read several base shards or part of one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence

from .records import ShardPlan

SINGLE_NAME = "model.safetensors"
OUT_METADATA: Mapping[str, str] = {"format": "pt"}  # what transformers' save_pretrained writes


def shard_name(i: int, n: int) -> str:
    """The name transformers gives output shard `i` (1-based) of `n`."""
    return SINGLE_NAME if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"


def split_sizes(sizes: Sequence[int], max_size: int) -> list[list[int]]:
    """Indexes of `sizes` grouped into shards by huggingface_hub's rule (see the module docstring)."""
    shards: list[list[int]] = []
    current: list[int] = []
    current_size = 0
    for i, size in enumerate(sizes):
        if size > max_size:
            shards.append([i])
            continue
        if current_size + size > max_size and current:
            shards.append(current)
            current, current_size = [], 0
        current.append(i)
        current_size += size
    if current:
        shards.append(current)
    return shards


def header_size(shard: ShardPlan) -> int:
    """Bytes of the safetensors header (length prefix included) that `pipeline.out_header` writes for `shard`
    (names in the plan's order, offsets in its data order, compact JSON padded to a multiple of 8)."""
    offsets: dict[str, list[int]] = {}
    pos = 0
    for t in shard.data_order:
        offsets[t.name] = [pos, pos + t.out_nbytes]
        pos += t.out_nbytes
    obj: dict[str, object] = {"__metadata__": dict(shard.metadata)} if shard.metadata else {}
    for t in shard.tensors:
        obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": offsets[t.name]}
    n = len(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return 8 + n + (-n % 8)


def with_output_cost(shard: ShardPlan) -> ShardPlan:
    """`shard` with `in_bytes` set to what producing it costs (its header plus the source bytes it reads), so
    that "in_bytes - source bytes + output bytes" is its file size; for a shard that is not a safetensors
    base shard kept as it is."""
    return dataclasses.replace(shard, in_bytes=header_size(shard) + sum(t.source.nbytes for t in shard.tensors))


def reshard(shards: Sequence[ShardPlan], max_size: int) -> tuple[ShardPlan, ...]:
    """The output shards for `--max-shard-size max_size` from the base-layout `shards` (in base order)."""
    if max_size <= 0:
        raise ValueError(f"max_size must be positive, got {max_size}")
    tensors = [t for s in shards for t in s.tensors]
    groups = split_sizes([t.out_nbytes for t in tensors], max_size)
    out = []
    for i, group in enumerate(groups, start=1):
        members = tuple(tensors[j] for j in group)
        out.append(with_output_cost(ShardPlan(file=shard_name(i, len(groups)), tensors=members, in_bytes=0,
                                              header_unchanged=False, metadata=OUT_METADATA)))
    return tuple(out)
