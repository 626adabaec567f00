"""The --worker split: deterministic, complete, disjoint, balanced by bytes."""

from __future__ import annotations

import pytest

from stream_merge.errors import ConfigError
from stream_merge.partition import parse_worker, split


def test_split_is_a_balanced_partition() -> None:
    sizes = [(f"model-{i:05d}.safetensors", s) for i, s in enumerate([5, 9, 1, 7, 3, 3, 8, 2, 6])]
    parts = split(sizes, 3)
    names = [n for p in parts for n in p]
    assert sorted(names) == sorted(n for n, _ in sizes) and len(set(names)) == len(names)
    loads = [sum(dict(sizes)[n] for n in p) for p in parts]
    assert max(loads) - min(loads) <= max(s for _, s in sizes)
    assert loads == [15, 15, 14]
    assert all(p == sorted(p) for p in parts)  # input order kept
    assert split(sizes, 3) == parts
    assert split(sizes, 1) == [[n for n, _ in sizes]]
    assert split(sizes[:2], 4)[2:] == [[], []]


@pytest.mark.parametrize("spec,want", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 2 / 8 ", (2, 8))])
def test_parse_worker(spec: str, want: tuple[int, int]) -> None:
    assert parse_worker(spec) == want


@pytest.mark.parametrize("spec", ["4/4", "1/0", "-1/2", "a/b", "1"])
def test_parse_worker_rejects(spec: str) -> None:
    with pytest.raises(ConfigError):
        parse_worker(spec)
