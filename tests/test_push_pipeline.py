"""The Pusher's two stages against the test Hub: commits in submit order with the same content as before, the
upload of the next shard during the previous commit, the sent bytes checked by XXH3-128 (sha256 only without
one), failures of either stage named and stopping the push, resume, and the disk bound of --no-local-copy."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import xxhash

from conftest import wait_until
from stream_merge.errors import HubError

pytestmark = pytest.mark.hub
WAIT_S = 30.0  # a bound on every wait, so a pipeline that does not overlap fails instead of hanging
INDEX = "model.safetensors.index.json"



def _shards(out: Path, n: int, size: int = 1 << 20) -> dict[str, bytes]:
    out.mkdir(exist_ok=True)
    files = {f"model-{i + 1}.safetensors": os.urandom(size) for i in range(n)}
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / INDEX).write_text('{"weight_map": {}}')
    return files


def _digests(data: bytes) -> tuple[str, str]:
    return hashlib.sha256(data).hexdigest(), xxhash.xxh3_128(data).hexdigest()


def _history(hub, repo_id: str = "org/merged") -> list[tuple[set[str], set[str]]]:  # type: ignore[no-untyped-def]
    """(files added or changed, files deleted) per commit of main, oldest first."""
    repo = hub.get_repo(repo_id)
    chain = []
    sha = repo.branches.get("main")
    while sha is not None:
        chain.append(repo.commits[sha])
        sha = chain[-1].parent
    out = []
    before: dict = {}
    for c in reversed(chain):
        added = {n for n, b in c.files.items() if n not in before or before[n].sha256 != b.sha256}
        out.append((added - {".gitattributes"}, set(before) - set(c.files)))
        before = dict(c.files)
    return out


def _put_done(hub, sha: str) -> bool:  # type: ignore[no-untyped-def]
    """The server has received the whole LFS upload of `sha` (it answers a PUT once the body is in)."""
    return bool(hub.requests("PUT", f"/_lfs/upload/{sha}", status=200))


def _slow_first_commit(pusher, until: Callable[[], bool]) -> list[bool]:  # type: ignore[no-untyped-def]
    """Make the pusher's first shard commit wait (bounded) for `until()`; returns [whether it came]."""
    seen: list[bool] = []
    real = pusher.api.create_commit

    def commit(*a, **k):  # type: ignore[no-untyped-def]
        if not seen:
            deadline = time.monotonic() + WAIT_S
            while not until() and time.monotonic() < deadline:
                time.sleep(0.005)
            seen.append(until())
        return real(*a, **k)

    pusher.api.create_commit = commit
    return seen


def test_commits_follow_the_submit_order_with_the_index_last(pusher_env, tmp_path: Path) -> None:
    """Every shard is committed once, in submit order, with its bytes; an index left by an earlier push is
    deleted by the first shard commit; the final commit adds the small files and the index."""
    from stream_merge.push import Pusher

    hub = pusher_env
    hub.create_repo("org/merged")
    hub.add_commit("org/merged", {INDEX: b'{"old": 1}', "model-1.safetensors": b"old bytes"})
    out = tmp_path / "out"
    files = _shards(out, 5)
    (out / "config.json").write_text("{}")
    p = Pusher.open("org/merged", out, list(files))
    for name, data in files.items():
        sha, xxh = _digests(data)
        p.submit(name, sha, xxh3_128=xxh)
    p.finish(["config.json", INDEX])
    history = _history(hub)[1:]  # after the earlier push
    shard_commits = history[:-1]
    assert [n for added, _ in shard_commits for n in sorted(added)] == list(files)  # in order, each once
    assert shard_commits[0][1] == {INDEX} and all(not deleted for _, deleted in history[1:])
    assert history[-1] == ({"config.json", INDEX}, set())
    head = hub.get_repo("org/merged").commits[hub.get_repo("org/merged").branches["main"]]
    assert {n: head.files[n].read() for n in files} == files
    assert p.uploaded == [*files, "config.json", INDEX]


def test_the_next_shard_uploads_while_the_previous_one_is_committed(pusher_env, tmp_path: Path) -> None:
    """Shard 1's commit is held until the server has received shard 2's upload: with the upload and the commit
    on one thread (the old pusher) that never happens; with two stages it does, and the commits still come in
    order."""
    from stream_merge.push import Pusher

    hub = pusher_env
    out = tmp_path / "out"
    files = _shards(out, 2)
    (sha1, xxh1), (sha2, xxh2) = (_digests(d) for d in files.values())
    events: list[dict] = []
    hub.on_event = events.append
    p = Pusher.open("org/merged", out, list(files))
    overlapped = _slow_first_commit(p, lambda: _put_done(hub, sha2))
    p.submit("model-1.safetensors", sha1, xxh3_128=xxh1)
    wait_until(lambda: _put_done(hub, sha1), "shard 1 uploaded")  # shard 1 goes alone, shard 2 is handed over after
    p.submit("model-2.safetensors", sha2, xxh3_128=xxh2)
    p.finish([])
    assert overlapped == [True]
    commits = [e["files"] for e in events if e["ev"] == "commit"]
    assert commits == [{"model-1.safetensors": sha1}, {"model-2.safetensors": sha2}, {}]  # {}: the index's


def test_the_sent_bytes_are_checked_by_xxh3_not_by_a_second_sha256(pusher_env, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """With the journal's XXH3-128 the bytes sent are hashed by XXH3 only; without one, by sha256."""
    from stream_merge import push_file
    from stream_merge.push import Pusher

    kinds: list[str] = []
    real = push_file.new_hasher
    monkeypatch.setattr(push_file, "new_hasher", lambda kind: (kinds.append(kind), real(kind))[1])
    out = tmp_path / "out"
    files = _shards(out, 2)
    (sha1, xxh1), (sha2, _) = (_digests(d) for d in files.values())
    p = Pusher.open("org/merged", out, list(files))
    p.submit("model-1.safetensors", sha1, xxh3_128=xxh1)
    p.submit("model-2.safetensors", sha2)  # an older record: no XXH3-128
    p.finish([])
    assert sorted(kinds) == ["sha256", "xxh3_128"]
    head = pusher_env.get_repo("org/merged").commits[pusher_env.get_repo("org/merged").branches["main"]]
    assert {n: head.files[n].read() for n in files} == files


@pytest.mark.parametrize("change", ["one byte", "last byte", "same bytes, xxh3 of others"])
def test_a_shard_changed_on_disk_is_refused_by_its_xxh3(pusher_env, tmp_path: Path, change: str) -> None:
    """The journal's digests are not the file's any more: a Hub that stores uploads unchecked (S3-like) takes
    the bytes, the XXH3-128 of what was sent refuses the commit, and nothing of it is committed."""
    from stream_merge.push import Pusher

    pusher_env.trust_uploads = True
    out = tmp_path / "out"
    data = os.urandom(1 << 20)
    sha, xxh = _digests(data)
    on_disk = {"one byte": data[:1000] + b"\0" + data[1001:], "last byte": data[:-1] + b"!",
               "same bytes, xxh3 of others": data}[change]
    if change.startswith("same bytes"):
        xxh = xxhash.xxh3_128(data[::-1]).hexdigest()  # the journal names other bytes than the file holds
    out.mkdir()
    (out / "model-1.safetensors").write_bytes(on_disk)
    p = Pusher.open("org/merged", out, ["model-1.safetensors"], local_copy=False)
    p.submit("model-1.safetensors", sha, xxh3_128=xxh)
    with pytest.raises(HubError, match=r"model-1.safetensors changed on disk after it was written \(xxh3_128"):
        p.finish([])
    repo = pusher_env.get_repo("org/merged")
    assert not repo.branches or "model-1.safetensors" not in repo.commits[repo.branches["main"]].files
    assert (out / "model-1.safetensors").exists()  # never deleted: it was not committed


def test_an_unusual_read_order_is_checked_on_the_file(tmp_path: Path) -> None:
    """Bytes read out of order are not hashed on the way: the file itself is hashed, by the same kind."""
    from stream_merge.push_file import HashedAdd

    data = os.urandom(300_000)
    (tmp_path / "f").write_bytes(data)
    sha, xxh = _digests(data)
    op = HashedAdd.known("model.safetensors", tmp_path / "f", sha, xxh3_128=xxh)
    with op.as_file() as f:
        f.read(1000)
        f.seek(5000)
        f.read()
    assert op.sent_digest() == xxh and op.sent_matches()
    (tmp_path / "f").write_bytes(data[::-1])
    assert not op.sent_matches()


@pytest.mark.parametrize("stage", ["upload", "commit"])
def test_a_failed_stage_stops_the_push_and_is_named(pusher_env, tmp_path: Path, stage: str) -> None:
    """Shard 2's upload (or commit) is refused: the error is one line naming the step, shard 1 stays pushed,
    shards 2 and 3 are neither committed nor deleted, and a re-run resumes from shard 2."""
    from stream_merge.push import Pusher

    hub = pusher_env
    out = tmp_path / "out"
    files = _shards(out, 3)
    digests = [_digests(d) for d in files.values()]
    p = Pusher.open("org/merged", out, list(files), local_copy=False)
    p.submit("model-1.safetensors", digests[0][0], xxh3_128=digests[0][1])
    wait_until(lambda: not (out / "model-1.safetensors").exists(), "shard 1 committed and deleted")
    if stage == "upload":
        hub.fail(f"/_lfs/upload/{digests[1][0]}", 400, times=None, methods=["PUT"])
    else:
        hub.fail("/api/models/org/merged/commit/main", 400, times=None)
    doing = {"upload": "uploading", "commit": "committing"}[stage]
    with pytest.raises(HubError, match=f"push to org/merged failed while {doing} model-2.safetensors") as err:
        try:
            for name, (sha, xxh) in list(zip(files, digests))[1:]:
                p.submit(name, sha, xxh3_128=xxh)  # the third submit (or finish) raises the stage's error
            p.finish([INDEX])
        finally:
            p.close()
    assert "\n" not in str(err.value)
    repo = hub.get_repo("org/merged")
    assert set(repo.commits[repo.branches["main"]].files) - {".gitattributes"} == {"model-1.safetensors"}
    assert [n for n in files if (out / n).exists()] == ["model-2.safetensors", "model-3.safetensors"]
    assert p.uploaded == ["model-1.safetensors"]

    hub.clear_faults()
    again = Pusher.open("org/merged", out, list(files), local_copy=False)
    assert again.pushed("model-1.safetensors", digests[0][0])
    for name, (sha, xxh) in zip(files, digests):
        again.submit(name, sha, xxh3_128=xxh)
    again.finish([INDEX])
    assert again.uploaded == ["model-2.safetensors", "model-3.safetensors", INDEX]
    head = repo.commits[repo.branches["main"]]
    assert {n: head.files[n].read() for n in files} == files


def test_without_a_local_copy_the_merge_waits_while_a_shard_is_uploading(pusher_env, tmp_path: Path) -> None:
    """Disk bound of --no-local-copy: handing over shard 2 while shard 1 is still uploading waits until shard 1
    is uploaded (its commit may still run), so OUT holds at most the shard committing, the one uploading and
    the one being merged. (Moved from test_hub_overlap, where it waited for shard 1's commit.)"""
    from stream_merge.push import Pusher

    hub = pusher_env
    hub.delay("/_lfs/upload/", 1.0, methods=["PUT"])  # a slow link
    out = tmp_path / "out"
    files = _shards(out, 2, size=3_000_000)
    (sha1, xxh1), (sha2, xxh2) = (_digests(d) for d in files.values())
    p = Pusher.open("org/merged", out, list(files), local_copy=False)
    p.submit("model-1.safetensors", sha1, xxh3_128=xxh1)
    p.submit("model-2.safetensors", sha2, xxh3_128=xxh2)
    assert _put_done(hub, sha1)
    p.finish([])
    assert p.uploaded[:2] == ["model-1.safetensors", "model-2.safetensors"]
    assert not (out / "model-1.safetensors").exists() and not (out / "model-2.safetensors").exists()


def test_without_a_local_copy_at_most_one_more_shard_waits_for_its_commit(pusher_env, tmp_path: Path) -> None:
    """While shard 1's commit is held, shards 2 and 3 upload, but the hand-over of shard 3 waits until shard 1
    is committed and deleted: OUT never holds more than push.MAX_HELD of the pusher's shards."""
    from stream_merge.push import MAX_HELD, Pusher

    hub = pusher_env
    out = tmp_path / "out"
    files = _shards(out, 3)
    digests = [_digests(d) for d in files.values()]
    release = threading.Event()
    p = Pusher.open("org/merged", out, list(files), local_copy=False)
    held = _slow_first_commit(p, release.is_set)
    p.submit("model-1.safetensors", digests[0][0], xxh3_128=digests[0][1])
    wait_until(lambda: _put_done(hub, digests[0][0]), "shard 1 uploaded")
    p.submit("model-2.safetensors", digests[1][0], xxh3_128=digests[1][1])
    done = threading.Event()

    def third() -> None:
        p.submit("model-3.safetensors", digests[2][0], xxh3_128=digests[2][1])
        done.set()

    threading.Thread(target=third, daemon=True).start()
    wait_until(lambda: _put_done(hub, digests[2][0]), "shard 3 uploaded while shard 1's commit is held")
    assert not done.wait(0.2) and sum((out / n).exists() for n in files) == MAX_HELD == 3
    release.set()
    assert done.wait(WAIT_S) and held == [True]
    p.finish([])
    assert p.uploaded == [*files, INDEX] and not any((out / n).exists() for n in files)


def test_a_merge_checks_every_sent_shard_by_the_writers_xxh3_also_on_resume(pusher_env, tmp_path: Path,
                                                                            monkeypatch) -> None:
    """The shard loop hands the writer's XXH3-128 to the pusher, and a re-run hands the journal's for the
    shards an earlier run finished: every shard sent is checked by XXH3, none hashed again by sha256."""
    import stream_merge
    from conftest import make_pair
    from stream_merge import push_file

    hub = pusher_env
    kinds: list[str] = []
    real = push_file.new_hasher
    monkeypatch.setattr(push_file, "new_hasher", lambda kind: (kinds.append(kind), real(kind))[1])
    base, adapter = make_pair(tmp_path)
    out = tmp_path / "out"
    hub.fail("/_lfs/upload/", 400, times=1, methods=["PUT"])  # the first shard's upload is refused
    with pytest.raises(HubError, match="push to org/pushed failed while uploading"):
        stream_merge.merge(str(base), [str(adapter)], str(out), device="cpu", push_to_hub="org/pushed")
    finished = {e["file"] for e in json.loads((out / "stream_merge.json").read_text())["shards"]
                if (out / e["file"]).exists()}
    assert finished  # the re-run submits these from the journal, before merging the rest
    assert kinds and set(kinds) == {"xxh3_128"}  # the refused upload, handed over by the shard loop
    hub.clear_log()
    kinds.clear()
    stream_merge.merge(str(base), [str(adapter)], str(out), device="cpu", push_to_hub="org/pushed")
    record = json.loads((out / "stream_merge.json").read_text())["shards"]
    head = hub.get_repo("org/pushed").commits[hub.get_repo("org/pushed").branches["main"]]
    assert {e["file"]: head.files[e["file"]].read() for e in record} == {e["file"]: (out / e["file"]).read_bytes()
                                                                         for e in record}
    assert kinds == ["xxh3_128"] * len(hub.requests("PUT", "/_lfs/upload/", status=200)) and kinds
