"""Fault tests: every bad input, run through the real CLI, is refused cleanly.

For each case: exit code 2; stderr is exactly one line starting with "error:" that names the culprit file,
tensor or key (multi-problem plan errors: one summary line plus one "  - " line per problem); no traceback;
no `model.safetensors.index.json` in OUT; the inputs byte-identical afterwards.

Every case starts from a fresh `make_pair` in its own folder and corrupts one thing. The CLI runs (one
`python -m stream_merge` process each, dominated by importing torch) are launched together, a few at a time,
by the module fixture `outcomes`; each parametrized test then checks its own case.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import edit_json, folder_tensors, make_pair, rewrite_adapter, run_cli

from stream_merge.synthetic import LlamaShape, write_adapter

INDEX = "model.safetensors.index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MULTI_HEAD = re.compile(r"^error: the merge plan has (\d+) problems; nothing was written:$")


# ----------------------------------------------------------------------------------------------------------------
# helpers: snapshots, raw safetensors surgery


def snapshot(root: Path, exclude: Path | None = None) -> dict[str, str]:
    """relative path -> sha256 / 'dir' / 'link:TARGET' for everything under root (hidden files included),
    skipping the path `exclude`."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n != exclude]
        for name in dirnames + [n for n in filenames if d / n != exclude]:
            p = d / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def shard_names(base: Path) -> list[str]:
    wm = json.loads((base / INDEX).read_text())["weight_map"]
    return sorted(set(wm.values()))


def st_read(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's header (in file order, `__metadata__` included) and its data section."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _pickle_lookalike(n: int) -> bool:
    # A header length whose first two bytes read 0x80, 0x02..0x05 looks like pickle magic; keep our hand-made
    # headers clear of that so that each case fails for the reason it is about (see
    # test_valid_shard_whose_header_length_looks_like_pickle_magic).
    return (n & 0xFF) == 0x80 and 2 <= (n >> 8) & 0xFF <= 5


def st_write(path: Path, header: dict | str, data: bytes, pad_to: int | None = None) -> None:
    """Write a safetensors file by hand: `header` is a dict or raw JSON text (written as is)."""
    raw = (header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))).encode()
    raw += b" " * (-len(raw) % 8)
    if pad_to is not None:
        assert pad_to >= len(raw) and pad_to % 8 == 0
        raw += b" " * (pad_to - len(raw))
    else:
        while _pickle_lookalike(len(raw)):
            raw += b" " * 8
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def tensors_by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def edit_index(base: Path, mutate: Callable[[dict], None]) -> None:
    obj = json.loads((base / INDEX).read_text())
    mutate(obj["weight_map"])
    (base / INDEX).write_text(json.dumps(obj, indent=2))


def lora_key(module: str, half: str) -> str:
    return f"base_model.model.{module}.lora_{half}.weight"


# ----------------------------------------------------------------------------------------------------------------
# the cases


@dataclass
class Case:
    root: Path
    out: Path
    culprits: tuple[str, ...]
    argv: tuple[str, ...] = ()       # default: merge BASE ADAPTER -o OUT
    problems: int | None = None      # None: exactly one line; N: the multi-problem format with N problems
    any_format: bool = False         # either of the two formats (several equivalent ways to report it)
    out_created_ok: bool = False     # the failure is found while merging, so OUT may hold partial shards
    stdout_contains: tuple[str, ...] = ()
    diagnosis: str = ""              # the multi-problem format's diagnosis line, first (another model's adapter)


def _merge(base: Path, adapter: Path, out: Path, *extra: str) -> tuple[str, ...]:
    # --quiet: no progress lines, so that a run refused mid-merge has its one error line as all of stderr
    return ("merge", str(base), str(adapter), "-o", str(out), "--quiet", *extra)


def _std(root: Path, culprits: tuple[str, ...], **kw) -> Case:
    return Case(root=root, out=root / "out", culprits=culprits,
                argv=_merge(root / "base", root / "adapter", root / "out"), **kw)


def _target_shard(root: Path) -> Path:
    base, _ = make_pair(root)
    return base / shard_names(base)[2]


# -- base shards ---------------------------------------------------------------------------------------------------

def c_truncated_in_data(root: Path) -> Case:
    f = _target_shard(root)
    raw = f.read_bytes()
    f.write_bytes(raw[:-37])
    return _std(root, (f.name,))


def c_truncated_in_header(root: Path) -> Case:
    f = _target_shard(root)
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    f.write_bytes(raw[:8 + n // 2])
    return _std(root, (f.name,))


def c_truncated_to_5_bytes(root: Path) -> Case:
    f = _target_shard(root)
    f.write_bytes(f.read_bytes()[:5])
    return _std(root, (f.name,))


def c_zero_filled(root: Path) -> Case:
    f = _target_shard(root)
    f.write_bytes(bytes(f.stat().st_size))
    return _std(root, (f.name,))


def c_lfs_pointer(root: Path) -> Case:
    f = _target_shard(root)
    digest, size = hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_size
    f.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{digest}\nsize {size}\n")
    return _std(root, (f.name, "LFS"))


def c_trailing_bytes(root: Path) -> Case:
    f = _target_shard(root)
    with open(f, "ab") as fh:
        fh.write(b"\x00" * 16)
    return _std(root, (f.name,))


def c_overlapping_offsets(root: Path) -> Case:
    f = _target_shard(root)
    hdr, data = st_read(f)
    last = tensors_by_offset(hdr)[-1]
    s, e = hdr[last]["data_offsets"]
    hdr[last]["data_offsets"] = [s - 4, e - 4]  # same length, starts inside the previous tensor
    st_write(f, hdr, data[:-4])
    return _std(root, (f.name, last))


def c_gapped_offsets(root: Path) -> Case:
    f = _target_shard(root)
    hdr, data = st_read(f)
    last = tensors_by_offset(hdr)[-1]
    s, e = hdr[last]["data_offsets"]
    hdr[last]["data_offsets"] = [s + 8, e + 8]  # 8 unaccounted bytes before the last tensor
    st_write(f, hdr, data[:s] + b"\x00" * 8 + data[s:])
    return _std(root, (f.name, last))


def c_duplicate_tensor_name(root: Path) -> Case:
    f = _target_shard(root)
    hdr, data = st_read(f)
    first = tensors_by_offset(hdr)[0]
    text = json.dumps(hdr, separators=(",", ":"))
    dup = json.dumps(first) + ":" + json.dumps(hdr[first], separators=(",", ":"))
    st_write(f, "{" + dup + "," + text[1:], data)  # the same name twice, hand-written JSON
    return _std(root, (f.name, first))


def _control_char_case(char: str) -> Callable[[Path], Case]:
    def build(root: Path) -> Case:
        f = _target_shard(root)
        base = f.parent
        hdr, data = st_read(f)
        # rename a tensor the adapter never touches, so an engine that lets the name through merges "fine"
        old = next(k for k in tensors_by_offset(hdr) if len(hdr[k]["shape"]) == 1)
        head, _, leaf = old.rpartition(".")
        new = f"{head}{char}x.{leaf}"
        hdr = {(new if k == old else k): v for k, v in hdr.items()}
        st_write(f, hdr, data)

        def mutate(wm: dict) -> None:  # rename in the index too, so only the name itself is wrong
            wm[new] = wm.pop(old)
        edit_index(base, mutate)
        return _std(root, (f.name,))
    return build


def c_offsets_do_not_fit_shape(root: Path) -> Case:
    f = _target_shard(root)
    hdr, data = st_read(f)
    first = tensors_by_offset(hdr)[0]
    hdr[first]["shape"] = [hdr[first]["shape"][0] + 1, *hdr[first]["shape"][1:]]
    st_write(f, hdr, data)
    return _std(root, (f.name, first))


def c_garbage_header(root: Path) -> Case:
    f = _target_shard(root)
    _, data = st_read(f)
    st_write(f, '{"model.x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]', data)  # no closing brace
    return _std(root, (f.name,))


def c_missing_shard(root: Path) -> Case:
    f = _target_shard(root)
    f.unlink()
    return _std(root, (f.name,))


def c_zip_as_shard(root: Path) -> Case:
    f = _target_shard(root)
    torch.save({"model.x": torch.ones(4)}, f)
    return _std(root, (f.name, "zip"))


def c_pickle_as_shard(root: Path) -> Case:
    f = _target_shard(root)
    f.write_bytes(pickle.dumps({"model.x": [1.0, 2.0], "note": "not safetensors"}))
    return _std(root, (f.name, "pickle"))


# -- the index -----------------------------------------------------------------------------------------------------

def _index_path_case(trick: Callable[[Path, str], str]) -> Callable[[Path], Case]:
    def build(root: Path) -> Case:
        base, _ = make_pair(root)
        first_shard = shard_names(base)[0]
        bad = trick(base, first_shard)

        def mutate(wm: dict) -> None:
            name = next(k for k, v in wm.items() if v == first_shard)
            wm[name] = bad
        edit_index(base, mutate)
        return _std(root, (INDEX,))
    return build


def c_index_not_json(root: Path) -> Case:
    base, _ = make_pair(root)
    (base / INDEX).write_text('{"metadata": {}, "weight_map": {')
    return _std(root, (INDEX,))


def c_index_lists_absent_tensor(root: Path) -> Case:
    base, _ = make_pair(root)
    ghost = "model.layers.0.self_attn.rotary_emb.inv_freq"
    edit_index(base, lambda wm: wm.__setitem__(ghost, shard_names(base)[0]))
    return _std(root, (ghost,))


def c_tensor_in_two_shards(root: Path) -> Case:
    base, _ = make_pair(root)
    names = shard_names(base)
    hdr1, data1 = st_read(base / names[1])
    twin = tensors_by_offset(hdr1)[-1]
    s, e = hdr1[twin]["data_offsets"]
    f2 = base / names[2]
    hdr2, data2 = st_read(f2)
    hdr2[twin] = {"dtype": hdr1[twin]["dtype"], "shape": hdr1[twin]["shape"],
                  "data_offsets": [len(data2), len(data2) + e - s]}
    st_write(f2, hdr2, data2 + data1[s:e])
    return _std(root, (twin,))


def c_index_points_to_wrong_shard(root: Path) -> Case:
    base, _ = make_pair(root)
    names = shard_names(base)
    hdr, _ = st_read(base / names[1])
    moved = tensors_by_offset(hdr)[-1]
    edit_index(base, lambda wm: wm.__setitem__(moved, names[3]))
    return _std(root, (moved,))


def c_header_tensor_missing_from_index(root: Path) -> Case:
    base, _ = make_pair(root)
    hdr, _ = st_read(base / shard_names(base)[1])
    dropped = tensors_by_offset(hdr)[-1]
    edit_index(base, lambda wm: wm.pop(dropped))
    return _std(root, (dropped,))


# -- the adapter ---------------------------------------------------------------------------------------------------

Q0 = "model.layers.0.self_attn.q_proj"
K0 = "model.layers.0.self_attn.k_proj"
V1 = "model.layers.1.self_attn.v_proj"
DOWN1 = "model.layers.1.mlp.down_proj"


def _adapter_tensor_case(mutate: Callable[[dict], None], culprits: tuple[str, ...], **kw) -> Callable[[Path], Case]:
    def build(root: Path) -> Case:
        _, adapter = make_pair(root)
        rewrite_adapter(adapter, mutate)
        return _std(root, culprits, **kw)
    return build


def _set_value(key: str, value: float) -> Callable[[dict], None]:
    def mutate(sd: dict) -> None:
        sd[key] = sd[key].clone()
        sd[key].view(-1)[5] = value
    return mutate


def _drop(key: str) -> Callable[[dict], None]:
    return lambda sd: sd.pop(key)


def _rank(module: str, a: int | None, b: int | None) -> Callable[[dict], None]:
    def mutate(sd: dict) -> None:
        if a is not None:
            sd[lora_key(module, "A")] = sd[lora_key(module, "A")][:a].contiguous()
        if b is not None:
            sd[lora_key(module, "B")] = sd[lora_key(module, "B")][:, :b].contiguous()
    return mutate


def c_other_model_adapter(root: Path) -> Case:
    _, adapter = make_pair(root)
    shutil.rmtree(adapter)
    write_adapter(adapter, LlamaShape(hidden=48, intermediate=80, layers=2, vocab=64, heads=4, kv_heads=2), r=4,
                  alpha=6.0)
    # every one of the 14 LoRA modules is reported, in the multi-problem format, after one diagnosis line
    return _std(root, (Q0, DOWN1), problems=14,
                diagnosis="the adapter was trained on a model with hidden size 48; BASE has 32")


def _config_case(culprits: tuple[str, ...], any_format: bool = False, **changes: object) -> Callable[[Path], Case]:
    def build(root: Path) -> Case:
        _, adapter = make_pair(root)
        edit_json(adapter / "adapter_config.json", **changes)
        return _std(root, culprits, any_format=any_format)
    return build


def c_adapter_config_not_json(root: Path) -> Case:
    _, adapter = make_pair(root)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    return _std(root, ("adapter_config.json",))


def _state_dict(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load((adapter / ADAPTER_WEIGHTS).read_bytes())  # in memory: load_file would mmap the file we overwrite


def c_pickled_adapter_without_flag(root: Path) -> Case:
    _, adapter = make_pair(root)
    torch.save(_state_dict(adapter), adapter / "adapter_model.bin")
    (adapter / ADAPTER_WEIGHTS).unlink()
    return _std(root, ("adapter_model.bin", "--allow-pickle"))


def c_zip_as_adapter(root: Path) -> Case:
    _, adapter = make_pair(root)
    torch.save(_state_dict(adapter), adapter / ADAPTER_WEIGHTS)
    return _std(root, (ADAPTER_WEIGHTS, "zip"))


def c_pickle_as_adapter(root: Path) -> Case:
    _, adapter = make_pair(root)
    (adapter / ADAPTER_WEIGHTS).write_bytes(pickle.dumps({"lora_A": [0.1, 0.2], "lora_B": [0.3]}))
    return _std(root, (ADAPTER_WEIGHTS, "pickle"))


def _three_problems(sd: dict) -> None:
    sd.pop(lora_key(Q0, "B"))                                        # 1. lora_A without lora_B
    sd[lora_key(K0, "A")] = sd[lora_key(K0, "A")][:3].contiguous()  # 2. r=4 in the config, rank 3 in the file
    sd[lora_key(K0, "B")] = sd[lora_key(K0, "B")][:, :3].contiguous()
    b = sd[lora_key(V1, "B")]                                         # 3. lora_B one row too many for the base
    sd[lora_key(V1, "B")] = torch.cat([b, b[:1]]).contiguous()


def c_three_problems_merge(root: Path) -> Case:
    _, adapter = make_pair(root)
    rewrite_adapter(adapter, _three_problems)
    return _std(root, (Q0, K0, V1), problems=3)


def c_three_problems_plan(root: Path) -> Case:
    base, adapter = make_pair(root)
    rewrite_adapter(adapter, _three_problems)
    return Case(root=root, out=root / "out", culprits=(Q0, K0, V1), argv=("plan", str(base), str(adapter)),
                problems=3, stdout_contains=("problem:",))


# -- the output folder ---------------------------------------------------------------------------------------------

def _out_case(where: Callable[[Path, Path, Path], Path], *extra: str) -> Callable[[Path], Case]:
    def build(root: Path) -> Case:
        base, adapter = make_pair(root)
        out = where(root, base, adapter)
        return Case(root=root, out=out, culprits=(str(out),), argv=_merge(base, adapter, out, *extra))
    return build


def c_out_contains_adapter_only(root: Path) -> Case:
    base, adapter = make_pair(root)
    holder = root / "adapters"
    holder.mkdir()
    inner = adapter.rename(holder / "a")
    return Case(root=root, out=holder, culprits=(str(holder),), argv=_merge(base, inner, holder))


def _out_symlink_to_base(root: Path, base: Path, adapter: Path) -> Path:
    link = root / "link-to-base"
    link.symlink_to(base)
    return link


def c_out_unrelated_nonempty(root: Path) -> Case:
    base, adapter = make_pair(root)
    out = root / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes, not a merge\n")
    (out / shard_names(base)[0]).write_bytes(b"someone else's weights")
    return Case(root=root, out=out, culprits=(str(out),), argv=_merge(base, adapter, out))


def c_out_is_a_file(root: Path) -> Case:
    base, adapter = make_pair(root)
    out = root / "out.txt"
    out.write_text("a file, not a folder\n")
    return Case(root=root, out=out, culprits=(str(out),), argv=_merge(base, adapter, out))


CASES: dict[str, Callable[[Path], Case]] = {
    # base shards
    "shard-truncated-in-data": c_truncated_in_data,
    "shard-truncated-in-header": c_truncated_in_header,
    "shard-truncated-to-5-bytes": c_truncated_to_5_bytes,
    "shard-zero-filled": c_zero_filled,
    "shard-git-lfs-pointer": c_lfs_pointer,
    "shard-trailing-bytes": c_trailing_bytes,
    "shard-overlapping-offsets": c_overlapping_offsets,
    "shard-gapped-offsets": c_gapped_offsets,
    "shard-duplicate-tensor-name": c_duplicate_tensor_name,
    "shard-name-with-NUL": _control_char_case("\x00"),
    "shard-name-with-newline": _control_char_case("\n"),
    "shard-name-with-C1-NEL": _control_char_case("\x85"),
    "shard-offsets-do-not-fit-shape": c_offsets_do_not_fit_shape,
    "shard-garbage-header-json": c_garbage_header,
    "shard-missing-file": c_missing_shard,
    "shard-is-a-zip": c_zip_as_shard,
    "shard-is-a-raw-pickle": c_pickle_as_shard,
    # the index
    "index-entry-dotdot": _index_path_case(lambda base, s: f"../{base.name}/{s}"),
    "index-entry-absolute": _index_path_case(lambda base, s: str((base / s).resolve())),
    "index-entry-backslash": _index_path_case(lambda base, s: f"..\\{base.name}\\{s}"),
    "index-entry-NUL": _index_path_case(lambda base, s: s.replace("-of-", "-of\x00-")),
    "index-not-json": c_index_not_json,
    "index-lists-absent-tensor": c_index_lists_absent_tensor,
    "index-tensor-in-two-shards": c_tensor_in_two_shards,
    "index-points-to-wrong-shard": c_index_points_to_wrong_shard,
    "index-misses-a-header-tensor": c_header_tensor_missing_from_index,
    # adapter tensors
    "adapter-NaN-in-lora_A": _adapter_tensor_case(_set_value(lora_key(Q0, "A"), float("nan")),
                                                  (lora_key(Q0, "A"),), out_created_ok=True),
    "adapter-Inf-in-lora_B": _adapter_tensor_case(_set_value(lora_key(DOWN1, "B"), float("inf")),
                                                  (lora_key(DOWN1, "B"),), out_created_ok=True),
    "adapter-lora_A-without-lora_B": _adapter_tensor_case(_drop(lora_key(DOWN1, "B")), (DOWN1,)),
    "adapter-lora_B-without-lora_A": _adapter_tensor_case(_drop(lora_key(K0, "A")), (K0,)),
    "adapter-config-r-vs-weights-rank": _adapter_tensor_case(_rank(K0, 3, 3), (K0, "r=4")),
    "adapter-lora_A-vs-lora_B-rank": _adapter_tensor_case(_rank(V1, 3, None), (V1, "rank")),
    "adapter-of-another-model": c_other_model_adapter,
    "adapter-weights-are-pickle-bin": c_pickled_adapter_without_flag,
    "adapter-weights-are-a-zip": c_zip_as_adapter,
    "adapter-weights-are-a-raw-pickle": c_pickle_as_adapter,
    # adapter config
    "config-peft_type-LOHA": _config_case(("peft_type", "LOHA"), peft_type="LOHA"),
    # a plain LoRA file under use_dora: refused as one line, or per module (no lora_magnitude_vector)
    "config-use_dora": _config_case(("use_dora",), use_dora=True, any_format=True),
    "config-init-pissa": _config_case(("init_lora_weights",), init_lora_weights="pissa"),
    "config-layer_replication": _config_case(("layer_replication",), layer_replication=[[0, 2], [1, 2]]),
    "config-unknown-truthy-field": _config_case(("use_magic_merge",), use_magic_merge=True),
    "config-not-json": c_adapter_config_not_json,
    # all problems at once
    "plan-three-problems-merge": c_three_problems_merge,
    "plan-three-problems-plan-command": c_three_problems_plan,
    # the output folder
    "out-equals-base": _out_case(lambda root, b, a: b),
    "out-equals-base-fresh": _out_case(lambda root, b, a: b, "--fresh"),
    "out-inside-base": _out_case(lambda root, b, a: b / "merged"),
    "out-contains-base-and-adapter": _out_case(lambda root, b, a: root),
    "out-symlink-to-base": _out_case(_out_symlink_to_base),
    "out-equals-adapter": _out_case(lambda root, b, a: a),
    "out-inside-adapter": _out_case(lambda root, b, a: a / "merged"),
    "out-contains-adapter": c_out_contains_adapter_only,
    "out-unrelated-non-empty": c_out_unrelated_nonempty,
    "out-is-a-file": c_out_is_a_file,
}


# ----------------------------------------------------------------------------------------------------------------
# running them


@dataclass
class Outcome:
    case: Case | None
    error: BaseException | None = None
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    inputs_before: dict | None = None
    inputs_after: dict | None = None
    out_before: dict | None = None
    out_after: dict | None = None


def _out_is_separate(case: Case) -> bool:
    """OUT is a folder of its own next to the inputs (not one of them, inside them, or holding them)."""
    return case.out.parent.resolve() == case.root.resolve() and not case.out.is_symlink() and case.out.name in (
        "out", "out.txt")


def _state(path: Path) -> dict:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return snapshot(path) if path.exists() else {"<absent>": ""}


def _run_case(name: str, root: Path) -> Outcome:
    try:
        case = CASES[name](root)
    except BaseException as exc:  # noqa: BLE001 - reported by the case's own test
        return Outcome(case=None, error=exc)
    sep = _out_is_separate(case)
    o = Outcome(case=case, inputs_before=snapshot(root, exclude=case.out if sep else None),
                out_before=_state(case.out) if sep else None)
    proc = run_cli(*case.argv, timeout=600)
    o.rc, o.stdout, o.stderr = proc.returncode, proc.stdout, proc.stderr
    o.inputs_after = snapshot(root, exclude=case.out if sep else None)
    o.out_after = _state(case.out) if sep else None
    return o


@pytest.fixture(scope="module")
def outcomes(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Build every selected case, then run their CLI processes concurrently (a few at a time)."""
    wanted = [item.callspec.params["case"] for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params]
    wanted = list(dict.fromkeys(wanted)) or list(CASES)
    roots = {name: tmp_path_factory.mktemp("bad-" + re.sub(r"[^A-Za-z0-9]+", "-", name)[:40]) for name in wanted}
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        futures = {name: pool.submit(_run_case, name, roots[name]) for name in wanted}
        return {name: f.result() for name, f in futures.items()}


def check_refused(o: Outcome) -> None:
    case = o.case
    assert case is not None
    err_lines = o.stderr.splitlines()
    context = f"rc={o.rc}\nstderr:\n{o.stderr}\nstdout:\n{o.stdout[-2000:]}"
    assert o.rc == 2, context
    assert "Traceback" not in o.stderr and "Traceback" not in o.stdout, context
    multi = MULTI_HEAD.match(err_lines[0]) if err_lines else None
    if case.problems is None and not (case.any_format and multi):
        assert len(err_lines) == 1, f"expected one stderr line\n{context}"
        assert err_lines[0].startswith("error:"), context
    else:
        assert multi, f"expected the multi-problem summary line\n{context}"
        n = int(multi.group(1))
        assert n == (case.problems or n) and len(err_lines) == 1 + n + bool(case.diagnosis), context
        assert not case.diagnosis or err_lines[1].startswith(f"  - diagnosis: {case.diagnosis}"), context
        assert all(line.startswith("  - ") and len(line) > 4 for line in err_lines[1:]), context
    for culprit in case.culprits:
        assert culprit in o.stderr, f"stderr does not name {culprit!r}\n{context}"
    for text in case.stdout_contains:
        assert text in o.stdout, context
    if case.stdout_contains and case.problems:  # `plan` lists each problem on stdout too
        assert sum(line.startswith("problem:") for line in o.stdout.splitlines()) == case.problems, o.stdout
    # nothing in the inputs changed: no byte, no new file, no new folder
    assert o.inputs_after == o.inputs_before, "the inputs changed: " + repr(
        {k for k in set(o.inputs_before) | set(o.inputs_after) if o.inputs_before.get(k) != o.inputs_after.get(k)})
    # never an index; and for problems found while planning, no output written at all. (When OUT is, holds or
    # is inside an input, the snapshot above already proves that nothing at all was written.)
    if _out_is_separate(case):
        assert not (case.out / INDEX).exists(), context
        if not case.out_created_ok:
            assert o.out_after == o.out_before, f"OUT was written to: {o.out_before} -> {o.out_after}\n{context}"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case: str, outcomes: dict[str, Outcome]) -> None:
    o = outcomes[case]
    if o.error is not None:
        raise o.error
    check_refused(o)


# ----------------------------------------------------------------------------------------------------------------
# the other side of the fence: inputs that look odd but are fine


def _shards_equal(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in b.glob("*.safetensors"))
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert (a / INDEX).read_bytes() == (b / INDEX).read_bytes()


def test_pickled_adapter_refused_without_flag_and_equal_with_it(tmp_path: Path) -> None:
    base, adapter = make_pair(tmp_path)
    pick = tmp_path / "adapter-bin"
    pick.mkdir()
    shutil.copy(adapter / "adapter_config.json", pick)
    torch.save(_state_dict(adapter), pick / "adapter_model.bin")
    before = snapshot(tmp_path)
    jobs = {"safe": ("merge", base, adapter, "-o", tmp_path / "out-safe"),
            "refused": ("merge", base, pick, "-o", tmp_path / "out-refused"),
            "allowed": ("merge", base, pick, "-o", tmp_path / "out-bin", "--allow-pickle")}
    with ThreadPoolExecutor(max_workers=3) as pool:
        res = {k: f.result() for k, f in {k: pool.submit(run_cli, *v) for k, v in jobs.items()}.items()}
    r = res["refused"]
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error:"), r.stderr
    assert "adapter_model.bin" in r.stderr and "--allow-pickle" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out-refused").exists()
    for k in ("safe", "allowed"):
        assert res[k].returncode == 0, res[k].stderr
    _shards_equal(tmp_path / "out-safe", tmp_path / "out-bin")
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out-")} == before


def test_valid_shard_whose_header_length_looks_like_pickle_magic(tmp_path: Path) -> None:
    """A valid shard whose 8-byte header length starts 0x80 0x03 (896 bytes: a header of a few dozen tensors)
    must not be mistaken for a pickle: the length prefix is not the file's first "magic" bytes."""
    base, adapter = make_pair(tmp_path)
    f = base / shard_names(base)[2]
    hdr, data = st_read(f)
    st_write(f, hdr, data, pad_to=896)
    assert f.read_bytes()[:2] == b"\x80\x03"
    expected = folder_tensors(base)  # the safetensors library itself reads it
    res = run_cli("merge", base, adapter, "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    merged = folder_tensors(tmp_path / "out")
    assert merged.keys() == expected.keys()
