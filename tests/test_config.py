"""The option table (config.MergeConfig): the parser, YAML coercion, the recorded / fingerprinted options and
every combination check derive from it; each check refuses before any side effect."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_cli
from stream_merge import cli
from stream_merge.config import (OPTIONS, MergeConfig, build_config, config_from_record, fingerprint_options,
                                 is_hub_repo_id, load_yaml, normalise, recorded_options)
from stream_merge.errors import ConfigError
from stream_merge.options import MAX_BLOCK_SIZE_MB, MAX_PREFETCH


def _flags(command: str) -> set[str]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices[command]
    return {s for a in sub._actions for s in a.option_strings}


def test_parser_is_derived_from_the_table() -> None:
    for command in ("merge", "plan"):
        flags = _flags(command)
        for d in OPTIONS.values():
            for flag in d.option.flags:
                assert (flag in flags) == (command in d.option.commands), (command, flag)
    assert {"--output", "--push-to-hub", "--worker"} <= _flags("merge") - _flags("plan")
    assert "--copy-extras" not in _flags("merge")


def test_cli_values_reach_the_config_through_the_table(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    args = cli.build_parser().parse_args(
        ["merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "--weights", "0.5", "--key-map", "^a=b",
         "--no-check-finite", "--block-size-mb", "8", "--strict", "--device", "cpu"])
    cfg = cli._config(args)
    assert cfg == MergeConfig(base=str(base), adapters=(str(adapter),), output=str(tmp_path / "o"), weights=(0.5,),
                              key_map=(("^a", "b"),), check_finite=False, block_size_mb=8, strict=True, device="cpu")
    # flags not given leave the YAML file's values alone
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("block_size_mb: 4\ncheck_finite: false\n")
    args = cli.build_parser().parse_args(["merge", str(base), str(adapter), "--config", str(yaml_file)])
    cfg = cli._config(args)
    assert (cfg.block_size_mb, cfg.check_finite, cfg.strict) == (4, False, False)


def test_copy_extras_is_gone_and_unknown_keys_say_did_you_mean(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("base: b\nadapters: [a]\ncopy_extras: false\n")
    with pytest.raises(ConfigError, match="unknown config key 'copy_extras'") as e:
        load_yaml(f)
    assert e.value.file == str(f)
    for key, near in (("block_size", "block_size_mb"), ("adaptor", "adapter"), ("push_to_hb", "push_to_hub")):
        with pytest.raises(ConfigError, match=f"did you mean '{near}'"):
            normalise({key: 1})
    assert "copy_extras" not in OPTIONS


@pytest.mark.parametrize("bad,yaml", [(math.nan, ".nan"), (math.inf, ".inf"), (-math.inf, "-.inf"), ("nan", "nan"),
                                      (True, "true")])
def test_weights_must_be_finite_numbers_in_yaml_and_keywords(bad: object, yaml: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        build_config(base="b", adapters=["a", "c"], weights=[1.0, bad])
    assert e.value.key == "weights"
    f = tmp_path / "w.yaml"
    f.write_text(f"base: b\nadapters: [a]\nweights: [{yaml}]\n")
    with pytest.raises(ConfigError, match="weights must be") as e:
        build_config(load_yaml(f))
    assert e.value.file == str(f)
    assert build_config(base="b", adapters=["a", "c"], weights=[-0.5, 0]).weights == (-0.5, 0.0)


@pytest.mark.parametrize("flag", ["nan", "inf", "-inf", "NaN"])
def test_weights_nan_on_the_command_line_is_refused_before_anything(pair: tuple[Path, Path], tmp_path: Path,
                                                                    flag: str) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    r = run_cli("merge", base, adapter, "-o", out, f"--weights={flag}", "--no-check-finite")
    assert r.returncode == 2 and "weights must be finite" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("key,good,bad", [
    ("block_size_mb", (1, 2, MAX_BLOCK_SIZE_MB), (0, -1, MAX_BLOCK_SIZE_MB + 1, 10**9, 2.5, True, "8")),
    ("prefetch", (0, 1, MAX_PREFETCH), (-1, MAX_PREFETCH + 1, 10**6, 1.0, False)),
])
def test_numbers_are_bounded(key: str, good: tuple, bad: tuple) -> None:
    for v in good:
        assert normalise({key: v})[key] == v
    for v in bad:
        with pytest.raises(ConfigError, match=key) as e:
            normalise({key: v})
        assert e.value.key == key
    with pytest.raises(ConfigError) as e:
        normalise({"block_size_mb": MAX_BLOCK_SIZE_MB + 1})
    assert "memory" in (e.value.fix or "")


def test_is_hub_repo_id_decides_syntactically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert is_hub_repo_id("org/name") and is_hub_repo_id("org/name@main") and is_hub_repo_id("o-1/n.2@v1.0")
    assert not is_hub_repo_id("org/local")      # an existing folder wins
    assert not is_hub_repo_id("./org/name") and not is_hub_repo_id("/org/name") and not is_hub_repo_id("~/x")
    assert not is_hub_repo_id("name") and not is_hub_repo_id("a/b/c")


# (extra flags, words the one-line error must hold); BASE is the local pair unless the case names "HUB"
CONFLICTS = [
    (["--ray"], "HUB", ["--ray", "Hub repo id"]),
    (["--ray", "10.0.0.1:6379"], "HUB", ["--ray", "Hub repo id"]),
    (["--worker", "0/2", "--fresh"], None, ["--fresh", "--worker"]),
    (["--worker", "1/2", "--push-to-hub", "org/merged"], None, ["--push-to-hub", "--worker", "finalize"]),
    (["--worker", "0/2", "--ray"], None, ["--worker", "--ray"]),
    (["--private"], None, ["--private", "only applies with --push-to-hub"]),
    (["--no-local-copy"], None, ["--no-local-copy", "only applies with --push-to-hub"]),
    (["--private", "--no-local-copy"], None, ["--private", "--push-to-hub"]),
    (["--prefetch", "2"], None, ["--prefetch", "only applies to a Hub BASE"]),
    (["--prefetch", "0"], None, ["--prefetch", "only applies to a Hub BASE"]),
    (["--keep-downloads"], None, ["--keep-downloads", "only applies to a Hub BASE"]),
    (["--worker", "2/2"], None, ["I/N"]),
    (["--push-to-hub", "org/x@main"], None, ["push_to_hub", "ORG/NAME"]),
]


@pytest.mark.parametrize("extra,base_kind,words", CONFLICTS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_conflicts_are_refused_before_any_side_effect(pair: tuple[Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str], extra: list[str],
                                                      base_kind: str | None, words: list[str]) -> None:
    base, adapter = pair
    out = tmp_path / "out" / "nested"
    b = "org/base-model" if base_kind == "HUB" else str(base)
    code = cli.main(["merge", b, str(adapter), "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "out").exists()


def test_the_same_conflicts_from_yaml(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    f = tmp_path / "c.yaml"
    f.write_text(f"base: {base}\nadapters: [{adapter}]\noutput: {tmp_path / 'out'}\nworker: 0/2\n"
                 "push_to_hub: org/merged\n")
    r = run_cli("merge", "--config", f)
    assert r.returncode == 2 and "--worker" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    # defaults written out explicitly are not "given": no conflict
    f.write_text(f"base: {base}\nadapters: [{adapter}]\nlocal_copy: true\nprivate: false\nprefetch: 1\n"
                 "keep_downloads: false\nfresh: false\n")
    cfg = build_config(load_yaml(f), worker="0/2")
    assert cfg.worker == "0/2" and cfg.local_copy


def test_allowed_combinations_still_pass(pair: tuple[Path, Path]) -> None:
    base, adapter = pair
    for extra in ({"push_to_hub": "org/m", "private": True, "local_copy": False}, {"worker": "1/3"},
                  {"ray": "local"}, {"fresh": True, "push_to_hub": "org/m"}, {"dry_run": True, "fresh": True}):
        cfg = build_config(base=str(base), adapters=[str(adapter)], **extra)
        assert all(getattr(cfg, k) == v for k, v in extra.items())
    hub = build_config(base="org/base", adapters=[str(adapter)], prefetch=3, keep_downloads=True, worker="0/2")
    assert hub.prefetch == 3 and hub.keep_downloads


def test_recorded_and_fingerprinted_options_come_from_the_table() -> None:
    cfg = build_config(base="org/b", adapters=["a"], weights=[0.5], key_map={"^x": "y"}, device="cuda:1",
                       block_size_mb=64, checksums=True, untie=True)
    rec = recorded_options(cfg, "cuda")
    assert rec == {"weights": (0.5,), "key_map": (("^x", "y"),), "strict": False, "untie": True, "dequantize": False,
                   "allow_pickle": False, "dtype": "auto", "device": "cuda", "check_finite": True}
    assert fingerprint_options(cfg, "cuda") == rec
    # the device kind, not the index, enters the fingerprint; block size, checksums and Hub options do not
    other = build_config(base="org/b", adapters=["a"], weights=[0.5], key_map={"^x": "y"}, device="cuda:0",
                         block_size_mb=2, untie=True, prefetch=0)
    assert fingerprint_options(other, "cuda") == fingerprint_options(cfg, "cuda")
    assert fingerprint_options(cfg, "cpu") != fingerprint_options(cfg, "cuda")


def test_config_from_record_round_trips_every_recorded_option(tmp_path: Path) -> None:
    cfg = build_config(base=str(tmp_path), adapters=[str(tmp_path)], weights=[0.25], key_map=[["^p", "q"]],
                       strict=True, untie=True, dequantize=True, allow_pickle=True, check_finite=False, device="cpu")
    options = json.loads(json.dumps(recorded_options(cfg, "cpu")))  # as read back from the journal
    inputs = {"base": {"spec": str(tmp_path), "path": str(tmp_path), "revision": None},
              "adapters": [{"spec": "org/ad@main", "path": "/cache/x", "revision": "c0ffee", "weight": 0.25}]}
    back = config_from_record(inputs, options, output="OUT")
    assert recorded_options(back, "cpu") == recorded_options(cfg, "cpu")
    assert back.adapters == ("org/ad@c0ffee",) and back.output == "OUT" and back.base == str(tmp_path)
    # an older record without the device still loads; an unknown option is refused, naming it
    del options["device"]
    assert config_from_record(inputs, options).device == "auto"
    with pytest.raises(ConfigError, match="copy_extras"):
        config_from_record(inputs, {**options, "copy_extras": True})
    with pytest.raises(ConfigError, match="weights must be finite"):
        config_from_record({**inputs, "adapters": [{**inputs["adapters"][0], "weight": math.nan}]}, options)
