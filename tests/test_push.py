"""push.py against the test Hub, in-process: the one git-sha1 helper, skipping files the repo already has,
the retry layer and one-line errors. (The end-to-end push with resume is in test_hub_merge.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from stream_merge.errors import HubError
from stream_merge.hub_cache import git_blob_sha1

pytestmark = pytest.mark.hub


def test_git_blob_sha1_matches_git(tmp_path: Path) -> None:
    data = b"hello\n"
    assert git_blob_sha1(data) == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object` of it
    (tmp_path / "f").write_bytes(data)
    assert git_blob_sha1(tmp_path / "f") == git_blob_sha1(data)
    try:
        out = subprocess.run(["git", "hash-object", str(tmp_path / "f")], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        return
    assert out.stdout.strip() == git_blob_sha1(data)




def test_finish_uploads_only_changed_small_files_with_the_index_last(pusher_env, tmp_path: Path) -> None:
    from stream_merge.push import Pusher

    hub = pusher_env
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"a": 1}')
    (out / "README.md").write_text("card")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    p = Pusher.open("org/merged", out, [])
    p.finish(["config.json", "README.md", "model.safetensors.index.json"])
    repo = hub.get_repo("org/merged")
    head = repo.commits[repo.branches["main"]]
    assert {n: head.files[n].read() for n in ("config.json", "README.md")} == {"config.json": b'{"a": 1}',
                                                                                "README.md": b"card"}
    hub.clear_log()
    (out / "README.md").write_text("card v2")
    p = Pusher.open("org/merged", out, [])
    p.finish(["config.json", "README.md", "model.safetensors.index.json"])
    commit = hub.requests("POST", "/api/models/org/merged/commit/main")
    assert len(commit) == 1 and p.uploaded == ["README.md"]  # config.json and the index were unchanged


def test_a_refused_push_is_one_line_naming_the_repo(pusher_env, tmp_path: Path) -> None:
    from stream_merge.push import Pusher

    hub = pusher_env
    hub.write_token = "hf_writer"
    with pytest.raises(HubError) as err:
        Pusher.open("org/merged", tmp_path, [])
    msg = str(err.value)
    assert "push to org/merged" in msg and "\n" not in msg and "token" in msg


def test_transient_failures_are_retried_once_then_named(pusher_env, tmp_path: Path, monkeypatch) -> None:
    from stream_merge import hub_errors
    from stream_merge.push import Pusher

    monkeypatch.setattr(hub_errors, "RETRY_WAIT_S", 0.0)
    hub = pusher_env
    hub.fail("/api/models/org/merged/paths-info", 503, times=1)
    p = Pusher.open("org/merged", tmp_path, ["a.safetensors"])  # one 503, retried
    assert p.remote == {}
    hub.fail("/api/models/org/merged/paths-info", 503, times=2)
    with pytest.raises(HubError, match="push to org/merged failed while reading the repo's files"):
        Pusher.open("org/merged", tmp_path, ["a.safetensors"])
