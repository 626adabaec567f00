"""--max-shard-size: the output re-cut into shards of at most SIZE, the way transformers' save_pretrained cuts
them (huggingface_hub's greedy rule on output byte sizes), every tensor bitwise equal to PEFT's
`merge_and_unload()`; output shards are the unit of resume, --worker, verify and --push-to-hub."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_pair, run_cli
from oracle import _load_merged_model, assert_bitwise_equal, load_folder_tensors, logits, make_adapter, make_base
from stream_merge.errors import ConfigError
from stream_merge.journal import load_journal
from stream_merge.options import file_size
from stream_merge.plan_layout import split_sizes
from stream_merge.synthetic import LlamaShape

INDEX = "model.safetensors.index.json"
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------- helpers


def header_names(path: Path) -> list[str]:
    """A safetensors file's tensor names in its header's JSON order."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        obj = json.loads(f.read(n))
    return [k for k in obj if k != "__metadata__"]


def base_order(base: Path) -> list[str]:
    """Base order: shards by name (the index's files, or model.safetensors), each in header order."""
    index = base / INDEX
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    return [name for f in files for name in header_names(base / f)]


def hub_split(tensors: dict[str, torch.Tensor], order: list[str], max_size: int) -> dict[str, list[str]]:
    """huggingface_hub's own split of the tensors in `order`: file name -> tensor names."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards({k: tensors[k] for k in order}, max_shard_size=max_size,
                                               filename_pattern="model{suffix}.safetensors")
    return {f: list(names) for f, names in split.filename_to_tensors.items()}


def check_layout(out: Path, expected: dict[str, torch.Tensor], order: list[str], max_size: int) -> None:
    """OUT holds exactly the shards huggingface_hub's split names, each with the tensors it assigns; the index
    maps every tensor to its shard with the right total_size; every tensor equals `expected` bitwise."""
    got = load_folder_tensors(out)  # also checks that the index and each shard's header agree
    assert_bitwise_equal(got, expected)
    want = hub_split(got, order, max_size)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == sorted(want), (shards, sorted(want))
    for f, names in want.items():
        assert sorted(header_names(out / f)) == sorted(names), f
        data = sum(got[n].nbytes for n in names)
        assert data <= max_size or len(names) == 1, (f, data)  # only a lone tensor may exceed the maximum
    index = json.loads((out / INDEX).read_text())
    assert index["weight_map"] == {n: f for f, names in want.items() for n in names}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in got.values())


def peft_oracle(base: Path, adapter: Path, out: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    model = _load_merged_model(base, adapter, "auto", None)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out)
    return load_folder_tensors(out)


def merge(base: Path, adapter: Path, out: Path, *extra: object) -> subprocess.CompletedProcess:
    r = run_cli("merge", base, adapter, "-o", out, "--device", "cpu", "--quiet", *extra)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny transformers Llama (BF16) saved in 2 shards and as one file, a PEFT adapter, PEFT's merge."""
    root = tmp_path_factory.mktemp("reshard")
    sharded = make_base(root / "sharded", "llama", torch.bfloat16, shards=2)
    single = make_base(root / "single", "llama", torch.bfloat16, shards=1)
    adapter = make_adapter(sharded, root / "adapter", r=8, lora_alpha=12, target_modules=TARGETS,
                           modules_to_save=["lm_head"])
    peft_oracle(sharded, adapter, root / "oracle")
    return {"root": root, "sharded": sharded, "single": single, "adapter": adapter, "oracle": root / "oracle"}


def _max_for(folder: Path, shards: int) -> int:
    """A --max-shard-size that cuts the checkpoint in `folder` into at least `shards` shards."""
    total = sum(t.nbytes for t in load_folder_tensors(folder).values())
    return total // (shards + 1)


# ---------------------------------------------------------------------------------------------- the split rule


def test_split_matches_huggingface_hub_on_random_sizes() -> None:
    from huggingface_hub.serialization import split_state_dict_into_shards_factory

    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.choice([0, 1, 5, 10, 40, 99, 100, 101, 250]) for _ in range(rng.randint(1, 30))]
        max_size = rng.choice([1, 50, 100, 200, 1000])
        split = split_state_dict_into_shards_factory({f"t{i}": s for i, s in enumerate(sizes)},
                                                     get_storage_size=lambda s: s, max_shard_size=max_size,
                                                     filename_pattern="model{suffix}.safetensors")
        want = [[int(k[1:]) for k in names] for names in split.filename_to_tensors.values()]
        assert split_sizes(sizes, max_size) == want, (sizes, max_size)


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("5GiB", 5 * 2**30), ("500MB", 500 * 10**6),
                                       ("100KB", 100_000), ("2MiB", 2 * 2**20), ("1234", 1234), (4096, 4096),
                                       ("8Mb", 10**6)])
def test_sizes_follow_transformers_grammar(text: object, size: int) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    assert file_size("max_shard_size", text) == size
    if not (isinstance(text, str) and text.isdigit()):  # transformers takes plain bytes as an int only
        assert convert_file_size_to_int(text) == size


@pytest.mark.parametrize("bad", ["0", "0GB", "-5GB", "-1", "5TB", "1.5GB", "GB", "", "lots", 0, -3, True, 2.5])
def test_bad_sizes_are_refused_naming_the_option(bad: object) -> None:
    with pytest.raises(ConfigError, match="max_shard_size"):
        file_size("max_shard_size", bad)


@pytest.mark.parametrize("bad", ["0", "-5GB", "5TB", "abc"])
def test_cli_refuses_a_bad_size_before_creating_out(pair: tuple[Path, Path], tmp_path: Path, bad: str) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    r = run_cli("merge", base, adapter, "-o", out, f"--max-shard-size={bad}")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "max_shard_size" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- PEFT parity


def test_sharded_base_resplit_into_more_shards_matches_peft(llama: dict[str, Path], tmp_path: Path) -> None:
    size = _max_for(llama["oracle"], 4)
    out = tmp_path / "out"
    merge(llama["sharded"], llama["adapter"], out, "--max-shard-size", size)
    expected = load_folder_tensors(llama["oracle"])
    check_layout(out, expected, base_order(llama["sharded"]), size)
    assert len(list(out.glob("model-*-of-*.safetensors"))) >= 4
    assert torch.equal(logits(out, IDS), logits(llama["oracle"], IDS))
    assert run_cli("verify", out, "--full").returncode == 0  # the recorded option rebuilds the same layout


def test_single_file_base_is_split(llama: dict[str, Path], tmp_path: Path) -> None:
    adapter = make_adapter(llama["single"], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS)
    expected = peft_oracle(llama["single"], adapter, tmp_path / "oracle")
    size = _max_for(llama["single"], 3)
    out = tmp_path / "out"
    merge(llama["single"], adapter, out, "--max-shard-size", size)
    check_layout(out, expected, base_order(llama["single"]), size)
    assert len(list(out.glob("*.safetensors"))) >= 3 and not (out / "model.safetensors").exists()
    assert torch.equal(logits(out, IDS), logits(tmp_path / "oracle", IDS))


def test_sharded_base_merged_into_one_file(llama: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    merge(llama["sharded"], llama["adapter"], out, "--max-shard-size", "1GB")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    check_layout(out, load_folder_tensors(llama["oracle"]), base_order(llama["sharded"]), 10**9)
    with open(out / "model.safetensors", "rb") as f:  # what save_pretrained writes
        (n,) = struct.unpack("<Q", f.read(8))
        assert json.loads(f.read(n))["__metadata__"] == {"format": "pt"}
    assert torch.equal(logits(out, IDS), logits(llama["oracle"], IDS))


def test_with_dtype_the_sizes_are_output_sizes(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", "llama", torch.float32, shards=2)
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=12, target_modules=TARGETS)
    expected = peft_oracle(base, adapter, tmp_path / "oracle", torch.bfloat16)
    size = _max_for(tmp_path / "oracle", 3)  # a third of the BF16 output: six shards' worth of the FP32 base
    out = tmp_path / "out"
    merge(base, adapter, out, "--dtype", "bf16", "--max-shard-size", size)
    check_layout(out, expected, base_order(base), size)
    assert torch.equal(logits(out, IDS), logits(tmp_path / "oracle", IDS))


def test_an_untied_head_goes_where_the_split_puts_it(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", "llama", torch.bfloat16, shards=2, tie_word_embeddings=True)
    adapter = make_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    size = _max_for(base, 3)
    out = tmp_path / "out"
    merge(base, adapter, out, "--untie", "--max-shard-size", size)
    got = load_folder_tensors(out)
    assert "lm_head.weight" in got and "model.embed_tokens.weight" in got
    order = base_order(base)
    # the added head follows the shard holding its source (embed_tokens) in base order
    files = sorted(set(json.loads((base / INDEX).read_text())["weight_map"].values()))
    holder = json.loads((base / INDEX).read_text())["weight_map"]["model.embed_tokens.weight"]
    last_of_holder = max(i for i, n in enumerate(order) if n in header_names(base / holder))
    order.insert(last_of_holder + 1, "lm_head.weight")
    assert len(files) >= 2  # a sharded base
    plain = tmp_path / "plain"  # the same merge in the base's layout (its untie values are tested elsewhere)
    merge(base, adapter, plain, "--untie")
    check_layout(out, load_folder_tensors(plain), order, size)


# ---------------------------------------------------------------------------------------------- resume, workers


def test_a_changed_size_on_resume_is_refused_and_fresh_restarts_clean(llama: dict[str, Path], tmp_path: Path
                                                                      ) -> None:
    base, adapter, out = llama["sharded"], llama["adapter"], tmp_path / "out"
    small = _max_for(llama["oracle"], 4)
    merge(base, adapter, out, "--max-shard-size", small)
    before = sorted(p.name for p in out.glob("*.safetensors"))
    r = run_cli("merge", base, adapter, "-o", out, "--max-shard-size", "1GB")
    assert r.returncode == 2 and "other inputs or options" in r.stderr, r.stderr
    assert sorted(p.name for p in out.glob("*.safetensors")) == before  # nothing touched
    r = run_cli("merge", base, adapter, "-o", out)  # nor without the option (the base's own layout)
    assert r.returncode == 2 and "other inputs or options" in r.stderr, r.stderr
    merge(base, adapter, out, "--max-shard-size", "1GB", "--fresh")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]  # no old shard left
    assert_bitwise_equal(load_folder_tensors(out), load_folder_tensors(llama["oracle"]))


SHAPE = LlamaShape(hidden=384, intermediate=1024, layers=8, vocab=2048, heads=8, kv_heads=4)  # ~29 MB BF16


def _journaled(out: Path) -> dict:
    try:
        journal = load_journal(out)
    except (OSError, ValueError, KeyError):
        return {}
    return journal.shards if journal else {}


def test_resume_after_a_kill_redoes_no_finished_output_shard(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path, SHAPE, shard_bytes=12_000_000)  # 3 base shards, cut into ~10
    args = ["merge", base, adapter, "--device", "cpu", "--block-size-mb", "1", "--max-shard-size", "3MB"]
    ref = tmp_path / "ref"
    assert run_cli(*args, "-o", ref, "--quiet").returncode == 0
    shards = sorted(p.name for p in ref.glob("*.safetensors"))
    assert len(shards) >= 8
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "stream_merge", *map(str, args), "-o", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while len(_journaled(out)) < 2 and proc.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the merge finished before it could be killed"
    finished = {f: (out / f).stat() for f in _journaled(out)}
    assert 2 <= len(finished) < len(shards) and not (out / INDEX).exists()
    r = run_cli(*args, "-o", out)
    assert r.returncode == 0, r.stderr
    assert f"({len(finished)} resumed)" in r.stdout, r.stdout
    for f, st in finished.items():  # not rewritten
        now = (out / f).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f
    for f in [*shards, INDEX]:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f


def test_workers_split_by_output_shard_and_finalize(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path, shard_bytes=6000)
    args = ["merge", base, adapter, "--device", "cpu", "--max-shard-size", "4KB", "--quiet"]
    ref = tmp_path / "ref"
    assert run_cli(*args, "-o", ref).returncode == 0
    shards = sorted(p.name for p in ref.glob("*.safetensors"))
    assert len(shards) >= 4 and all(s.startswith("model-") for s in shards)
    out = tmp_path / "out"
    r0 = run_cli(*args, "-o", out, "--worker", "0/2")
    assert r0.returncode == 0, r0.stderr
    mine = sorted(p.name for p in out.glob("*.safetensors"))
    assert 0 < len(mine) < len(shards) and not (out / INDEX).exists()
    r1 = run_cli(*args, "-o", out, "--worker", "1/2")
    assert r1.returncode == 0, r1.stderr
    r = run_cli("finalize", out)
    assert r.returncode == 0, r.stderr
    for f in [*shards, INDEX]:
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f
    assert run_cli("verify", out, "--full").returncode == 0


# ---------------------------------------------------------------------------------------------- the Hub


def _hub_cli(hub, tmp_path: Path, *args: object) -> subprocess.CompletedProcess:
    from hub_server import hub_env

    return subprocess.run([sys.executable, "-m", "stream_merge", *map(str, args)], capture_output=True, text=True,
                          env=hub_env(hub, tmp_path / "hf"), cwd=tmp_path, timeout=300)


@pytest.mark.hub
def test_push_uploads_each_output_shard_and_the_index_last(hub, tmp_path: Path) -> None:
    import hashlib

    base, adapter = make_pair(tmp_path, shard_bytes=6000)
    out = tmp_path / "out"
    r = _hub_cli(hub, tmp_path, "merge", base, adapter, "-o", out, "--device", "cpu", "--quiet",
                 "--max-shard-size", "4KB", "--push-to-hub", "org/merged", "--token", "hf_push")
    assert r.returncode == 0, r.stderr
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 4 and all(s.startswith("model-") for s in shards)
    repo = hub.get_repo("org/merged")
    head = repo.commits[repo.branches["main"]]
    assert {s: head.files[s].sha256 for s in shards} == {
        s: hashlib.sha256((out / s).read_bytes()).hexdigest() for s in shards}
    assert head.files[INDEX].read() == (out / INDEX).read_bytes()
    assert INDEX not in repo.commits[head.parent].files  # the index came last
    assert not [f for f in head.files if f.endswith(".safetensors") and f not in shards]


@pytest.mark.hub
def test_hub_base_inputs_are_fetched_once_and_released(hub, tmp_path: Path) -> None:
    from stream_merge.synthetic import write_adapter, write_checkpoint

    shape = LlamaShape(hidden=128, intermediate=256, layers=3, vocab=512, heads=4, kv_heads=2)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base_shards = write_checkpoint(base, shape, max_shard_bytes=200_000)
    write_adapter(adapter, shape, r=4, alpha=8.0, base_name="org/base")
    hub.add_commit("org/lora", {p.name: p for p in adapter.iterdir()})
    hub.add_commit("org/base", {p.name: p for p in base.iterdir()})
    for size in ("150KB", "450KB"):  # output shards that split base shards, and ones that join them
        ref, out = tmp_path / f"ref-{size}", tmp_path / f"out-{size}"
        merge(base, adapter, ref, "--max-shard-size", size)
        hub.clear_log()
        r = _hub_cli(hub, tmp_path, "merge", "org/base", "org/lora", "-o", out, "--device", "cpu", "--quiet",
                     "--max-shard-size", size)
        assert r.returncode == 0, r.stderr
        outputs = sorted(p.name for p in ref.glob("*.safetensors"))
        assert sorted(p.name for p in out.glob("*.safetensors")) == outputs and len(outputs) != len(base_shards)
        for f in [*outputs, INDEX]:
            assert (out / f).read_bytes() == (ref / f).read_bytes(), f
        _each_base_shard_fetched_once(hub, base_shards)
        assert not (out / ".stream-merge-downloads").exists() or not any(
            (out / ".stream-merge-downloads").rglob("*.safetensors"))
        hub.clear_log()  # verify --full recomputes from the Hub: the same inputs, fetched once too
        r = _hub_cli(hub, tmp_path, "verify", out, "--full")
        assert r.returncode == 0 and "recomputed" in r.stdout, r.stdout + r.stderr
        _each_base_shard_fetched_once(hub, base_shards)


def _each_base_shard_fetched_once(hub, base_shards: list[str]) -> None:  # type: ignore[no-untyped-def]
    for s in base_shards:  # each input downloaded once, though several output shards read it
        gets = [q for q in hub.requests("GET", "/org/base/resolve/") if q.path.endswith("/" + s) and q.range is None]
        assert len(gets) == 1, (s, len(gets))


# ---------------------------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_memcheck_measures_a_resharded_merge(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "memcheck.py"
    out = tmp_path / "mem.json"
    p = subprocess.run([sys.executable, str(script), "--size", "8MB", "--shard-size", "3MB", "--hidden", "128",
                        "--intermediate", "344", "--vocab", "512", "--max-shard-size", "1MB",
                        "--workdir", str(tmp_path / "work"), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr + p.stdout
    run = json.loads(out.read_text())["runs"]["S,M"]
    assert "--max-shard-size 1MB" in run["command"] and run["out_shards"] > run["shards"]
    assert 0 < run["peak_rss_mib"] < 700 and "re-sharded into" in p.stdout


# ---------------------------------------------------------------------------------------------- pickle bases


def test_a_pickle_base_is_written_under_safetensors_names(tmp_path: Path) -> None:
    """A `pytorch_model.bin` base: its output is `model.safetensors` (transformers' name), equal to the merge
    of the same weights saved as safetensors; with --max-shard-size the same layout as that merge's."""
    from conftest import folder_tensors
    from safetensors.torch import load_file

    base, adapter = make_pair(tmp_path, shard_bytes=6000)
    binbase = tmp_path / "binbase"
    binbase.mkdir()
    index = json.loads((base / INDEX).read_text())
    shards = {f: load_file(str(base / f)) for f in sorted(set(index["weight_map"].values()))}
    state = {k: shards[f][k] for f in shards for k in header_names(base / f)}  # base order
    torch.save(state, binbase / "pytorch_model.bin")
    (binbase / "config.json").write_bytes((base / "config.json").read_bytes())
    for extra in ((), ("--max-shard-size", "10KB")):
        ref, out = tmp_path / f"ref{len(extra)}", tmp_path / f"out{len(extra)}"
        merge(base, adapter, ref, *extra)
        merge(binbase, adapter, out, "--allow-pickle", *extra)
        names = sorted(p.name for p in out.glob("*.safetensors"))
        assert names == (["model.safetensors"] if not extra else sorted(p.name for p in ref.glob("*.safetensors")))
        assert_bitwise_equal(folder_tensors(out), folder_tensors(ref))
        assert run_cli("verify", out, "--full").returncode == 0
