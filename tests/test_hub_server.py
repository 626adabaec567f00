"""The test Hub server satisfies an unmodified ``huggingface_hub`` 2.4 client.

Client-side checks run in subprocesses with ``hub_env`` because ``huggingface_hub`` reads its configuration
(endpoint, cache, offline mode, Xet) at import time. Protocol details the client does not exercise (chunked
uploads, fault hooks, keep-alive) are checked in-process with ``http.client``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

try:
    from hub_server import HubServer, hub_env
except ImportError:  # tests/ imported as a package
    from tests.hub_server import HubServer, hub_env

pytestmark = pytest.mark.hub

REPO = "org/tiny-model"
_MARK = "__HUB_TEST_RESULT__"

# Prepended to every client script: runs a callable and reports the exception class it raised.
_PRELUDE = '''
import json, os, hashlib
from pathlib import Path

def _err(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return [type(e).__name__] + [c.__name__ for c in type(e).__mro__]
    return None

def _sha256(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()
'''


def run_client(server: HubServer, hf_home: Path, code: str, extra_env: dict | None = None) -> dict:
    """Run ``code`` with the real client in a clean subprocess; the script assigns its findings to ``out``."""
    script = _PRELUDE + textwrap.dedent(code) + f"\nprint({_MARK!r} + json.dumps(out))\n"
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=hub_env(server, hf_home, extra_env),
        cwd=hf_home.parent,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, f"client failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    assert lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len(_MARK) :])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _pseudo_random(n: int, seed: bytes = b"seed") -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:n])


CONFIG_V1 = b'{"model_type": "tiny", "version": 1}'
CONFIG_V2 = b'{"model_type": "tiny", "version": 2}'
WEIGHTS_V1 = _pseudo_random(20_000, b"w1")
WEIGHTS_V2 = _pseudo_random(20_000, b"w2")


# ----------------------------------------------------------------------------------------------- downloads


def test_download_small_and_lfs_at_branch_tag_and_sha(hub, tmp_path):
    sha = hub.add_commit(REPO, {"config.json": CONFIG_V1, "model.safetensors": WEIGHTS_V1}, tag="v1.0")
    hf_home = tmp_path / "hf"
    out = run_client(hub, hf_home, f"""
        from huggingface_hub import hf_hub_download
        out = {{}}
        for rev in ["main", "v1.0", {sha!r}]:
            out[rev] = {{f: _sha256(hf_hub_download({REPO!r}, f, revision=rev))
                         for f in ["config.json", "model.safetensors"]}}
        out["snap"] = str(Path(hf_hub_download({REPO!r}, "config.json")).parent.name)
    """)
    for rev in ("main", "v1.0", sha):
        assert out[rev] == {"config.json": _sha256(CONFIG_V1), "model.safetensors": _sha256(WEIGHTS_V1)}
    assert out["snap"] == sha

    cache = hf_home / "hub" / "models--org--tiny-model"
    # Blob names come from the ETag: sha256 for LFS files, the git blob sha1 for regular files.
    assert (cache / "blobs" / _sha256(WEIGHTS_V1)).read_bytes() == WEIGHTS_V1
    assert (cache / "blobs" / _git_sha1(CONFIG_V1)).read_bytes() == CONFIG_V1
    assert (cache / "refs" / "main").read_text() == sha
    assert (cache / "refs" / "v1.0").read_text() == sha

    heads = hub.requests("HEAD", path_contains="model.safetensors")
    assert [h.status for h in heads] == [200, 200]  # main and tag; the sha needs no request once cached
    assert {h.path.split("/")[4] for h in heads} == {"main", "v1.0"}

    # A pinned sha that is already cached is served without any request.
    hub.clear_log()
    out = run_client(hub, hf_home, f"""
        from huggingface_hub import hf_hub_download
        out = _sha256(hf_hub_download({REPO!r}, "model.safetensors", revision={sha!r}))
    """)
    assert out == _sha256(WEIGHTS_V1)
    assert hub.requests() == []


def test_moved_branch_serves_new_content(hub, tmp_path):
    old = hub.add_commit(REPO, {"config.json": CONFIG_V1, "model.safetensors": WEIGHTS_V1})
    hf_home = tmp_path / "hf"
    code = f"""
        from huggingface_hub import hf_hub_download
        out = {{f: Path(hf_hub_download({REPO!r}, f)).read_bytes().decode("latin-1")
               for f in ["config.json", "model.safetensors"]}}
        out["old"] = Path(hf_hub_download({REPO!r}, "config.json", revision={old!r})).read_bytes().decode()
    """
    out = run_client(hub, hf_home, code)
    assert out["config.json"].encode() == CONFIG_V1 and out["old"].encode() == CONFIG_V1

    new = hub.add_commit(REPO, {"config.json": CONFIG_V2, "model.safetensors": WEIGHTS_V2})
    assert new != old
    out = run_client(hub, hf_home, code)
    assert out["config.json"].encode() == CONFIG_V2
    assert out["model.safetensors"].encode("latin-1") == WEIGHTS_V2
    assert out["old"].encode() == CONFIG_V1  # the old snapshot is still there
    refs = hf_home / "hub" / "models--org--tiny-model" / "refs" / "main"
    assert refs.read_text() == new

    # keep_existing applies changes on top of the branch head.
    third = hub.add_commit(REPO, {"extra.txt": b"x", "config.json": None}, keep_existing=True)
    assert sorted(hub.get_repo(REPO).commits[third].files) == ["extra.txt", "model.safetensors"]


def test_snapshot_download_with_paginated_tree(hub, tmp_path):
    files = {
        "config.json": CONFIG_V1,
        "model.safetensors": WEIGHTS_V1,
        "tokenizer/vocab.txt": b"a\nb\nc\n",
        "tokenizer/deep/merges.txt": b"a b\n",
        "README.md": b"# tiny\n",
    }
    sha = hub.add_commit(REPO, files)
    hub.tree_page_size = 2  # force Link: rel="next" pagination
    hf_home = tmp_path / "hf"
    code = f"""
        from huggingface_hub import snapshot_download
        d = Path(snapshot_download({REPO!r}))
        out = {{"dir": d.name, "files": {{str(p.relative_to(d)): _sha256(p) for p in d.rglob("*") if p.is_file()}}}}
    """
    out = run_client(hub, hf_home, code)
    assert out["dir"] == sha
    assert out["files"] == {p: _sha256(b) for p, b in files.items()}

    tree_calls = hub.requests("GET", path_contains="/tree/")
    assert len(tree_calls) >= 4  # 5 files + 3 directories in pages of 2
    assert tree_calls[0].query["recursive"] == ["true"]
    assert all("cursor" in t.query for t in tree_calls[1:])
    assert hub.requests("GET", path_contains=f"/api/models/{REPO}/revision/main")

    # A repeat call only resolves the revision: the tree listing is cached per commit.
    hub.clear_log()
    out = run_client(hub, hf_home, code)
    assert out["dir"] == sha
    assert [(r.method, r.path) for r in hub.requests()] == [("GET", f"/api/models/{REPO}/revision/main")]


def test_safetensors_metadata_reads_headers_with_ranges_only(hub, tmp_path):
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save

    shard1 = save({"layer.0.weight": np.ones((256, 300), dtype=np.float32)}, metadata={"format": "pt"})
    # A header larger than the client's first 100 kB range forces a second Range request.
    shard2 = save(
        {"layer.1.weight": np.zeros((300, 256), dtype=np.float16), "layer.1.bias": np.zeros((7,), np.float32)},
        metadata={"format": "pt", "padding": "x" * 150_000},
    )
    index = {
        "metadata": {"total_size": 256 * 300 * 4 + 300 * 256 * 2 + 28},
        "weight_map": {
            "layer.0.weight": "model-00001-of-00002.safetensors",
            "layer.1.weight": "model-00002-of-00002.safetensors",
            "layer.1.bias": "model-00002-of-00002.safetensors",
        },
    }
    hub.add_commit(REPO, {
        "config.json": CONFIG_V1,
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00002.safetensors": shard1,
        "model-00002-of-00002.safetensors": shard2,
    })
    out = run_client(hub, tmp_path / "hf", f"""
        from huggingface_hub import HfApi
        m = HfApi().get_safetensors_metadata({REPO!r})
        out = {{
            "sharded": m.sharded,
            "weight_map": m.weight_map,
            "tensors": {{f: {{n: [t.dtype, t.shape] for n, t in fm.tensors.items()}}
                        for f, fm in m.files_metadata.items()}},
            "metadata": {{f: (fm.metadata or {{}}).get("format") for f, fm in m.files_metadata.items()}},
        }}
    """)
    assert out["sharded"] is True
    assert out["weight_map"] == index["weight_map"]
    assert out["tensors"] == {
        "model-00001-of-00002.safetensors": {"layer.0.weight": ["F32", [256, 300]]},
        "model-00002-of-00002.safetensors": {"layer.1.weight": ["F16", [300, 256]], "layer.1.bias": ["F32", [7]]},
    }
    assert set(out["metadata"].values()) == {"pt"}

    shard_gets = [r for r in hub.requests("GET") if r.path.endswith("-of-00002.safetensors")]
    assert shard_gets, "the client never read the shard headers"
    assert all(r.range is not None and r.status == 206 for r in shard_gets), [(r.path, r.range) for r in shard_gets]
    for name, data in (("00001", shard1), ("00002", shard2)):
        sent = sum(r.bytes_sent for r in shard_gets if f"model-{name}" in r.path)
        assert sent < len(data) - 1000, "a shard was downloaded in full"
    assert [r.range for r in shard_gets if "00002-of" in r.path][1].startswith("bytes=8-")


def test_metadata_endpoints_paths_info_tree_and_model_info(hub, tmp_path):
    sha = hub.add_commit(REPO, {
        "config.json": CONFIG_V1,
        "model.safetensors": WEIGHTS_V1,
        "big.dat": _pseudo_random(300, b"big"),
        "sub/a.txt": b"a",
    }, lfs=["big.dat"])
    out = run_client(hub, tmp_path / "hf", f"""
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile
        api = HfApi()
        infos = api.get_paths_info({REPO!r}, ["model.safetensors", "config.json", "big.dat", "sub", "missing.txt"])
        info = api.model_info({REPO!r}, files_metadata=True)
        tree = list(api.list_repo_tree({REPO!r}, path_in_repo="sub", expand=True))
        refs = api.list_repo_refs({REPO!r})
        out = {{
            "paths": [[i.path, type(i).__name__, getattr(i, "blob_id", None),
                       i.lfs.sha256 if getattr(i, "lfs", None) else None,
                       getattr(i, "size", None)] for i in infos],
            "sha": info.sha, "id": info.id,
            "siblings": {{s.rfilename: [s.size, s.blob_id, s.lfs.sha256 if s.lfs else None] for s in info.siblings}},
            "files": api.list_repo_files({REPO!r}),
            "tree": [[t.path, t.last_commit.oid] for t in tree],
            "exists": [api.file_exists({REPO!r}, "config.json"), api.file_exists({REPO!r}, "nope.json")],
            "branches": [[b.name, b.target_commit] for b in refs.branches],
        }}
    """)
    paths = {p[0]: p[1:] for p in out["paths"]}
    assert set(paths) == {"model.safetensors", "config.json", "big.dat", "sub"}  # missing paths are left out
    assert paths["model.safetensors"][0] == "RepoFile" and paths["model.safetensors"][2] == _sha256(WEIGHTS_V1)
    assert paths["config.json"] == ["RepoFile", _git_sha1(CONFIG_V1), None, len(CONFIG_V1)]
    assert paths["big.dat"][2] == _sha256(_pseudo_random(300, b"big"))  # forced LFS although small
    assert paths["sub"][0] == "RepoFolder"
    assert out["sha"] == sha and out["id"] == REPO
    assert out["siblings"]["model.safetensors"] == [len(WEIGHTS_V1), out["paths"][0][2], _sha256(WEIGHTS_V1)]
    assert out["siblings"]["config.json"] == [len(CONFIG_V1), _git_sha1(CONFIG_V1), None]
    assert sorted(out["files"]) == ["big.dat", "config.json", "model.safetensors", "sub/a.txt"]
    assert out["tree"] == [["sub/a.txt", sha]]
    assert out["exists"] == [True, False]
    assert out["branches"] == [["main", sha]]


def test_dropped_connection_is_resumed_with_range(hub, tmp_path):
    data = _pseudo_random(1024 * 1024, b"resume")
    hub.add_commit(REPO, {"weights.bin": data})
    fault = hub.drop("*/weights.bin", after_bytes=700_000, times=1)
    out = run_client(hub, tmp_path / "hf", f"""
        from huggingface_hub import constants, hf_hub_download
        constants.DOWNLOAD_CHUNK_SIZE = 65536
        out = _sha256(hf_hub_download({REPO!r}, "weights.bin"))
    """)
    assert out == _sha256(data)
    assert fault.hits == 1
    gets = hub.requests("GET", path_contains="weights.bin")
    assert [(g.range, g.status, g.dropped) for g in gets] == [
        (None, 200, True),
        ("bytes=655360-", 206, False),  # ten whole 64 KiB chunks were kept
    ]
    assert gets[0].bytes_sent == 700_000
    assert gets[1].bytes_sent == len(data) - 655_360


def test_not_found_errors_map_to_client_exceptions(hub, tmp_path):
    sha = hub.add_commit(REPO, {"config.json": CONFIG_V1})
    hf_home = tmp_path / "hf"
    out = run_client(hub, hf_home, f"""
        from huggingface_hub import HfApi, hf_hub_download
        api = HfApi()
        out = {{
            "repo": _err(lambda: hf_hub_download("org/does-not-exist", "config.json")),
            "revision": _err(lambda: hf_hub_download({REPO!r}, "config.json", revision="no-such-branch")),
            "entry": _err(lambda: hf_hub_download({REPO!r}, "missing.json")),
            "info_repo": _err(lambda: api.model_info("org/does-not-exist")),
            "info_rev": _err(lambda: api.model_info({REPO!r}, revision="no-such-branch")),
            "tree_rev": _err(lambda: list(api.list_repo_tree({REPO!r}, revision="no-such-branch"))),
            "tree_path": _err(lambda: list(api.list_repo_tree({REPO!r}, path_in_repo="nodir"))),
        }}
    """)
    assert out["repo"][0] == "RepositoryNotFoundError"
    assert out["revision"][0] == "RevisionNotFoundError"
    assert "EntryNotFoundError" in out["entry"] and out["entry"][0] == "RemoteEntryNotFoundError"
    assert out["info_repo"][0] == "RepositoryNotFoundError"
    assert out["info_rev"][0] == "RevisionNotFoundError"
    assert out["tree_rev"][0] == "RevisionNotFoundError"
    assert "EntryNotFoundError" in out["tree_path"]
    # X-Repo-Commit on the EntryNotFound answer lets the client cache the absence.
    assert (hf_home / "hub" / "models--org--tiny-model" / ".no_exist" / sha / "missing.json").exists()
    assert {r.status for r in hub.requests("HEAD")} == {404}


def test_offline_mode_serves_from_cache(hub, tmp_path):
    sha = hub.add_commit(REPO, {"config.json": CONFIG_V1, "model.safetensors": WEIGHTS_V1, "sub/x.txt": b"x"})
    hf_home = tmp_path / "hf"
    code = f"""
        from huggingface_hub import hf_hub_download, snapshot_download
        out = {{
            "main": _sha256(hf_hub_download({REPO!r}, "model.safetensors")),
            "sha": _sha256(hf_hub_download({REPO!r}, "config.json", revision={sha!r})),
            "snap": sorted(str(p.relative_to(d)) for d in [Path(snapshot_download({REPO!r}))]
                           for p in d.rglob("*") if p.is_file()),
        }}
    """
    online = run_client(hub, hf_home, code)
    hub.clear_log()
    offline = run_client(hub, hf_home, textwrap.dedent(code) + f"""
out["uncached"] = _err(lambda: hf_hub_download({REPO!r}, "never-downloaded.txt"))
""", extra_env={"HF_HUB_OFFLINE": "1"})
    assert {k: offline[k] for k in online} == online
    assert online["main"] == _sha256(WEIGHTS_V1)
    assert "LocalEntryNotFoundError" in offline["uncached"]
    assert hub.requests() == []


def test_upload_regular_and_lfs_files_then_download(hub, tmp_path):
    lfs_data = _pseudo_random(50_000, b"upload")
    lfs_path = tmp_path / "adapter.safetensors"
    lfs_path.write_bytes(lfs_data)
    out = run_client(hub, tmp_path / "hf", f"""
        from huggingface_hub import HfApi, CommitOperationAdd, CommitOperationDelete, hf_hub_download
        api = HfApi()
        url = api.create_repo("org/pushed")
        url_again = api.create_repo("org/pushed", exist_ok=True)
        dup = _err(lambda: api.create_repo("org/pushed"))
        c1 = api.create_commit("org/pushed", operations=[
            CommitOperationAdd("config.json", {CONFIG_V1!r}),
            CommitOperationAdd("weights/adapter.safetensors", {str(lfs_path)!r}),
        ], commit_message="add files")
        c2 = api.upload_file(path_or_fileobj=b"---\\nlicense: mit\\n---\\n# pushed\\n", path_in_repo="README.md",
                             repo_id="org/pushed")
        # Unchanged content: preupload reports the remote oid, so nothing is uploaded or committed.
        c3 = api.upload_file(path_or_fileobj={str(lfs_path)!r}, path_in_repo="weights/adapter.safetensors",
                             repo_id="org/pushed")
        c4 = api.create_commit("org/pushed", operations=[CommitOperationDelete("config.json")],
                               commit_message="remove config")
        pr = api.upload_file(path_or_fileobj=b"pr content", path_in_repo="pr.txt", repo_id="org/pushed",
                             create_pr=True)
        out = {{
            "url": str(url), "url_again": str(url_again), "dup": dup,
            "oids": [c1.oid, c2.oid, c3.oid, c4.oid], "pr_url": pr.pr_url,
            "lfs": _sha256(hf_hub_download("org/pushed", "weights/adapter.safetensors", revision=c1.oid)),
            "config": Path(hf_hub_download("org/pushed", "config.json", revision=c1.oid)).read_text(),
            "deleted": _err(lambda: hf_hub_download("org/pushed", "config.json", revision=c4.oid)),
            "files_main": sorted(api.list_repo_files("org/pushed")),
            "pr_file": Path(hf_hub_download("org/pushed", "pr.txt", revision="refs/pr/1")).read_text(),
        }}
    """)
    assert out["url"] == out["url_again"] == f"{hub.endpoint}/org/pushed"
    assert out["dup"][0] == "HfHubHTTPError"
    assert out["lfs"] == _sha256(lfs_data)
    assert out["config"].encode() == CONFIG_V1
    assert "EntryNotFoundError" in out["deleted"]
    c1, c2, c3, c4 = out["oids"]
    assert len({c1, c2, c4}) == 3 and c3 == c2
    assert out["files_main"] == [".gitattributes", "README.md", "weights/adapter.safetensors"]
    assert out["pr_url"] == f"{hub.endpoint}/org/pushed/discussions/1"
    assert out["pr_file"] == "pr content"

    repo = hub.get_repo("org/pushed")
    blob = repo.commits[c1].files["weights/adapter.safetensors"]
    assert blob.lfs and blob.read() == lfs_data
    assert not repo.commits[c1].files["config.json"].lfs
    assert len(hub.requests("POST", path_contains="org/pushed.git/info/lfs/objects/batch")) == 2
    assert len(hub.requests("PUT", path_contains="/_lfs/upload/")) == 1  # the second batch had no actions
    assert len(hub.requests("POST", path_contains="/_lfs/verify/")) == 1
    assert len(hub.requests("POST", path_contains="/api/validate-yaml")) == 1
    commits = hub.requests("POST", path_contains="/api/models/org/pushed/commit/main")
    assert [c.query.get("create_pr") for c in commits] == [None, None, None, ["1"]]  # c3 made no commit
    assert hub.requests(path_contains="xet") == []


def test_private_and_gated_repos_need_the_token(hub, tmp_path):
    hub.create_repo("org/private", private=True, token="hf_good")
    hub.add_commit("org/private", {"config.json": CONFIG_V1})
    hub.create_repo("org/gated", gated=True, token="hf_good")
    hub.add_commit("org/gated", {"config.json": CONFIG_V2})
    code = """
        from huggingface_hub import HfApi, hf_hub_download
        api = HfApi()
        out = {
            "private": _err(lambda: hf_hub_download("org/private", "config.json")),
            "private_info": _err(lambda: api.model_info("org/private")),
            "gated": _err(lambda: hf_hub_download("org/gated", "config.json")),
            "gated_info": _err(lambda: api.model_info("org/gated")),
        }
    """
    anon = run_client(hub, tmp_path / "anon", code)
    assert anon["private"][0] == "RepositoryNotFoundError"
    assert anon["private_info"][0] == "RepositoryNotFoundError"
    assert anon["gated"][0] == "GatedRepoError"
    assert anon["gated_info"] is None  # metadata of a gated repo is public

    wrong = run_client(hub, tmp_path / "wrong", code, extra_env={"HF_TOKEN": "hf_bad"})
    assert wrong["private"][0] == "RepositoryNotFoundError"
    assert wrong["gated"][0] == "GatedRepoError"

    hub.clear_log()
    good = run_client(hub, tmp_path / "good", code, extra_env={"HF_TOKEN": "hf_good"})
    assert good == {"private": None, "private_info": None, "gated": None, "gated_info": None}
    assert {r.authorization for r in hub.requests()} == {"Bearer hf_good"}


def test_client_faces_injected_faults(hub, tmp_path):
    """503 on HEAD is retried; corrupted bodies and wrong ETags are accepted by the client as documented."""
    hub.add_commit(REPO, {"config.json": CONFIG_V1, "model.safetensors": WEIGHTS_V1, "other.bin": WEIGHTS_V2})
    hub.fail("*/config.json", 503, times=1, methods=["HEAD"])
    hub.corrupt("*/model.safetensors")
    hub.wrong_etag("*/other.bin")
    hf_home = tmp_path / "hf"
    out = run_client(hub, hf_home, f"""
        from huggingface_hub import hf_hub_download
        p = Path(hf_hub_download({REPO!r}, "model.safetensors"))
        o = Path(hf_hub_download({REPO!r}, "other.bin"))
        out = {{
            "config": Path(hf_hub_download({REPO!r}, "config.json")).read_text(),
            "model": [p.stat().st_size, _sha256(p)],
            "other_blob": o.resolve().name,
        }}
    """)
    assert out["config"].encode() == CONFIG_V1
    assert [r.status for r in hub.requests("HEAD", path_contains="config.json")] == [503, 200]
    assert out["model"][0] == len(WEIGHTS_V1) and out["model"][1] != _sha256(WEIGHTS_V1)
    assert out["other_blob"] != _sha256(WEIGHTS_V2)


# ----------------------------------------------------------------------------- protocol details, in-process


def _request(server: HubServer, method: str, path: str, body=None, headers=None, conn=None):
    c = conn or http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    return r, data, c


def test_http_protocol_details(hub):
    data = _pseudo_random(5000, b"proto")
    sha = hub.add_commit(REPO, {"model.safetensors": data, "a b/c.txt": b"spaced"})
    path = f"/{REPO}/resolve/main/model.safetensors"

    r, body, conn = _request(hub, "HEAD", path)
    assert r.status == 200 and body == b""
    assert r.getheader("Content-Length") == "5000" and r.getheader("X-Linked-Size") == "5000"
    assert r.getheader("ETag") == r.getheader("X-Linked-Etag") == f'"{_sha256(data)}"'
    assert r.getheader("X-Repo-Commit") == sha
    assert not [h for h, _ in r.getheaders() if h.lower().startswith("x-xet") or h.lower() == "link"]
    sock = conn.sock
    r, body, _ = _request(hub, "GET", path, headers={"Range": "bytes=10-19"}, conn=conn)
    assert (r.status, body, r.getheader("Content-Range")) == (206, data[10:20], "bytes 10-19/5000")
    assert conn.sock is sock, "keep-alive connection was not reused"
    r, body, _ = _request(hub, "GET", path, headers={"Range": "bytes=-5"}, conn=conn)
    assert (r.status, body) == (206, data[-5:])
    r, body, _ = _request(hub, "GET", path, headers={"Range": "bytes=5000-"}, conn=conn)
    assert r.status == 416 and r.getheader("Content-Range") == "bytes */5000"
    r, body, _ = _request(hub, "GET", f"/{REPO}/resolve/main/a%20b/c.txt", conn=conn)
    assert body == b"spaced" and r.getheader("ETag") == f'"{_git_sha1(b"spaced")}"'
    assert r.getheader("X-Linked-Etag") is None

    # Quoted refs/pr/N revisions and sha revisions.
    hub.set_ref(REPO, "refs/pr/1", sha)
    r, body, _ = _request(hub, "GET", f"/{REPO}/resolve/refs%2Fpr%2F1/a%20b/c.txt", conn=conn)
    assert r.status == 200 and body == b"spaced"
    r, body, _ = _request(hub, "GET", f"/api/models/{REPO}/revision/refs%2Fpr%2F1", conn=conn)
    assert json.loads(body)["sha"] == sha

    # Error codes.
    for p, code in [(f"/org/nope/resolve/main/x", "RepoNotFound"), (f"/{REPO}/resolve/nope/x", "RevisionNotFound"),
                    (f"/{REPO}/resolve/main/nope", "EntryNotFound")]:
        r, body, _ = _request(hub, "HEAD", p, conn=conn)
        assert (r.status, r.getheader("X-Error-Code")) == (404, code)
    assert r.getheader("X-Repo-Commit") == sha
    r, body, _ = _request(hub, "GET", "/api/agent-harnesses", conn=conn)
    assert r.status == 404

    # Tree pagination uses absolute Link URLs.
    hub.tree_page_size = 1
    r, body, _ = _request(hub, "GET", f"/api/models/{REPO}/tree/main?recursive=true&expand=false", conn=conn)
    link = r.getheader("Link")
    assert link.startswith(f"<{hub.endpoint}/api/models/{REPO}/tree/main?") and link.endswith('rel="next"')
    assert len(json.loads(body)) == 1

    # 409 on create carries the url.
    r, body, _ = _request(hub, "POST", "/api/repos/create", json.dumps({"name": "tiny-model", "organization": "org"}),
                          {"Content-Type": "application/json"}, conn=conn)
    assert r.status == 409 and json.loads(body)["url"] == f"{hub.endpoint}/{REPO}"
    conn.close()


def test_chunked_lfs_upload_and_commit(hub):
    hub.add_commit(REPO, {"config.json": CONFIG_V1})
    data = _pseudo_random(200_000, b"chunked")
    oid = _sha256(data)
    r, body, conn = _request(hub, "POST", f"/{REPO}.git/info/lfs/objects/batch",
                             json.dumps({"operation": "upload", "transfers": ["basic"],
                                         "objects": [{"oid": oid, "size": len(data)}]}))
    obj = json.loads(body)["objects"][0]
    upload, verify = obj["actions"]["upload"]["href"], obj["actions"]["verify"]["href"]
    assert upload.startswith(hub.endpoint)

    conn.putrequest("PUT", upload[len(hub.endpoint):])
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for i in range(0, len(data), 30_000):
        part = data[i : i + 30_000]
        conn.send(b"%x\r\n" % len(part) + part + b"\r\n")
    conn.send(b"0\r\n\r\n")
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    r, body, _ = _request(hub, "POST", verify[len(hub.endpoint):], json.dumps({"oid": oid, "size": len(data)}),
                          conn=conn)
    assert r.status == 200

    ndjson = b"".join(json.dumps(x).encode() + b"\n" for x in [
        {"key": "header", "value": {"summary": "add", "description": ""}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(data)}},
        {"key": "deletedFile", "value": {"path": "config.json"}},
    ])
    r, body, _ = _request(hub, "POST", f"/api/models/{REPO}/commit/main", ndjson,
                          {"Content-Type": "application/x-ndjson"}, conn=conn)
    assert r.status == 200, body
    commit = json.loads(body)["commitOid"]
    assert hub.file_bytes(REPO, "w.bin", commit) == data
    assert sorted(hub.get_repo(REPO).commits[commit].files) == ["w.bin"]
    # Stale parentCommit is refused.
    stale = ndjson.replace(b'"description": ""}', b'"description": "", "parentCommit": "' + b"0" * 40 + b'"}')
    r, body, _ = _request(hub, "POST", f"/api/models/{REPO}/commit/main", stale, conn=conn)
    assert r.status == 412
    conn.close()


def test_fault_hooks(hub):
    data = _pseudo_random(10_000, b"faults")
    hub.add_commit(REPO, {"model.safetensors": data})
    path = f"/{REPO}/resolve/main/model.safetensors"

    hub.fail("model.safetensors", 503, times=1)
    r, _, conn = _request(hub, "GET", path)
    assert r.status == 503 and r.getheader("X-Error-Message")
    r, body, _ = _request(hub, "GET", path, conn=conn)
    assert r.status == 200 and body == data

    hub.clear_faults()
    hub.corrupt("*.safetensors", times=1, every=1000)
    r, body, _ = _request(hub, "GET", path, conn=conn)
    assert len(body) == len(data) and body != data
    assert sum(a != b for a, b in zip(body, data)) == 10
    r, body, _ = _request(hub, "GET", path, conn=conn)
    assert body == data  # times=1

    hub.wrong_etag(path, times=1)
    r, _, _ = _request(hub, "HEAD", path, conn=conn)
    assert r.getheader("X-Linked-Etag") != f'"{_sha256(data)}"' and r.status == 200

    hub.delay("model.safetensors", 0.3, times=1)
    t0 = time.monotonic()
    _request(hub, "HEAD", path, conn=conn)
    assert time.monotonic() - t0 >= 0.3
    conn.close()

    hub.drop(path, after_bytes=1234, times=1)
    with pytest.raises(http.client.IncompleteRead) as exc:
        _request(hub, "GET", path)
    assert len(exc.value.partial) == 1234
    entry = hub.requests("GET")[-1]
    assert entry.dropped and entry.bytes_sent == 1234

    hub.drop(lambda method, p: p.endswith(".safetensors"), after_bytes=None, times=1)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError, socket.error)):
        _request(hub, "GET", path)
    r, body, _ = _request(hub, "GET", path)
    assert body == data
    assert [e.status for e in hub.requests("GET")][-2:] == [None, 200]


def test_hub_env_is_clean(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_real_user_token")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", "/somewhere")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = hub_env(hub, tmp_path / "home")
    assert not [k for k in env if k.startswith(("HF_", "HUGGINGFACE_")) and k not in {
        "HF_ENDPOINT", "HF_HOME", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_XET"}]
    assert env["HF_ENDPOINT"] == hub.endpoint and env["HF_HOME"] == str(tmp_path / "home")
    assert env["HF_HUB_DISABLE_TELEMETRY"] == env["HF_HUB_DISABLE_XET"] == "1"
    assert env["NO_PROXY"] == "127.0.0.1,localhost"
    assert os.environ["HF_TOKEN"] == "hf_real_user_token"  # the caller's environment is untouched
