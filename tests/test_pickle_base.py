"""PyTorch pickle (.bin) bases with --allow-pickle (issue 15 item 8).

The parser (`pickle_io`) is checked against torch.load byte for byte; bad files are refused by name without
running anything; merges of a .bin base (single and sharded, tied and untied, local and from the Hub) equal
what PEFT + transformers produce from the same .bin base, saved as safetensors."""

from __future__ import annotations

import collections
import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import make_pair, run_cli
from stream_merge.checkpoint import read_index
from stream_merge.errors import CheckpointFormatError, InputError
from stream_merge.pickle_io import read_pickle_file, read_pickle_header

PICKLE_INDEX = "pytorch_model.bin.index.json"


def _state() -> collections.OrderedDict[str, torch.Tensor]:
    """Every dtype a state dict holds, a 0-d and an empty tensor, a view at an offset, a Parameter, a tie."""
    gen = torch.Generator().manual_seed(0)
    sd: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    sd["embed.weight"] = torch.randn(16, 8, generator=gen)
    for dtype in (torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
                  torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2):
        sd[f"t.{str(dtype)[6:]}"] = (torch.randn(3, 5, generator=gen) * 4).to(dtype)
    sd["t.uint16"] = torch.arange(7).to(torch.uint16)
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros(0, 4)
    sd["view"] = torch.randn(20, generator=gen).to(torch.bfloat16)[3:13].view(2, 5)  # storage offset 3
    sd["param"] = torch.nn.Parameter(torch.randn(4, 4, generator=gen))
    sd["head.weight"] = sd["embed.weight"]  # a tie: one storage, two names
    return sd


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_parser_matches_torch_load_for_every_tensor(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    state = _state()
    state["big"] = torch.zeros(1 << 20)  # 4 MiB that a header read must not fetch
    torch.save(state, path)
    header = read_pickle_file(path, path.name)
    loaded = torch.load(path, weights_only=True, mmap=True)
    data = path.read_bytes()
    assert [t.name for t in header.tensors] == list(loaded)
    assert header.data_offset == 0 and not header.safetensors and header.size == len(data)
    for t in header.tensors:
        ref = loaded[t.name]
        assert data[t.start:t.end] == _raw(ref), t.name
        assert t.shape == tuple(ref.shape)
    by = header.by_name
    assert (by["head.weight"].start, by["head.weight"].end) == (by["embed.weight"].start, by["embed.weight"].end)
    # the same parse over range reads (what the Hub source does), counting the bytes it fetched
    fetched = []

    def read(start: int, end: int) -> bytes:
        fetched.append(end - start)
        return data[start:end]

    assert read_pickle_header(read, len(data), path.name) == header
    assert sum(fetched) < len(data) // 10  # the directory, data.pkl and local headers, not the tensors


def test_legacy_format_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFormatError, match="legacy torch.save format") as err:
        read_pickle_file(path, path.name)
    assert "torch>=1.6" in err.value.one_line() and "pytorch_model.bin" in err.value.one_line()


def test_non_contiguous_tensor_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"ok": torch.ones(3, 4), "bad.weight": torch.randn(3, 4).t()}, path)
    with pytest.raises(CheckpointFormatError, match="not contiguous") as err:
        read_pickle_file(path, path.name)
    assert "bad.weight" in err.value.one_line() and ".contiguous()" in err.value.one_line()
    torch.save({"ok": torch.ones(3, 4), "col": torch.randn(3, 1).t()}, path)  # size-1 dims: still contiguous
    assert [t.shape for t in read_pickle_file(path, path.name).tensors] == [(3, 4), (1, 3)]


class _Hostile:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, ("touch PWNED",))


def _rewrite(src: Path, dst: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Copy a torch.save zip member by member; `change(name, bytes) -> (bytes, compress_type)`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data, kind = change(info.filename, zin.read(info))
            zout.writestr(zipfile.ZipInfo(info.filename), data, compress_type=kind)


def test_hostile_pickle_is_refused_without_running_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(2)}, good)
    evil = tmp_path / "pytorch_model.bin"
    payload = pickle.dumps({"w": _Hostile()}, protocol=2)
    _rewrite(good, evil, lambda n, d: (payload if n.endswith("data.pkl") else d, zipfile.ZIP_STORED))
    with pytest.raises(CheckpointFormatError, match=r"calls (posix|os)\.system") as err:
        read_pickle_file(evil, evil.name)
    assert "pytorch_model.bin" in err.value.one_line()
    (tmp_path / "adapter").mkdir()
    r = run_cli("merge", tmp_path, tmp_path / "adapter", "-o", tmp_path / "out", "--allow-pickle")
    assert r.returncode == 2 and "system" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["big-endian", "compressed", "short storage", "no data.pkl", "training checkpoint"])
def test_malformed_archives_are_refused_by_name(tmp_path: Path, what: str) -> None:
    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(64)} if what != "training checkpoint" else {"model": {"w": torch.ones(2)},
                                                                           "step": 3}, good)
    bad = tmp_path / "pytorch_model.bin"

    def change(name: str, data: bytes) -> tuple[bytes, int]:
        if what == "big-endian" and name.endswith("/byteorder"):
            return b"big", zipfile.ZIP_STORED
        if what == "compressed" and "/data/" in name:
            return data, zipfile.ZIP_DEFLATED
        if what == "short storage" and "/data/" in name:
            return data[:100], zipfile.ZIP_STORED
        if what == "no data.pkl" and name.endswith("data.pkl"):
            return data, zipfile.ZIP_STORED
        return data, zipfile.ZIP_STORED

    if what == "no data.pkl":
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("archive/other.pkl", b"x")
    else:
        _rewrite(good, bad, change)
    words = {"big-endian": "'big'-endian", "compressed": "compressed", "short storage": "fewer than the tensor",
             "no data.pkl": "data.pkl", "training checkpoint": "not a tensor"}[what]
    with pytest.raises(CheckpointFormatError, match=words) as err:
        read_pickle_file(bad, bad.name)
    assert "pytorch_model.bin" in err.value.one_line() and "Traceback" not in err.value.one_line()


@pytest.mark.parametrize("keep", [0, 1000, -200, -22])
def test_truncated_bin_is_refused_naming_the_file(tmp_path: Path, keep: int) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(CheckpointFormatError) as err:
        read_pickle_file(path, path.name)
    assert "pytorch_model.bin" in err.value.one_line()


# ---------------------------------------------------------------------------------------------- real models


def make_bin_base(folder: Path, shards: int = 1, tie: bool = False) -> Path:
    """A tiny random Llama saved as transformers 4 did with safe_serialization=False: `pytorch_model.bin`, or
    `pytorch_model-0000i-of-0000n.bin` + `pytorch_model.bin.index.json` (tensors sharing a storage, a tie,
    stay in one shard). transformers 5 writes no .bin, so the state dict goes through torch.save here."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from oracle import FAMILIES, _randomize

    cfg = AutoConfig.for_model("llama", **{**FAMILIES["llama"], "tie_word_embeddings": tie})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(model, 0)
    model = model.to(torch.bfloat16).eval()
    model.config.dtype = torch.bfloat16  # what save_pretrained records: from_pretrained(dtype="auto") reads it
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    GenerationConfig.from_model_config(model.config).save_pretrained(folder)
    state = model.state_dict()
    assert ("lm_head.weight" in state) and (state["lm_head.weight"].data_ptr()
                                            == state["model.embed_tokens.weight"].data_ptr()) == tie
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    files = [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
    wmap = {n: files[i % shards] for i, names in enumerate(groups.values()) for n in names}
    for f in files:
        torch.save({k: v for k, v in state.items() if wmap[k] == f}, folder / f)
    total = sum(t.nbytes for k, t in state.items() if not (tie and k == "lm_head.weight"))
    (folder / PICKLE_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2))
    return folder


def bin_copy(src: Path, dst: Path) -> Path:
    """A safetensors checkpoint folder re-saved with torch.save, as transformers 4 named .bin checkpoints."""
    from safetensors.torch import load_file

    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.suffix != ".safetensors" and p.name != "model.safetensors.index.json":
            (dst / p.name).write_bytes(p.read_bytes())
    index = src / "model.safetensors.index.json"
    if not index.exists():
        torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
        return dst
    obj = json.loads(index.read_text())
    shards = sorted(set(obj["weight_map"].values()))
    names = {s: f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin" for i, s in enumerate(shards)}
    for s in shards:
        torch.save(load_file(str(src / s)), dst / names[s])
    obj["weight_map"] = {k: names[v] for k, v in obj["weight_map"].items()}
    (dst / PICKLE_INDEX).write_text(json.dumps(obj))
    return dst


def test_a_bin_base_needs_allow_pickle_and_says_why(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    pbase = bin_copy(base, tmp_path / "pbase")
    out = tmp_path / "out"
    r = run_cli("merge", pbase, adapter, "-o", out)
    assert r.returncode == 2 and not out.exists(), r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert PICKLE_INDEX in line and "--allow-pickle" in line and "run code" in line and "Traceback" not in r.stderr
    with pytest.raises(InputError, match="allow-pickle"):
        read_index(pbase)
    index = read_index(pbase, allow_pickle=True)
    assert [h.file for h in index.shards] == sorted(set(json.loads((pbase / PICKLE_INDEX).read_text())
                                                        ["weight_map"].values()))
    assert [h.output_name for h in index.shards] == sorted(set(json.loads(
        (base / "model.safetensors.index.json").read_text())["weight_map"].values()))
    single = tmp_path / "single"
    single.mkdir()
    torch.save({"w": torch.ones(2)}, single / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"pytorch_model\.bin.*--allow-pickle|--allow-pickle.*pytorch_model\.bin"):
        read_index(single)
    assert read_index(single, allow_pickle=True).shards[0].output_name == "model.safetensors"


def test_safetensors_are_preferred_when_a_folder_has_both(tmp_path: Path) -> None:
    base, _ = make_pair(tmp_path)
    pbase = bin_copy(base, tmp_path / "both")
    for p in base.glob("*.safetensors*"):
        (pbase / p.name).write_bytes(p.read_bytes())
    index = read_index(pbase)  # no flag needed: the .bin files are not read
    assert all(h.safetensors and h.file.endswith(".safetensors") for h in index.shards)


def test_tied_copies_are_dropped_only_when_the_config_ties_them(tmp_path: Path) -> None:
    folder = tmp_path / "tied"
    folder.mkdir()
    emb = torch.randn(64, 32)
    torch.save({"model.embed_tokens.weight": emb, "model.norm.weight": torch.ones(32), "lm_head.weight": emb},
               folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "vocab_size": 64, "tie_word_embeddings": True}))
    index = read_index(folder, allow_pickle=True)
    assert sorted(index.tensors) == ["model.embed_tokens.weight", "model.norm.weight"]
    assert sorted(index.weight_map) == sorted(index.tensors)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                    "vocab_size": 64, "tie_word_embeddings": False}))
    assert sorted(read_index(folder, allow_pickle=True).tensors) == ["lm_head.weight", "model.embed_tokens.weight",
                                                                     "model.norm.weight"]


def test_shards_that_would_share_an_output_name_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "clash"
    folder.mkdir()
    torch.save({"a": torch.ones(2)}, folder / "pytorch_model-1.bin")
    torch.save({"b": torch.ones(2)}, folder / "model-1.bin")
    (folder / PICKLE_INDEX).write_text(json.dumps({"weight_map": {"a": "pytorch_model-1.bin", "b": "model-1.bin"}}))
    with pytest.raises(CheckpointFormatError, match="model-1.safetensors"):
        read_index(folder, allow_pickle=True)


def _merge(base: Path, adapter: Path, out: Path, *extra: object) -> None:
    r = run_cli("merge", base, adapter, "-o", out, "--device", "cpu", "--quiet", "--allow-pickle", *extra)
    assert r.returncode == 0, r.stderr


def _out_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin") or "index" in p.name)


@pytest.mark.parametrize("shard_bytes", [6000, 10**9], ids=["sharded", "single"])
def test_a_bin_base_merges_like_its_safetensors_twin(tmp_path: Path, shard_bytes: int) -> None:
    from oracle import assert_bitwise_equal, load_folder_tensors

    base, adapter = make_pair(tmp_path, shard_bytes=shard_bytes)
    pbase = bin_copy(base, tmp_path / "pbase")
    _merge(base, adapter, tmp_path / "ref")
    _merge(pbase, adapter, tmp_path / "out")
    assert _out_files(tmp_path / "out") == _out_files(tmp_path / "ref")  # transformers' safetensors names
    assert "pytorch_model.bin.index.json" not in _out_files(tmp_path / "out")
    assert_bitwise_equal(load_folder_tensors(tmp_path / "out"), load_folder_tensors(tmp_path / "ref"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index == json.loads((tmp_path / "ref" / "model.safetensors.index.json").read_text())
    assert run_cli("verify", tmp_path / "out", "--full").returncode == 0


@pytest.mark.parametrize("shards,tie", [(1, False), (3, False), (3, True)], ids=["single", "sharded", "tied"])
def test_bin_base_matches_peft_and_transformers(tmp_path: Path, shards: int, tie: bool) -> None:
    """transformers loads the .bin base, PEFT merges, save_pretrained writes safetensors: same names, same
    bytes, same logits. A tied base keeps one tensor for the tie (transformers drops lm_head.weight)."""
    from oracle import _load_merged_model, assert_bitwise_equal, load_folder_tensors, logits, make_adapter

    base = make_bin_base(tmp_path / "base", shards=shards, tie=tie)
    targets = ["q_proj", "v_proj", "down_proj"] + ([] if tie else ["embed_tokens", "lm_head"])
    adapter = make_adapter(base, tmp_path / "adapter", r=8, lora_alpha=12, target_modules=targets)
    oracle = tmp_path / "oracle"
    _load_merged_model(base, adapter, "auto", None).save_pretrained(oracle)
    out = tmp_path / "out"
    _merge(base, adapter, out)
    got, want = load_folder_tensors(out), load_folder_tensors(oracle)
    assert got.keys() == want.keys() and ("lm_head.weight" in got) != tie
    assert_bitwise_equal(got, want)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(out, ids), logits(oracle, ids))
    expected = ["model.safetensors"] if shards == 1 else [f"model-{i:05d}-of-{shards:05d}.safetensors"
                                                          for i in range(1, shards + 1)]
    assert [n for n in _out_files(out) if n.endswith(".safetensors")] == expected


def test_an_interrupted_bin_merge_resumes(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    from oracle import assert_bitwise_equal, load_folder_tensors
    from stream_merge.journal import SHARDS_DIR
    from stream_merge.synthetic import LlamaShape

    shape = LlamaShape(hidden=256, intermediate=768, layers=6, vocab=1024, heads=8, kv_heads=4)
    base, adapter = make_pair(tmp_path, shape=shape, shard_bytes=1_500_000)
    pbase = bin_copy(base, tmp_path / "pbase")
    _merge(base, adapter, tmp_path / "ref")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "stream_merge", "merge", str(pbase), str(adapter), "-o", str(out), "--device",
            "cpu", "--quiet", "--allow-pickle", "--block-size-mb", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def recorded() -> bool:  # a shard is published and its journal record written (not its temp file)
        return any(not p.name.startswith(".") for p in (out / SHARDS_DIR).glob("*.json"))

    while proc.poll() is None and not recorded():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed after its first shard, before the last
    assert not (out / "model.safetensors.index.json").exists()
    r = run_cli("merge", pbase, adapter, "-o", out, "--device", "cpu", "--allow-pickle")
    assert r.returncode == 0, r.stderr
    assert "resumed)" in r.stdout and "(0 resumed)" not in r.stdout, r.stdout
    assert_bitwise_equal(load_folder_tensors(out), load_folder_tensors(tmp_path / "ref"))


@pytest.mark.hub
def test_a_hub_base_of_bin_shards_merges(tmp_path: Path, hub) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from hub_server import hub_env

    base, adapter = make_pair(tmp_path, shard_bytes=6000)
    pbase = bin_copy(base, tmp_path / "pbase")
    _merge(pbase, adapter, tmp_path / "ref")  # the same .bin base, local
    hub.add_commit("org/lora", {p.name: p for p in adapter.iterdir()})
    hub.add_commit("org/base", {p.name: p for p in pbase.iterdir()})
    out = tmp_path / "out"

    def cli(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "stream_merge", *map(str, args)], capture_output=True,
                              text=True, env=hub_env(hub, tmp_path / "hf"), cwd=tmp_path, timeout=300)

    refused = cli("merge", "org/base", "org/lora", "-o", out, "--device", "cpu")
    assert refused.returncode == 2 and "--allow-pickle" in refused.stderr and not out.exists(), refused.stderr
    assert not [q for q in hub.requests("GET", "/org/base/resolve/") if q.path.endswith(".bin")]
    r = cli("merge", "org/base", "org/lora", "-o", out, "--device", "cpu", "--quiet", "--allow-pickle")
    assert r.returncode == 0, r.stderr
    assert _out_files(out) == _out_files(tmp_path / "ref")
    for name in _out_files(out):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    # headers were read by range requests before any .bin was downloaded whole
    gets = [q for q in hub.requests("GET", "/org/base/resolve/") if q.path.endswith(".bin")]
    first_full = next(i for i, q in enumerate(gets) if q.range is None)
    assert all(q.range is not None for q in gets[:first_full]) and first_full >= len(list(pbase.glob("*.bin")))


@pytest.mark.slow
def test_memcheck_pickle_tiny(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "mem.json"
    script = Path(__file__).resolve().parent.parent / "scripts" / "memcheck.py"
    p = subprocess.run([sys.executable, str(script), "--pickle", "--size", "8MB", "--shard-size", "3MB", "--hidden",
                        "128", "--intermediate", "344", "--vocab", "512", "--workdir", tmp_path / "work", "--json",
                        out], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr + p.stdout
    run = json.loads(out.read_text())["runs"]["S,M"]
    assert run["format"] == "pickle (.bin)" and "--allow-pickle" in run["command"]
    assert 0 < run["largest_shard_bytes"] <= 3_000_000 < run["base_bytes"] and run["peak_rss_mib"] > 0


def test_a_pickle_that_rewrites_a_tensor_record_is_refused(tmp_path: Path) -> None:
    """BUILD can set fields of any object the pickle made, bypassing frozen dataclasses: checked after loading."""
    good = tmp_path / "good.bin"
    torch.save({"w": torch.ones(2)}, good)
    with zipfile.ZipFile(good) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    import pickletools

    # after the last REDUCE (the one that builds the tensor record): {"offset": "xx"} BUILD
    at = max(pos for op, _, pos in pickletools.genops(pkl) if op.name == "REDUCE")
    evil_pkl = pkl[:at + 1] + b"}" + pickle.dumps("offset", 2)[2:-1] + pickle.dumps("xx", 2)[2:-1] + b"sb" + pkl[at + 1:]
    evil = tmp_path / "pytorch_model.bin"
    _rewrite(good, evil, lambda n, d: (evil_pkl if n.endswith("data.pkl") else d, zipfile.ZIP_STORED))
    with pytest.raises(CheckpointFormatError, match="malformed") as err:
        read_pickle_file(evil, evil.name)
    assert "tensor 'w'" in err.value.one_line() or "'w'" in err.value.one_line(), err.value.one_line()
