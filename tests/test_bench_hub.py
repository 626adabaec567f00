"""The Hub benchmark's parts: the bandwidth limit (a fake clock), procedural shards (ranges, header, finite
values, the digest cache), the throttled server with discarded uploads, and scripts/bench_hub.py end to end
on the tiny shape (its pushed shards' sha256 equal a local merge of the same procedural base)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stream_merge.safetensors_io import parse_header
from stream_merge.synthetic import LlamaShape

from tests.hub_faults import TokenBucket
from tests.hub_procedural import ProceduralRepo, add_repo, digests, make_spec, parse_rate, spec_key
from tests.hub_server import hub_env, start_hub_server

ROOT = Path(__file__).resolve().parents[1]
SHAPE = LlamaShape(64, 160, 2, 256, 4, 2)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def _repo(dtype: str = "BF16", shards: int = 3) -> ProceduralRepo:
    return ProceduralRepo.from_spec(make_spec(SHAPE.tensors(), dtype, shards, SHAPE.config(dtype)))


# ------------------------------------------------------------------------------------------------ token bucket
def test_token_bucket_holds_the_rate_with_a_fake_clock() -> None:
    clock = FakeClock()
    bucket = TokenBucket(20e6, burst=1e6, clock=clock, sleep=clock.sleep)
    start = clock.now
    for _ in range(100):  # 10 MB in 100 kB pieces
        bucket.take(100_000)
    assert clock.now - start == pytest.approx((10e6 - 1e6) / 20e6)  # all but the initial burst at the rate


def test_token_bucket_refills_while_idle_up_to_the_burst_only() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1e6, burst=2e5, clock=clock, sleep=clock.sleep)
    assert bucket.take(200_000) == 0  # the burst
    clock.now += 100.0  # a long idle time refills only the burst
    assert bucket.take(200_000) == 0
    assert bucket.take(100_000) == pytest.approx(0.1)


def test_token_bucket_callers_share_one_budget() -> None:
    """Two connections of one direction: the second waits for the first one's debt too."""
    clock = FakeClock()
    bucket = TokenBucket(1e6, burst=1.0, clock=clock, sleep=lambda s: None)  # both take before either sleeps
    first = bucket.take(500_000)
    second = bucket.take(500_000)
    assert first == pytest.approx(0.5, abs=1e-5) and second == pytest.approx(1.0, abs=1e-5)


def test_parse_rate() -> None:
    assert parse_rate("150MB/s") == 150e6
    assert parse_rate("1GiB/s") == 2**30
    assert parse_rate("20mb/s") == 20e6
    assert parse_rate("0") is None and parse_rate("none") is None
    with pytest.raises(ValueError):
        parse_rate("fast")


# ------------------------------------------------------------------------------------------------ procedural
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_procedural_shard_is_a_valid_finite_checkpoint(dtype: str) -> None:
    repo = _repo(dtype)
    assert len(repo.shards) == 3
    names = set()
    for f in repo.shards.values():
        whole = f.read(0, f.size)
        assert len(whole) == f.size
        header = parse_header(whole[:8 + int.from_bytes(whole[:8], "little")], f.size, f.name)
        hl = 8 + int.from_bytes(whole[:8], "little")
        for t in header.tensors:
            names.add(t.name)
            raw = bytearray(whole[hl + t.start:hl + t.end])
            vals = torch.frombuffer(raw, dtype={"BF16": torch.bfloat16, "F16": torch.float16,
                                                "F32": torch.float32}[dtype]).float()
            assert torch.isfinite(vals).all() and vals.abs().max() < 1.0 and vals.abs().max() > 0
    assert names == {n for n, _ in SHAPE.tensors()}
    index = json.loads(repo.small["model.safetensors.index.json"])
    assert set(index["weight_map"]) == names


def test_procedural_range_reads_equal_slices_of_the_whole() -> None:
    f = next(iter(_repo().shards.values()))
    whole = f.read(0, f.size)
    for start, end in [(0, 1), (3, 9), (7, f.size), (f.size - 5, f.size), (100, 100 + 70_001), (0, f.size)]:
        assert f.read(start, end) == whole[start:end]
    assert f.read(f.size, f.size + 10) == b""


def test_procedural_big_shard_tiles_without_a_seam() -> None:
    """A shard larger than the tile: a read across the wrap equals the concatenation of its two halves."""
    shape = LlamaShape(1024, 2048, 1, 512, 8, 8)
    f = next(iter(ProceduralRepo.from_spec(make_spec(shape.tensors(), "BF16", 1, shape.config("BF16")))
                  .shards.values()))
    assert f.size > 5 << 20
    a, m, b = 1000, 4_300_001, f.size - 3
    assert f.read(a, b) == f.read(a, m) + f.read(m, b)


def test_procedural_bytes_depend_on_the_file_and_are_deterministic() -> None:
    one, two = list(_repo().shards.values())[:2], list(_repo().shards.values())[:2]
    assert one[0].read(0, one[0].size) == two[0].read(0, two[0].size)
    hl0, hl1 = len(one[0].head), len(one[1].head)
    assert one[0].read(hl0, hl0 + 4096) != one[1].read(hl1, hl1 + 4096)


def test_digests_are_computed_once_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _repo()
    first = digests(repo, tmp_path)
    assert first == {n: hashlib.sha256(f.read(0, f.size)).hexdigest() for n, f in repo.shards.items()}
    assert (tmp_path / f"procedural-{spec_key(repo.spec)}.json").is_file()

    def boom(*a: object, **k: object) -> str:
        raise AssertionError("hashed again")

    monkeypatch.setattr("tests.hub_procedural.file_sha256", boom)
    assert digests(_repo(), tmp_path) == first


# ------------------------------------------------------------------------------------------------ server
def test_throttled_server_serves_procedural_ranges_and_discards_uploads(tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    repo = _repo()
    events: list[dict] = []
    with start_hub_server(tmp_path, rate_down=20e6, rate_up=20e6, discard_uploads=True,
                          on_event=events.append) as server:
        add_repo(server, "bench/base", repo, digests(repo, None))
        env = hub_env(server, tmp_path / "hf")
        code = ("import sys; from huggingface_hub import hf_hub_download as d; "
                "print(d('bench/base', sys.argv[1], local_dir=sys.argv[2]))")
        name, f = next(iter(repo.shards.items()))
        out = subprocess.run([sys.executable, "-c", code, name, str(tmp_path / "dl")], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        assert Path(out).read_bytes() == f.read(0, f.size)  # the client checked sizes, we check bytes
        data = f.read(0, f.size)
        (tmp_path / "up.bin").write_bytes(data)
        code = ("import sys; from huggingface_hub import HfApi; a = HfApi(token='hf_x'); "
                "a.create_repo('bench/up', exist_ok=True); "
                "a.upload_file(path_or_fileobj=sys.argv[1], path_in_repo=sys.argv[2], repo_id='bench/up')")
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "up.bin"), name], env=env, check=True,
                       capture_output=True)
        info = HfApi(endpoint=server.endpoint, token="hf_x").model_info("bench/up", files_metadata=True)
        sib = {s.rfilename: s for s in info.siblings}[name]
        assert sib.lfs.sha256 == hashlib.sha256(data).hexdigest() and sib.size == f.size
        assert not list(server.lfs_dir.iterdir())  # nothing of the upload was stored
        assert not server.errors
    kinds = [e["ev"] for e in events]
    assert "get" in kinds and "put" in kinds and "commit" in kinds
    put = next(e for e in events if e["ev"] == "put")
    assert put["size"] == f.size
    get = next(e for e in events if e["ev"] == "get")
    assert get["path"] == name and get["end"] - get["start"] == f.size


def test_server_download_rate_is_a_lower_bound_on_time(tmp_path: Path) -> None:
    """Server-side lower bound only (never an upper bound): 4 MB at 8 MB/s cannot take less than ~0.45 s."""
    shape = LlamaShape(1024, 1024, 1, 1024, 8, 8)
    repo = ProceduralRepo.from_spec(make_spec(shape.tensors(), "BF16", 1, shape.config("BF16")))
    with start_hub_server(tmp_path, rate_down=8e6) as server:
        add_repo(server, "bench/base", repo, digests(repo, None))
        from huggingface_hub import hf_hub_url

        from stream_merge.hub_http import read_range
        name = next(iter(repo.shards))
        url = hf_hub_url("bench/base", name, endpoint=server.endpoint)
        t0 = time.monotonic()
        got = read_range(url, 0, 4_000_000, None)
        assert time.monotonic() - t0 >= (4e6 - server.down.burst) / 8e6 * 0.98
        assert got == repo.shards[name].read(0, 4_000_000)


# ------------------------------------------------------------------------------------------------ the script
def test_bench_hub_tiny_end_to_end(tmp_path: Path) -> None:
    """The script on the tiny shape with a kill and a resume: ratios present, the pushed shards equal a local
    merge of the same base, and no shard pushed before the kill was downloaded or uploaded again."""
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hub.py"), "--shape", "tiny",
                           "--rate", "400MB/s", "--kill-after-shards", "2", "--sample-verify", "3",
                           "--work", str(tmp_path / "work"), "--cache", str(tmp_path / "cache"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["baselines"]["kind"] == "measured" and res["baselines"]["t_dl_s"] > 0
    assert res["ratio_hub_to_local_over_t_dl"] > 0 and res["ratio_hub_to_hub_over_max_dl_ul"] > 0
    assert res["sample_verify"]["all_match"] and len(res["sample_verify"]["shards"]) == 3
    resume = res["hub_to_hub"]["resume"]
    assert resume["killed"] and resume["pushed_before_kill"] >= 2 and resume["redone"] == []
    for section in ("hub_to_local", "hub_to_hub"):
        assert res[section]["peak_rss_bytes"] > 0 and res[section]["peak_disk_bytes"] > 0
        assert 0 < res[section]["peak_download_area_bytes"] <= res[section]["peak_disk_bytes"]
        assert set(res[section]["breakdown"]) >= {"download_busy_s", "merge_busy_s", "upload_busy_s", "waiting_s"}
