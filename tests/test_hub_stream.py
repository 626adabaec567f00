"""A Hub base shard is merged while it downloads (hub_stream), and nothing read early is ever published unless
the download's sha256 vouches for those very bytes.

Unit tests drive `StreamedShardReader` with a partial file written the way huggingface_hub writes one; the
integration tests merge in this process against the project's Hub server (`pusher_env`), with huggingface_hub's
download chunk made small so that a partial file grows in steps as it does for multi-GB shards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from conftest import wait_until

from stream_merge.errors import HubError, RedoFromFile
from stream_merge.hub_cache import RemoteFile
from stream_merge.hub_follow import PartialFollower
from stream_merge.hub_stream import ShardStream, StreamedShardReader
from stream_merge.safetensors_io import read_header_file
from stream_merge.synthetic import LlamaShape, write_adapter, write_checkpoint

pytestmark = pytest.mark.hub

SHAPE = LlamaShape(hidden=256, intermediate=512, layers=4, vocab=1024, heads=4, kv_heads=2)
SHARD_BYTES = 2_500_000  # shards of 1.3-2.5 MB: above hub_download.FOLLOW_MIN, so they are followed


# ---------------------------------------------------------------------------------------------- unit


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stream-shard")
    (name,) = write_checkpoint(root, SHAPE, max_shard_bytes=10**9)
    return root / name


def _entry(data: bytes) -> RemoteFile:
    return RemoteFile(path="model.safetensors", size=len(data), sha256=hashlib.sha256(data).hexdigest())


class _Partial:
    """A partial file written as huggingface_hub writes one (appends, then a rename), a step at a time."""

    def __init__(self, folder: Path, etag: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"abcd.{etag}.{os.urandom(4).hex()}.incomplete"
        self.f = open(self.path, "wb")

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.f.flush()

    def finish(self, final: Path) -> Path:
        self.f.close()
        os.replace(self.path, final)
        return final


def _streamed(folder: Path, data: bytes, shard: Path) -> tuple[ShardStream, PartialFollower, StreamedShardReader]:
    stream = ShardStream("model.safetensors", Future())
    follower = PartialFollower(folder, _entry(data))
    stream.attempt(follower)
    return stream, follower, StreamedShardReader(stream, read_header_file(shard))



def test_a_read_waits_for_its_bytes_and_the_verdict_vouches_for_them(shard: Path, tmp_path: Path) -> None:
    data = shard.read_bytes()
    header = read_header_file(shard)
    last = max(header.tensors, key=lambda t: t.end)
    stream, follower, reader = _streamed(tmp_path / "dl", data, shard)
    part = _Partial(tmp_path / "dl", _entry(data).etag)
    got: dict[str, bytes] = {}
    t = threading.Thread(target=lambda: got.setdefault("last", bytes(reader.read_tensor(last).reshape(-1).view(
        torch.uint8).numpy())))
    t.start()
    cut = header.data_offset + last.start + 10
    part.write(data[:cut])
    wait_until(lambda: follower._done >= cut, "the follower hashed the first part")
    time.sleep(0.1)
    assert t.is_alive()  # the last tensor's bytes are not there yet: the read waits
    part.write(data[cut:])
    t.join(30)
    assert got["last"] == data[header.data_offset + last.start:header.data_offset + last.end]
    final = part.finish(tmp_path / "model.safetensors")
    assert follower.verdict(final)[0] and follower.streamed
    follower.close()
    stream.verified(follower)
    stream.result.set_result(final)
    reader.confirm()  # vouched for: no RedoFromFile
    assert bytes(reader.view(0, 64)) == data[header.data_offset:header.data_offset + 64]
    reader.close()


@pytest.mark.parametrize("how", ["retried into another file", "matched only by a second pass"])
def test_bytes_read_early_are_refused_unless_that_download_vouches_for_them(shard: Path, tmp_path: Path,
                                                                            how: str) -> None:
    data = shard.read_bytes()
    stream, follower, reader = _streamed(tmp_path / "dl", data, shard)
    part = _Partial(tmp_path / "dl", _entry(data).etag)
    part.write(data)
    assert reader.raw_header() == data[:read_header_file(shard).data_offset]
    final = part.finish(tmp_path / "model.safetensors")
    follower.verdict(final)
    follower.close()
    if how == "retried into another file":
        stream.verified(PartialFollower(tmp_path / "other", _entry(data)))
    else:
        follower.streamed = False  # the verdict fell back to hashing the final file
        stream.verified(follower)
    stream.result.set_result(final)
    with pytest.raises(RedoFromFile):
        reader.confirm()
    reader.close()


def test_a_reader_attaching_as_the_download_closes_its_follower_reads_the_checked_file(shard: Path,
                                                                                      tmp_path: Path) -> None:
    """The race of a CI failure (EBADF): the reader saw an opened follower of a download still running, and the
    download closed the follower before the reader took its own descriptor. It must neither crash nor duplicate a
    freed descriptor number (which may by then name another file); it reads the checked file instead."""
    data = shard.read_bytes()
    stream, follower, reader = _streamed(tmp_path / "dl", data, shard)
    part = _Partial(tmp_path / "dl", _entry(data).etag)
    part.write(data)
    wait_until(follower.opened.is_set, "the follower opened the partial file")
    final = part.finish(tmp_path / "model.safetensors")
    follower.verdict(final)
    follower.close()  # the download's end closes the follower: its descriptor number is free again
    reuse = os.open(os.devnull, os.O_RDONLY)  # and another file may take that number
    try:
        got: dict[str, object] = {}

        def read() -> None:
            try:
                got["head"] = bytes(reader.view(0, 64))
            except BaseException as exc:  # noqa: BLE001
                got["error"] = exc

        t = threading.Thread(target=read)
        t.start()  # the download's result is not set yet: the reader waits for it
        time.sleep(0.1)
        stream.verified(follower)
        stream.result.set_result(final)
        t.join(10)
        offset = read_header_file(shard).data_offset
        assert got.get("head") == data[offset:offset + 64], got
        assert reader.path == final
        reader.confirm()
    finally:
        os.close(reuse)
        reader.close()


def test_a_reader_passes_over_a_follower_closed_by_a_failed_attempt_for_the_retry(shard: Path,
                                                                                   tmp_path: Path) -> None:
    """The same race on a retry: the first attempt's follower is closed (its download failed) as the reader
    comes. The reader neither blocks on the whole retry nor misses it: it reads the retry's partial file as it
    grows, and the retry's verdict vouches for those bytes."""
    data = shard.read_bytes()
    stream, first, reader = _streamed(tmp_path / "dl", data, shard)
    part = _Partial(tmp_path / "dl", _entry(data).etag)
    part.write(data[:1000])
    wait_until(first.opened.is_set, "the first attempt's follower opened its partial file")
    first.close()  # attempt 1 failed; attempt 2 has not started yet
    got: dict[str, object] = {}

    def read() -> None:
        try:
            got["head"] = bytes(reader.view(0, 64))
        except BaseException as exc:  # noqa: BLE001
            got["error"] = exc

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.1)
    second = PartialFollower(tmp_path / "dl", _entry(data))
    stream.attempt(second)
    retry = _Partial(tmp_path / "dl", _entry(data).etag)
    retry.write(data)
    t.join(10)  # the result is not set: a reader waiting for it would still be waiting
    offset = read_header_file(shard).data_offset
    assert got.get("head") == data[offset:offset + 64], got
    final = retry.finish(tmp_path / "model.safetensors")
    assert second.verdict(final)[0] and second.streamed
    second.close()
    stream.verified(second)
    stream.result.set_result(final)
    reader.confirm()  # the retry's digest vouches for the bytes read
    reader.close()


def test_abandon_wakes_a_read_waiting_for_bytes_that_do_not_come(shard: Path, tmp_path: Path) -> None:
    data = shard.read_bytes()
    stream, follower, reader = _streamed(tmp_path / "dl", data, shard)
    part = _Partial(tmp_path / "dl", _entry(data).etag)
    part.write(data[:100_000])
    errors: list[BaseException] = []

    def read() -> None:
        try:
            reader.view(len(data) - 5000, 1000)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()
    reader.abandon()
    t.join(10)
    assert not t.is_alive() and isinstance(errors[0], RedoFromFile)
    follower.close()
    reader.close()


def test_a_download_that_ends_short_or_restarts_from_zero_is_a_redo_never_a_crash(shard: Path,
                                                                                 tmp_path: Path) -> None:
    """huggingface_hub truncates its partial file when a resumed request is answered with the whole file: a read
    of bytes that were there must not map the shrunk file (SIGBUS) but ask for a redo."""
    data = shard.read_bytes()
    stream, follower, reader = _streamed(tmp_path / "dl", data, shard)
    part = _Partial(tmp_path / "dl", _entry(data).etag)
    part.write(data[:1_000_000])
    wait_until(lambda: follower._done >= 1_000_000, "hashed")
    part.f.truncate(0)
    with pytest.raises(RedoFromFile):
        reader.view(500_000 - read_header_file(shard).data_offset, 200_000)
    follower.close()  # the download gave up: reads past what arrived are a redo, not a hang
    with pytest.raises(RedoFromFile):
        reader.view(len(data) - 5000 - read_header_file(shard).data_offset, 1000)
    part.f.close()
    reader.close()


# ---------------------------------------------------------------------------------------------- integration


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import stream_merge

    root = tmp_path_factory.mktemp("stream-model")
    base, adapter, ref = root / "base", root / "adapter", root / "ref"
    shards = write_checkpoint(base, SHAPE, max_shard_bytes=SHARD_BYTES)
    write_adapter(adapter, SHAPE, r=4, alpha=8.0, base_name="org/base")
    stream_merge.merge(str(base), str(adapter), str(ref), device="cpu")
    sizes = {s: (base / s).stat().st_size for s in shards}
    assert len(shards) >= 3 and min(sizes.values()) > 1 << 20
    return {"base": base, "adapter": adapter, "ref": ref, "shards": shards, "sizes": sizes}


@pytest.fixture
def hub_run(pusher_env, model, tmp_path, monkeypatch):
    """The model on the test Hub; huggingface_hub's cache in tmp_path, its download chunk 64 KiB (10 MiB by
    default: a multi-GB shard grows in many steps, these small ones would arrive in one)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    pusher_env.add_commit("org/lora", {p.name: p for p in model["adapter"].iterdir()})
    pusher_env.add_commit("org/base", {p.name: p for p in model["base"].iterdir()})
    return pusher_env


def _after_planning(out: Path, shard: str):
    return lambda m, p: m == "GET" and p.endswith("/" + shard) and (out / ".stream-merge-downloads").exists()


def _same(out: Path, model: dict) -> None:
    for s in model["shards"]:
        assert (out / s).read_bytes() == (model["ref"] / s).read_bytes(), s


def _full_gets(hub, shard: str) -> list:
    return [r for r in hub.requests("GET", "/org/base/resolve/") if r.path.endswith("/" + shard) and r.range is None]


def _merge(out: Path, **options):
    import stream_merge

    return stream_merge.merge("org/base", "org/lora", str(out), device="cpu", **options)


def _merge_holding(hub, model: dict, out: Path, name: str, monkeypatch) -> None:
    """Merge with the first download of shard `name` held at three quarters until the merge has read (and so
    merged) data of that shard: a merge that waited for whole downloads never gets there and fails."""
    hold = hub.hold(_after_planning(out, name), after_bytes=model["sizes"][name] * 3 // 4)
    reads: list[tuple[str, int]] = []
    real_ready = StreamedShardReader._ready

    def ready(self, start: int, end: int) -> None:
        real_ready(self, start, end)
        reads.append((self._stream.file, end))

    monkeypatch.setattr(StreamedShardReader, "_ready", ready)
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["report"] = _merge(out)
        except BaseException as exc:  # noqa: BLE001 - raised below
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    try:
        wait_until(hold.held.is_set, "the server reached the hold")
        data_offset = read_header_file(model["base"] / name).data_offset
        wait_until(lambda: any(f == name and end > data_offset + 100_000 for f, end in reads),
              "a read of the held shard's data while it downloads")
    finally:
        hold.released.set()
        t.join(120)
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    assert "report" in result


def test_a_hub_shard_is_merged_while_it_downloads(hub_run, model, tmp_path, monkeypatch, caplog) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="stream_merge"):
        _merge_holding(hub_run, model, out, model["shards"][1], monkeypatch)
    _same(out, model)
    assert "could not vouch" not in caplog.text
    assert all(len(_full_gets(hub_run, s)) == 1 for s in model["shards"])


def test_a_corrupt_download_read_while_it_ran_is_merged_again_from_the_good_copy(hub_run, model, tmp_path,
                                                                                monkeypatch, caplog) -> None:
    out, name = tmp_path / "out", model["shards"][1]
    hub_run.corrupt(_after_planning(out, name), times=1, every=4096)
    with caplog.at_level(logging.WARNING, logger="stream_merge"):
        _merge_holding(hub_run, model, out, name, monkeypatch)
    _same(out, model)
    assert len(_full_gets(hub_run, name)) == 2
    assert f"{name}: the download of {name} could not vouch" in caplog.text


def test_a_resumed_download_answered_from_the_start_still_merges_the_right_bytes(hub_run, model, tmp_path) -> None:
    """The connection drops mid-shard and the resumed request is answered with the whole file (a proxy that
    ignores ranges): huggingface_hub truncates its partial file and starts over under our reads."""
    out, name = tmp_path / "out", model["shards"][2]
    hub_run.drop(_after_planning(out, name), after_bytes=model["sizes"][name] // 2)
    hub_run.ignore_range(_after_planning(out, name))
    _merge(out)
    _same(out, model)


def test_a_download_that_fails_mid_shard_stops_the_merge_naming_it(hub_run, model, tmp_path, monkeypatch) -> None:
    from stream_merge import hub_errors

    monkeypatch.setattr(hub_errors, "RETRY_WAIT_S", 0.0)
    monkeypatch.setattr(hub_errors, "RETRY_BUDGET_S", 0.5)
    out, name = tmp_path / "out", model["shards"][1]
    first = _after_planning(out, name)
    seen: list[str] = []

    def later(method: str, path: str) -> bool:  # every request after the one that drops
        if first(method, path):
            seen.append(path)
        return len(seen) > 1 and first(method, path)

    hub_run.drop(first, after_bytes=model["sizes"][name] // 2)
    hub_run.fail(later, 500, times=None)
    with pytest.raises(HubError, match=name):
        _merge(out)
    assert not (out / name).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(name) or p.suffix == ".tmp"]
    assert (out / model["shards"][0]).exists()  # the shard before it is finished and kept


def _import_after_first_download(hub, first: str, monkeypatch) -> list[bool]:  # type: ignore[no-untyped-def]
    """Make the runner's (torch's) import wait, boundedly, until the server has begun sending shard `first`;
    returns [whether it had]."""
    from stream_merge import planning

    seen: list[bool] = []
    real = planning._import_runner

    def slow_import() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _full_gets(hub, first):
            time.sleep(0.01)
        seen.append(bool(_full_gets(hub, first)))
        real()

    monkeypatch.setattr(planning, "_import_runner", slow_import)
    return seen


def test_a_fresh_hub_merge_downloads_its_first_shard_while_torch_loads(hub_run, model, tmp_path, monkeypatch) -> None:
    """The runner (torch) is imported on a thread while planning runs; here that import waits until the first
    shard's download has started: with a download that waits for the runner, it never does."""
    out = tmp_path / "out"
    seen = _import_after_first_download(hub_run, model["shards"][0], monkeypatch)
    _merge(out)
    assert seen == [True]
    _same(out, model)
    assert all(len(_full_gets(hub_run, s)) == 1 for s in model["shards"])  # downloaded once, early or not


def test_a_merge_refused_after_its_early_download_leaves_no_output_folder(hub_run, model, tmp_path,
                                                                          monkeypatch) -> None:
    from stream_merge.errors import OutputError

    seen = _import_after_first_download(hub_run, model["shards"][0], monkeypatch)
    out = tmp_path / "out-\udcff"  # not UTF-8: the runner refuses it (the record and the card hold it as text)
    with pytest.raises(OutputError, match="UTF-8"):
        _merge(out)
    assert seen == [True]  # refused while the early download was under way (it had created OUT)
    time.sleep(0.5)  # the stopped download thread writes nothing more
    assert not os.path.lexists(out)


def test_our_downloads_read_small_chunks_and_leave_huggingface_hubs_setting_alone(pusher_env, model, tmp_path,
                                                                                  monkeypatch) -> None:
    """huggingface_hub gathers 10 MiB chunks by default, at about 5 CPU-s per GB; ours use 64 KiB, and the
    user's setting is back once the download returns."""
    from huggingface_hub import constants

    from stream_merge import hub_download

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    pusher_env.add_commit("org/lora", {p.name: p for p in model["adapter"].iterdir()})
    pusher_env.add_commit("org/base", {p.name: p for p in model["base"].iterdir()})
    before = constants.DOWNLOAD_CHUNK_SIZE
    seen: list[int] = []
    real = hub_download.hf_hub_download

    def download(*a, **k):  # type: ignore[no-untyped-def]
        seen.append(constants.DOWNLOAD_CHUNK_SIZE)
        return real(*a, **k)

    monkeypatch.setattr(hub_download, "hf_hub_download", download)
    _merge(tmp_path / "out")
    _same(tmp_path / "out", model)
    assert before > hub_download.DOWNLOAD_CHUNK and seen and set(seen) == {hub_download.DOWNLOAD_CHUNK}
    assert constants.DOWNLOAD_CHUNK_SIZE == before
