"""The Hub pipeline's overlap helpers: a shard hashed while it downloads (hub_follow), and a shard uploaded
with its known sha256 and hashed on the way (push_file), never with a pass over the file before."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from stream_merge.errors import HubError
from stream_merge.hub_cache import RemoteFile
from stream_merge.hub_follow import PartialFollower
from stream_merge.push_file import HashedAdd, HashingReader

pytestmark = pytest.mark.hub
DATA = os.urandom(3_000_000)
SHA = hashlib.sha256(DATA).hexdigest()


def _entry(data: bytes = DATA) -> RemoteFile:
    return RemoteFile(path="model.safetensors", size=len(data), sha256=hashlib.sha256(data).hexdigest())


def _write_like_hf(folder: Path, final: Path, data: bytes, etag: str, pieces: int = 6) -> threading.Thread:
    """Write `data` into a fresh partial file in pieces, then rename it to `final`, as huggingface_hub does."""
    def run() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"abcd.{etag}.{os.urandom(4).hex()}.incomplete"
        step = -(-len(data) // pieces)
        with open(tmp, "wb") as f:
            for i in range(0, len(data), step):
                f.write(data[i:i + step])
                f.flush()
                time.sleep(0.03)
        os.replace(tmp, final)

    t = threading.Thread(target=run)
    t.start()
    return t


def _no_plain_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the file was hashed again after the download")

    monkeypatch.setattr("stream_merge.hub_follow.digest_matches", boom)


def test_follower_hashes_the_download_while_it_is_written(tmp_path: Path, monkeypatch) -> None:
    _no_plain_hash(monkeypatch)
    entry = _entry()
    with PartialFollower(tmp_path / "dl", entry) as follower:
        _write_like_hf(tmp_path / "dl", tmp_path / "final", DATA, entry.etag).join()
        assert follower.verdict(tmp_path / "final") == (True, SHA)


def test_follower_names_a_corrupt_download(tmp_path: Path) -> None:
    """Bytes that differ from the Hub's sha256: not a match, and the digest found is the file's."""
    entry = _entry()
    bad = bytearray(DATA)
    bad[1_234_567] ^= 1
    with PartialFollower(tmp_path / "dl", entry) as follower:
        _write_like_hf(tmp_path / "dl", tmp_path / "final", bytes(bad), entry.etag).join()
        assert follower.verdict(tmp_path / "final") == (False, hashlib.sha256(bad).hexdigest())


def test_follower_ignores_partials_that_were_there_before(tmp_path: Path) -> None:
    """A partial file of another download (there before we started) is never followed: the final file is
    hashed instead, and a wrong final file is found wrong."""
    entry = _entry()
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / f"zz.{entry.etag}.0000.incomplete").write_bytes(DATA)  # right bytes, someone else's
    with PartialFollower(tmp_path / "dl", entry) as follower:
        time.sleep(0.1)
        (tmp_path / "final").write_bytes(DATA[:-1] + b"\0")
        ok, got = follower.verdict(tmp_path / "final")
    assert not ok and got == hashlib.sha256(DATA[:-1] + b"\0").hexdigest()


def test_follower_checks_the_final_file_when_the_download_restarted(tmp_path: Path) -> None:
    """A first attempt's partial file was followed, then a retry wrote another file: the followed inode is
    not the final file, so the final file itself is hashed."""
    entry = _entry()
    with PartialFollower(tmp_path / "dl", entry) as follower:
        _write_like_hf(tmp_path / "dl", tmp_path / "first", DATA, entry.etag).join()
        time.sleep(0.1)
        wrong = DATA[:100] + b"x" + DATA[101:]
        (tmp_path / "final").write_bytes(wrong)
        assert follower.verdict(tmp_path / "final") == (False, hashlib.sha256(wrong).hexdigest())
        (tmp_path / "final").write_bytes(DATA)
    with PartialFollower(tmp_path / "dl2", entry) as follower:
        assert follower.verdict(tmp_path / "final") == (True, SHA)  # no partial seen at all: the plain check


# ------------------------------------------------------------------------------------------------ uploads
def test_hashing_reader_hashes_in_order_reads_once(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(DATA)
    with open(tmp_path / "f", "rb") as f:
        r = HashingReader(f)
        r.read(1000)
        r.seek(0)  # a retried upload starts again
        while r.read(65536):
            pass
    assert r.covered == len(DATA) and r.hexdigest() == SHA


def test_hashed_add_takes_the_known_digest_without_reading_the_file(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.lfs as lfs

    monkeypatch.setattr(lfs, "sha_fileobj", lambda *a, **k: pytest.fail("hashed before the upload"))
    (tmp_path / "f").write_bytes(DATA)
    op = HashedAdd.known("model.safetensors", tmp_path / "f", SHA)
    assert op.upload_info.sha256.hex() == SHA and op.upload_info.size == len(DATA)
    assert op.sent_sha256() is None  # nothing uploaded yet
    with op.as_file() as f:
        assert f.read() == DATA
    assert op.sent_sha256() == SHA




def test_pusher_uploads_a_shard_without_hashing_it_first(pusher_env, tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.lfs as lfs

    from stream_merge.push import Pusher

    monkeypatch.setattr(lfs, "sha_fileobj", lambda *a, **k: pytest.fail("hashed before the upload"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-1.safetensors").write_bytes(DATA)
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    p = Pusher.open("org/merged", out, ["model-1.safetensors"])
    p.submit("model-1.safetensors", SHA)
    p.finish([])  # waits for the upload
    repo = pusher_env.get_repo("org/merged")
    blob = repo.commits[repo.branches["main"]].files["model-1.safetensors"]
    assert blob.sha256 == SHA and blob.read() == DATA


def test_pusher_refuses_a_shard_that_changed_after_it_was_written(pusher_env, tmp_path: Path) -> None:
    """The journal's sha256 is not the file's any more (the file was changed on disk): the bytes sent are
    hashed on the way and the commit is refused, even by a Hub that stores uploads unchecked (S3-like)."""
    from stream_merge.push import Pusher

    pusher_env.trust_uploads = True
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-1.safetensors").write_bytes(DATA[:-1] + b"!")
    p = Pusher.open("org/merged", out, ["model-1.safetensors"])
    p.submit("model-1.safetensors", SHA)
    with pytest.raises(HubError, match="model-1.safetensors changed on disk after it was written"):
        p.finish([])
    repo = pusher_env.get_repo("org/merged")
    assert "model-1.safetensors" not in repo.commits[repo.branches["main"]].files
