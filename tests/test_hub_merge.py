"""Merging straight from the Hub, shard by shard, and pushing the result back (issue 5).

Every test runs the real CLI in a subprocess against the project's Hub-compatible server on 127.0.0.1
(`hub_server.py`, with `hub_env`: no real token, a temporary HF_HOME, HF_HUB_DISABLE_XET=1), and compares the
output bytes with a local merge of the same checkpoint. The server's request log and fault hooks show what
was fetched when: headers by range requests before any shard download, one pinned commit for every file,
retries after drops, 503s and corrupted bodies, nothing at all when offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import forget_digests, rewrite_adapter
from zygote import Zygote
from stream_merge.synthetic import LlamaShape, write_adapter, write_checkpoint

try:
    from hub_server import HubServer, hub_env
except ImportError:  # tests/ imported as a package
    from tests.hub_server import HubServer, hub_env

pytestmark = pytest.mark.hub

SHAPE = LlamaShape(hidden=128, intermediate=256, layers=3, vocab=512, heads=4, kv_heads=2)
SHARD_BYTES = 200_000
HEADER_PROBE = 100_000  # stream_merge.hub.HEADER_PROBE: the most a header read may transfer
JOURNAL = "stream_merge.journal.json"


def journal_shards(out: Path) -> dict:
    """The finished-shard records of OUT's journal (one small file per shard)."""
    from stream_merge.journal import load_journal

    journal = load_journal(out)
    return journal.shards if journal else {}
DOWNLOADS = ".stream-merge-downloads"
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A ~1.1 MB BF16 Llama in 7 shards of 130-200 kB, its adapter, a variant with other weights, and the
    output of a local merge (the expected bytes)."""
    import stream_merge

    root = tmp_path_factory.mktemp("hub-model")
    base, base2, adapter, ref = root / "base", root / "base-v2", root / "adapter", root / "ref"
    shards = write_checkpoint(base, SHAPE, max_shard_bytes=SHARD_BYTES)
    write_checkpoint(base2, SHAPE, max_shard_bytes=SHARD_BYTES, seed=7)
    write_adapter(adapter, SHAPE, r=4, alpha=8.0, base_name="org/base")
    stream_merge.merge(str(base), str(adapter), str(ref), device="cpu")
    sizes = {s: (base / s).stat().st_size for s in shards}
    assert len(shards) >= 5 and min(sizes.values()) > HEADER_PROBE
    return {"base": base, "base2": base2, "adapter": adapter, "ref": ref, "shards": shards, "sizes": sizes}


def publish(hub: HubServer, model: dict, tag: str | None = None) -> str:
    hub.add_commit("org/lora", {p.name: p for p in model["adapter"].iterdir()})
    return hub.add_commit("org/base", {p.name: p for p in model["base"].iterdir()}, tag=tag)


# Each CLI run is its own process with its own environment, forked from the shared fork server (tests/zygote.py),
# which has imported torch and stream_merge once (2 s a run saved) but not huggingface_hub.
@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    if not hasattr(os, "fork"):
        yield None
        return
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE_"))}
    server = Zygote(tmp_path_factory.mktemp("zygote-logs"), env=env)
    yield server
    server.close()


def cli(hub: HubServer, hf_home: Path, *args: object, env: dict | None = None, timeout: int = 120
        ) -> subprocess.CompletedProcess:
    """`python -m stream_merge ARGS` in its own process, with hub_env (+ `env`) as its whole environment."""
    argv = [str(a) for a in args]
    full_env = hub_env(hub, hf_home, env)
    server = _ZYGOTE.get("server")
    if server is None:
        return subprocess.run([sys.executable, "-m", "stream_merge", *argv], capture_output=True, text=True,
                              env=full_env, cwd=hf_home.parent, timeout=timeout)
    return server.run(argv, env=full_env, cwd=hf_home.parent, timeout=timeout)


_ZYGOTE: dict = {}


@pytest.fixture(autouse=True)
def _use_zygote(zygote):
    _ZYGOTE["server"] = zygote
    yield
    _ZYGOTE.clear()


def merge(hub: HubServer, hf_home: Path, out: Path, *args: object, base: str = "org/base", env: dict | None = None
          ) -> subprocess.CompletedProcess:
    return cli(hub, hf_home, "merge", base, "org/lora", "-o", out, "--device", "cpu", "--quiet", *args, env=env)


def same_shards(out: Path, model: dict) -> None:
    for s in model["shards"]:
        assert (out / s).read_bytes() == (model["ref"] / s).read_bytes(), s
    assert json.loads((out / INDEX).read_text()) == json.loads((model["ref"] / INDEX).read_text())


def full_gets(hub: HubServer, repo: str, shard: str) -> list:
    """Whole-file downloads of a shard (header reads are range requests)."""
    return [r for r in hub.requests("GET", f"/{repo}/resolve/") if r.path.endswith("/" + shard) and r.range is None]


def after_planning(out: Path, shard: str, method: str = "GET"):
    """A fault pattern that spares the planning-time header reads: it matches once the journal exists."""
    return lambda m, p: m == method and p.endswith("/" + shard) and (out / JOURNAL).exists()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- tests


def test_revision_is_pinned_once_and_a_moved_branch_is_another_input(hub, model, tmp_path):
    sha1 = publish(hub, model, tag="v1")
    out, hf = tmp_path / "out", tmp_path / "hf"
    moved = {}

    def move_main(method: str, path: str) -> bool:  # while shard 3 downloads, main moves to other weights
        if not moved and method == "GET" and path.endswith(model["shards"][2]) and (out / JOURNAL).exists():
            moved["sha"] = hub.add_commit("org/base", {p.name: p for p in model["base2"].iterdir()})
        return False

    hub.add_fault(move_main, "delay", seconds=0)
    r = merge(hub, hf, out, base="org/base@main")
    assert r.returncode == 0, r.stderr
    assert moved["sha"] != sha1
    same_shards(out, model)  # every shard came from the commit main pointed at when the run began
    resolves = hub.requests(path_contains="/org/base/resolve/")
    assert resolves and all(f"/resolve/{sha1}/" in q.path for q in resolves)
    assert len(hub.requests("GET", "/api/models/org/base")) == 1  # resolved once
    record = json.loads((out / "stream_merge.json").read_text())
    assert not (out / JOURNAL).exists()  # removed on completion: the record says the same (issue 15 item 6)
    assert record["inputs"]["base"]["revision"] == sha1
    assert record["inputs"]["base"]["spec"] == "org/base@main"
    assert not (out / DOWNLOADS).exists()
    blobs = {p.name for p in (hf / "hub" / "models--org--base" / "blobs").iterdir()}
    assert not blobs & {sha256(model["base"] / s) for s in model["shards"]}  # no shard was put in the cache

    # The same command now sees another commit: refused, with the way to resume.
    r = merge(hub, hf, out, base="org/base@main")
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and moved["sha"] in line and f"org/base@{sha1}" in line and "--fresh" in line

    # Pinned by tag (or sha) it is the same input: everything resumes, no shard is fetched.
    hub.clear_log()
    r = cli(hub, hf, "merge", "org/base@v1", "org/lora", "-o", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert f"{len(model['shards'])} shards ({len(model['shards'])} resumed)" in r.stdout
    assert not any(full_gets(hub, "org/base", s) for s in model["shards"])
    same_shards(out, model)


def test_drops_503s_and_a_corrupted_body_are_survived(hub, model, tmp_path):
    publish(hub, model)
    out, hf = tmp_path / "out", tmp_path / "hf"
    s = model["shards"]
    hub.fail("/api/models/org/base", 503, times=1)                                  # revision lookup
    hub.drop(after_planning(out, s[1]), after_bytes=model["sizes"][s[1]] // 2)      # mid-shard
    hub.fail(after_planning(out, s[2]), 503, times=1)                               # shard GET
    hub.fail(after_planning(out, s[3], "HEAD"), 503, times=1)                       # shard HEAD
    hub.corrupt(after_planning(out, s[4]), times=1, every=4096)                     # right size, wrong bytes
    r = merge(hub, hf, out, "--debug")
    assert r.returncode == 0, r.stderr
    same_shards(out, model)

    assert [q.status for q in hub.requests("GET", "/api/models/org/base")] == [503, 200]
    # the dropped download, then the rest: resumed from what reached the file (a range request), or whole
    size = model["sizes"][s[1]]
    dropped = [q for q in hub.requests("GET", "/org/base/resolve/") if q.path.endswith("/" + s[1])
               and (q.range is None or not q.range.startswith("bytes=0-"))]  # not the planning header reads
    assert [q.dropped for q in dropped] == [True, False]
    assert dropped[0].bytes_sent == size // 2
    resumed_at = int(dropped[1].range[len("bytes="):].split("-")[0]) if dropped[1].range else 0
    assert 0 <= resumed_at <= size // 2 and dropped[1].bytes_sent == size - resumed_at
    assert [q.status for q in full_gets(hub, "org/base", s[2])] == [503, 200]
    assert [q.status for q in hub.requests("HEAD", s[3])] == [503, 200]
    corrupted = full_gets(hub, "org/base", s[4])
    assert [q.faults for q in corrupted] == [["corrupt"], []]  # sha256 mismatch -> downloaded once more
    assert f"{s[4]} from org/base does not match the Hub's checksum" in r.stderr
    for other in (s[0], s[5]):
        assert len(full_gets(hub, "org/base", other)) == 1


def test_a_shard_that_stays_corrupt_fails_naming_it_then_resumes(hub, model, tmp_path):
    publish(hub, model)
    out, hf = tmp_path / "out", tmp_path / "hf"
    bad = model["shards"][2]
    hub.corrupt(after_planning(out, bad), every=50_000)
    r = merge(hub, hf, out, "--prefetch", "0")
    assert r.returncode == 2
    assert f"WARNING: {bad} from org/base does not match the Hub's checksum" in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and bad in line and "downloaded twice" in line and "sha256" in line
    assert len(full_gets(hub, "org/base", bad)) == 2
    assert not list((out / DOWNLOADS).rglob("*.safetensors"))  # the bad copy is gone
    assert sorted(journal_shards(out)) == model["shards"][:2]
    assert not (out / INDEX).exists()

    hub.clear_faults()
    hub.clear_log()
    r = cli(hub, hf, "merge", "org/base", "org/lora", "-o", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "(2 resumed)" in r.stdout
    assert not full_gets(hub, "org/base", model["shards"][0]) and len(full_gets(hub, "org/base", bad)) == 1
    same_shards(out, model)


def test_a_run_killed_mid_download_resumes_like_a_local_one(hub, model, tmp_path):
    publish(hub, model)
    out, hf = tmp_path / "out", tmp_path / "hf"
    s = model["shards"]
    reached = threading.Event()

    def stall(method: str, path: str) -> bool:  # hold the 5th shard's download until the process is killed
        hit = method == "GET" and path.endswith("/" + s[4]) and (out / JOURNAL).exists()
        if hit:
            reached.set()
        return hit

    hub.add_fault(stall, "delay", seconds=3, times=1)
    proc = subprocess.Popen([sys.executable, "-m", "stream_merge", "merge", "org/base", "org/lora", "-o", str(out),
                             "--device", "cpu", "--quiet"], env=hub_env(hub, hf), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert reached.wait(90), "the merge never reached the 5th shard"
    finally:
        proc.kill()
        proc.wait(30)
    finished = sorted(journal_shards(out))
    assert finished and s[4] not in finished and not (out / INDEX).exists()
    assert list((out / DOWNLOADS).rglob("*.incomplete"))  # the killed download's partial file

    hub.clear_log()
    r = merge(hub, hf, out, "--prefetch", "2")  # --prefetch does not change the output: same input
    assert r.returncode == 0, r.stderr
    same_shards(out, model)
    for f in finished:  # kept, not fetched again
        assert not full_gets(hub, "org/base", f)
    for f in s[4:]:
        assert len(full_gets(hub, "org/base", f)) == 1
    assert not (out / DOWNLOADS).exists()


def test_planning_errors_surface_before_any_shard_download(hub, model, tmp_path):
    publish(hub, model)
    bad = tmp_path / "bad-lora"
    shutil.copytree(model["adapter"], bad)

    def break_it(sd: dict) -> None:
        sd["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = \
            sd["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].clone()
        sd["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = \
            sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].clone()
        key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
        sd[key] = sd[key][:, :-3].clone()

    rewrite_adapter(bad, break_it)
    hub.add_commit("org/bad-lora", {p.name: p for p in bad.iterdir()})
    out = tmp_path / "out"
    r = cli(hub, tmp_path / "hf", "merge", "org/base", "org/bad-lora", "-o", out, "--device", "cpu")
    assert r.returncode == 2
    assert "the merge plan has 2 problems" in r.stderr and "layers.9" in r.stderr and "down_proj" in r.stderr
    shard_requests = [q for q in hub.requests(path_contains="/org/base/resolve/") if q.path.endswith(".safetensors")]
    assert len(shard_requests) == len(model["shards"])  # one header read each ...
    for q in shard_requests:  # ... as a range request that transferred at most the probe, never a whole shard
        size = model["sizes"][q.path.rsplit("/", 1)[1]]
        assert q.method == "GET" and q.range == f"bytes=0-{HEADER_PROBE - 1}" and q.bytes_sent <= HEADER_PROBE < size
    assert not any(out.glob("*.safetensors"))


def test_offline_works_from_the_cache_or_names_what_is_missing(hub, model, tmp_path):
    publish(hub, model)
    hf = tmp_path / "hf"
    r = merge(hub, hf, tmp_path / "online", "--keep-downloads")
    assert r.returncode == 0, r.stderr
    snapshot = next((hf / "hub" / "models--org--base" / "snapshots").iterdir())
    assert all((snapshot / s).is_file() for s in model["shards"])  # kept in the HF cache
    assert not (tmp_path / "online" / DOWNLOADS).exists()

    hub.clear_log()
    offline = {"HF_HUB_OFFLINE": "1"}
    r = merge(hub, hf, tmp_path / "offline", env=offline)
    assert r.returncode == 0, r.stderr
    same_shards(tmp_path / "offline", model)
    assert hub.requests() == []
    assert all((snapshot / s).is_file() for s in model["shards"])  # used in place, never deleted
    record = json.loads((tmp_path / "offline" / "stream_merge.json").read_text())
    assert record["inputs"]["base"]["revision"] == snapshot.name

    # A cache missing two shards: one line naming them, still no request.
    partial = tmp_path / "hf-partial"
    shutil.copytree(hf, partial, symlinks=True)
    psnap = partial / "hub" / "models--org--base" / "snapshots" / snapshot.name
    for s in model["shards"][3:5]:
        (psnap / s).unlink()
    r = merge(hub, partial, tmp_path / "missing", env=offline)
    assert r.returncode == 2
    line = r.stderr.strip()
    assert "\n" not in line and "HF_HUB_OFFLINE=1" in line and "2 shard(s)" in line
    assert all(s in line for s in model["shards"][3:5]) and model["shards"][0] not in line
    assert hub.requests() == []


def test_disk_peak_is_output_plus_prefetch_plus_one_shards_and_cached_shards_stay(hub, model, tmp_path):
    sha = publish(hub, model)
    hf = tmp_path / "hf"
    cached = model["shards"][:2]
    code = f"from huggingface_hub import hf_hub_download\nfor f in {cached!r}: hf_hub_download('org/base', f)\n"
    subprocess.run([sys.executable, "-c", code], env=hub_env(hub, hf), check=True, timeout=60)
    snapshot = hf / "hub" / "models--org--base" / "snapshots" / sha
    biggest = max(model["sizes"].values())
    peaks = {}
    for prefetch in (1, 0):
        out = tmp_path / f"out{prefetch}"
        seen: list[tuple[str, list[str], bool]] = []  # at each shard download: other shards on disk, prev merged?

        def observe(method: str, path: str, out: Path = out, seen: list = seen) -> bool:
            try:
                name = path.rsplit("/", 1)[1]
                if method == "GET" and name in model["sizes"] and (out / JOURNAL).exists():
                    on_disk = [p.name for p in (out / DOWNLOADS).glob("*/*.safetensors")]  # one area per run
                    prev = model["shards"][model["shards"].index(name) - 1]
                    seen.append((name, on_disk, prev in journal_shards(out)))
            except (OSError, ValueError):
                pass
            return False

        hub.clear_log()
        hub.clear_faults()
        hub.add_fault(observe, "delay", seconds=0)
        peak = {"bytes": 0, "shards": 0}
        stop = threading.Event()

        def poll(out: Path = out, peak: dict = peak) -> None:
            while not stop.is_set():
                total, shards = 0, 0
                for dirpath, _, names in os.walk(out):
                    for n in names:
                        try:
                            total += os.stat(os.path.join(dirpath, n)).st_size
                        except OSError:
                            continue
                        shards += DOWNLOADS in dirpath and n.endswith((".safetensors", ".incomplete"))
                peak["bytes"], peak["shards"] = max(peak["bytes"], total), max(peak["shards"], shards)
                time.sleep(0.001)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        r = merge(hub, hf, out, "--prefetch", prefetch)
        stop.set()
        poller.join()
        assert r.returncode == 0, r.stderr
        same_shards(out, model)
        final = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        peaks[prefetch] = (peak["bytes"] - final, peak["shards"])
        assert peak["bytes"] <= final + (prefetch + 1) * biggest
        assert peak["shards"] <= prefetch + 1
        assert [n for n, _, _ in seen] == model["shards"][2:]  # the cached shards are never requested
        assert all(not hub.requests(path_contains=c) for c in cached)
        assert all(len(on_disk) <= prefetch for _, on_disk, _ in seen)
        if prefetch == 0:
            assert all(not on_disk and prev_done for _, on_disk, prev_done in seen[1:])
        else:  # downloads overlap merging: some shard was fetched while its predecessor was still on disk
            assert any(on_disk for _, on_disk, _ in seen[1:]), seen
        assert not (out / DOWNLOADS).exists()
        assert all((snapshot / c).is_file() for c in cached)  # used in place, never deleted
    print(f"disk above the final output: prefetch 1: {peaks[1][0]} B / {peaks[1][1]} shard(s); "
          f"prefetch 0: {peaks[0][0]} B / {peaks[0][1]} shard(s); biggest shard {biggest} B")


def test_disk_preflight_counts_the_downloaded_shards(model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from stream_merge import runner
    from stream_merge.config import build_config
    from stream_merge.errors import OutputError
    from stream_merge.hub import HubSource, RemoteFile

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    files = {s: RemoteFile(s, n) for s, n in model["sizes"].items()}
    src = HubSource("org/base", "BASE", "org/base", "0" * 40, files, tmp_path, download_dir=tmp_path / DOWNLOADS)
    todo = model["shards"][1:]
    top = sorted((model["sizes"][s] for s in todo), reverse=True)
    assert src.disk_need(todo, 2) == [(tmp_path / DOWNLOADS, sum(top[:3]))]
    keep = HubSource("org/base", "BASE", "org/base", "0" * 40, files, tmp_path, keep_downloads=True)
    assert keep.disk_need(todo, 2) == [(tmp_path / "cache", sum(top))]

    plan = runner.plan_merge(build_config(base=str(model["base"]), adapters=[str(model["adapter"])]))[0]
    out = tmp_path / "out"
    out.mkdir()
    writes = sum(s.out_data_bytes + s.in_bytes - sum(t.source.nbytes for t in s.tensors)
                 for s in plan.shards if s.file in todo) + max(
        s.out_data_bytes + s.in_bytes - sum(t.source.nbytes for t in s.tensors) for s in plan.shards)
    free = {"bytes": writes + sum(top[:3]) - 1}
    monkeypatch.setattr(runner.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(0, 0, free["bytes"]))
    with pytest.raises(OutputError, match="base shards downloaded at once"):
        runner._check_disk(out, plan, todo, src.disk_need(todo, 2))
    free["bytes"] += 1
    runner._check_disk(out, plan, todo, src.disk_need(todo, 2))


def test_push_uploads_shard_by_shard_and_resumes_after_an_interruption(hub, model, tmp_path):
    publish(hub, model)
    out, hf = tmp_path / "out", tmp_path / "hf"
    commits = {"n": 0}

    def third_commit(method: str, path: str) -> bool:
        if method == "POST" and path == "/api/models/org/merged/commit/main":
            commits["n"] += 1
            return commits["n"] == 3
        return False

    hub.add_fault(third_commit, "status", status=500)
    args = ("--push-to-hub", "org/merged", "--private", "--no-local-copy", "--token", "hf_push")
    r = merge(hub, hf, out, *args)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert "push to org/merged failed" in line and "re-run the same command to resume" in line

    repo = hub.get_repo("org/merged")
    assert repo.private
    first = repo.commits[repo.branches["main"]].files
    pushed = {s for s in model["shards"] if s in first}
    assert pushed and INDEX not in first  # some shards are up, and the repo does not look complete
    for s in pushed:
        assert first[s].sha256 == sha256(model["ref"] / s)
        assert not (out / s).exists()  # uploaded, so deleted locally
    hub.clear_log()

    r = merge(hub, hf, out, *args)
    assert r.returncode == 0, r.stderr
    for s in pushed:  # neither merged again (no base download) nor uploaded again
        assert not full_gets(hub, "org/base", s)
    put_oids = {q.path.rsplit("/", 1)[1] for q in hub.requests("PUT", "/_lfs/upload/")}
    assert put_oids.isdisjoint({sha256(model["ref"] / s) for s in pushed})
    head = repo.commits[repo.branches["main"]]
    assert {s: head.files[s].sha256 for s in model["shards"]} == {s: sha256(model["ref"] / s) for s in model["shards"]}
    assert head.files[INDEX].read() == (out / INDEX).read_bytes() == (model["ref"] / INDEX).read_bytes()
    for small in ("README.md", "config.json", "stream_merge.json", "generation_config.json"):
        assert head.files[small].read() == (out / small).read_bytes(), small
    assert INDEX not in repo.commits[head.parent].files  # the index came last
    assert not any(out.glob("*.safetensors")) and (out / INDEX).exists()
    assert {q.authorization for q in hub.requests(path_contains="org/merged")} == {"Bearer hf_push"}


def test_gated_private_and_unknown_revisions_are_one_line_errors(hub, model, tmp_path):
    hub.create_repo("org/base", gated=True, token="hf_good")
    hub.create_repo("org/lora", private=True, token="hf_other")
    publish(hub, model)
    hf = tmp_path / "hf"
    cases = [
        ("org/base", (), {}, "BASE org/base is a gated repo and without a token you have no access"),
        ("org/base@nope", (), {"HF_TOKEN": "hf_bad"}, "BASE org/base has no revision 'nope'"),
        ("org/base", ("--token", "hf_good"), {"HF_TOKEN": "hf_bad"},
         "ADAPTER org/lora was not found on http://127.0.0.1:"),
    ]
    for base, args, env, message in cases:
        hub.clear_log()
        r = merge(hub, hf, tmp_path / "out", *args, base=base, env=env)
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip()
        assert "\n" not in line and line.startswith("error: ") and message in line and "fix:" in line, line
    assert "or it is private and this token has no access" in line and "HF_TOKEN or --token" in line
    # --token won over HF_TOKEN, and opened the gated base (its small files came with it).
    base_files = hub.requests("GET", "/org/base/resolve/")
    assert base_files and {(q.status, q.authorization) for q in base_files} == {(200, "Bearer hf_good")}
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- verify (issue 12.19)


def _flip(path: Path, at: int = -2) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))




def test_verify_reads_a_hub_base_through_the_source(hub, model, tmp_path):
    """Quick verify of shards without a recorded sha256 uses the HF cache and says which shards it could not
    check; --full downloads them (into OUT's download area, removed afterwards); a flipped byte names shard
    and tensor either way. With the recorded digest (every merge now), quick verify reads no input at all."""
    publish(hub, model)
    out, hf = tmp_path / "out", tmp_path / "hf"
    assert merge(hub, hf, out).returncode == 0
    shards = model["shards"]
    hub.clear_log()
    r = cli(hub, hf, "verify", out)
    assert r.returncode == 0 and f"ok: {len(shards)} shards match the record\n" in r.stdout, r.stdout
    assert not hub.requests(path_contains="org/base")  # not even the small files
    forget_digests(out)
    r = cli(hub, hf, "verify", out)
    assert r.returncode == 0, r.stderr
    assert "cannot open" not in r.stderr and "ok: 0 of" not in r.stdout
    assert f"not checked: none of the {len(shards)} shards could be checked" in r.stdout
    assert "not in the HF cache" in r.stdout and "--full" in r.stdout
    assert not any(full_gets(hub, "org/base", s) for s in shards)  # quick mode downloads no shard

    hub.clear_log()
    r = cli(hub, hf, "verify", out, "--full")
    assert r.returncode == 0, r.stderr
    assert f"ok: {len(shards)} shards match the record, {len(shards)} recomputed" in r.stdout
    assert "not checked" not in r.stdout
    assert all(len(full_gets(hub, "org/base", s)) == 1 for s in shards)
    assert not (out / DOWNLOADS).exists()

    _flip(out / shards[1])
    r = cli(hub, hf, "verify", out, "--full")
    assert r.returncode == 1
    assert f"{shards[1]}: tensor '" in r.stderr and "differs from a fresh merge" in r.stderr
    assert not (out / DOWNLOADS).exists()


def test_quick_verify_recomputes_from_the_hf_cache_and_respects_the_device(hub, model, tmp_path):
    publish(hub, model)
    out, hf = tmp_path / "out", tmp_path / "hf"
    assert merge(hub, hf, out, "--keep-downloads").returncode == 0
    shards = model["shards"]
    forget_digests(out)  # an older merge: only recomputing checks its shards
    hub.clear_log()
    r = cli(hub, hf, "verify", out)
    assert r.returncode == 0 and f"{len(shards)} recomputed" in r.stdout and "not checked" not in r.stdout
    assert not any(full_gets(hub, "org/base", s) for s in shards)
    _flip(out / shards[2])
    r = cli(hub, hf, "verify", out)
    assert r.returncode == 1 and f"{shards[2]}: tensor '" in r.stderr

    # a merge recorded on CUDA is not recomputed on the CPU: not comparable, never a mismatch, never ok
    record = json.loads((out / "stream_merge.json").read_text())
    record["options"]["device"] = "cuda"
    (out / "stream_merge.json").write_text(json.dumps(record))
    r = cli(hub, hf, "verify", out)
    assert r.returncode == 0 and "mismatch" not in r.stderr
    assert "not comparable" in r.stdout and "merged on cuda" in r.stdout and "ok: 0 of" not in r.stdout


# ---------------------------------------------------------------------------------------------- bounded waits


def test_a_hub_that_never_answers_ends_in_one_line(model, tmp_path):
    """Issue 14.4: a server that accepts connections and never answers. Every call has a read timeout and the
    retries a budget: one exit-2 line, well before the test's own bound."""
    from hub_faults import silent_server

    with silent_server() as endpoint:
        env = {"STREAM_MERGE_HUB_TIMEOUT": "1"}
        full_env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "HUGGINGFACE_"))}
        full_env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_TELEMETRY="1",
                        HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost", **env)
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "stream_merge", "merge", "org/base", "org/lora", "-o",
                            str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, env=full_env,
                           timeout=120)
        took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot reach the Hub") and "org/base" in line and "Timeout" in line, line
    assert "Traceback" not in r.stderr
    print(f"a silent Hub was given up after {took:.1f} s")


def test_a_range_request_answered_with_a_full_200_reads_only_the_header(hub, model, tmp_path):
    """Issue 12.16: a server (or proxy) that ignores Range: planning stops reading after the header."""
    publish(hub, model)
    hub.ignore_range(lambda m, p: m == "GET" and p.endswith(".safetensors"))
    r = cli(hub, tmp_path / "hf", "plan", "org/base", "org/lora")
    assert r.returncode == 0, r.stderr
    reads = [q for q in hub.requests("GET", "/org/base/resolve/") if q.path.endswith(".safetensors")]
    assert len(reads) == len(model["shards"])
    # a whole-file 200 each, and still one request per shard and a right plan; that the client stops reading
    # after the header is checked in-process (test_hub_http.py: the socket buffers hide it from the server)
    assert all(q.status == 200 and q.faults == ["ignore_range"] for q in reads)
    assert "model.layers.1.mlp.down_proj" in r.stdout


def test_the_card_names_the_hub_base_and_keeps_its_licence(hub, model, tmp_path):
    """Issue 15.5 with a Hub base: base_model is the repo id, its card's licence and text come along."""
    from huggingface_hub import ModelCard

    hub.add_commit("org/lora", {p.name: p for p in model["adapter"].iterdir()})
    readme = b"---\nlicense: apache-2.0\nextra_gated_prompt: Be nice\n---\n# Base\n\nOriginal card text.\n"
    sha = hub.add_commit("org/base", {**{p.name: p for p in model["base"].iterdir()}, "README.md": readme})
    out = tmp_path / "out"
    assert merge(hub, tmp_path / "hf", out, base="org/base@main").returncode == 0
    card = ModelCard((out / "README.md").read_text())
    data = card.data.to_dict()
    assert data["base_model"] == "org/base" and data["base_model_relation"] == "finetune"
    assert data["license"] == "apache-2.0" and data["extra_gated_prompt"] == "Be nice"
    assert f"at revision `{sha}`" in card.text and "Original card text." in card.text
    assert "[`org/lora`](https://huggingface.co/org/lora) at revision `" in card.text
