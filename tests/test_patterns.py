"""Regular expressions from adapter configs (issue 14 item 5): invalid ones are an exit-2 error naming the key,
catastrophic ones end within a bound with an exit-2 error naming the key, PEFT's matching rules are kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import edit_json, run_cli
from stream_merge.adapter import load_adapter
from stream_merge.errors import InputError
from stream_merge.patterns import (BoundedRegex, ModuleSelection, PatternError, PatternTimeout, compile_patterns,
                                   pattern_value, peft_targets)

NAME = "model.layers.1.self_attn.q_proj"
# Patterns that backtrack exponentially even in the `regex` engine (its fast-fail checks do not apply).
EXPONENTIAL = [r"(.*){1,30}\d{5}", r"((.*)*){1,25}[0-9]{4}", r"(.*.*){1,20}[0-9]{4}"]
# Patterns on which Python's `re` never ends against a long module name; `regex` fails them at once.
RE_CATASTROPHIC = [r"(.*)*Z", r"(a|a)*Z", r"((.+)+)+Z", r"(\w+\.?)*Z"]
INVALID = ["(", "[a-", "*x", "a{2,1}", "(?P<n", "[z-a]"]
KEYS = ["target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "layers_pattern"]


def _set(adapter: Path, key: str, pattern: str) -> None:
    if key in ("rank_pattern", "alpha_pattern"):
        edit_json(adapter / "adapter_config.json", **{key: {pattern: 4}})
    elif key == "layers_pattern":
        edit_json(adapter / "adapter_config.json", layers_pattern=pattern, layers_to_transform=[0, 1])
    else:
        edit_json(adapter / "adapter_config.json", **{key: pattern})


CHECKS = {
    "target_modules": lambda p: ModuleSelection.from_config(p).selects(NAME),
    "exclude_modules": lambda p: ModuleSelection.from_config(None, p).selects(NAME),
    "layers_pattern": lambda p: ModuleSelection.from_config(None, None, [1], p).selects(NAME),
    "rank_pattern": lambda p: pattern_value(compile_patterns({p: 1}, "rank_pattern"), NAME, 0),
}


@pytest.mark.parametrize("key,pattern", list(zip(CHECKS, EXPONENTIAL * 2)))
def test_exponential_patterns_stop_at_their_budget(key: str, pattern: str) -> None:
    with pytest.raises(PatternTimeout) as exc:
        CHECKS[key](pattern)
    assert exc.value.field == key
    assert repr(pattern) in str(exc.value) and "catastrophic" in str(exc.value)


def test_the_budget_is_shared_by_all_matches_of_a_pattern() -> None:
    rx = BoundedRegex(EXPONENTIAL[0], "target_modules", budget_s=0.2)
    with pytest.raises(PatternTimeout):
        rx.fullmatch(NAME)
    with pytest.raises(PatternTimeout):  # spent: even an easy name is refused now
        rx.fullmatch("x")
    fresh = BoundedRegex(r".*\.q_proj", "target_modules", budget_s=0.2)
    assert all(fresh.fullmatch(f"model.layers.{i}.self_attn.q_proj") for i in range(2000))


@pytest.mark.parametrize("pattern", RE_CATASTROPHIC)
def test_patterns_that_hang_re_end_and_keep_their_meaning(pattern: str) -> None:
    long_name = ".".join(["model.layers.12.self_attn.q_proj"] * 4)
    assert ModuleSelection.from_config(pattern).selects(long_name) is False
    assert pattern_value(compile_patterns({pattern: 1}, "rank_pattern"), long_name, 7) == 7


@pytest.mark.parametrize("key,pattern", [(k, p) for k in KEYS for p in INVALID
                                         if (k, p) != ("layers_pattern", "*x")])  # PEFT's `.*\.*x\.(\d+)\.` is valid
def test_invalid_patterns_name_their_key(pattern: str, key: str, pair: tuple[Path, Path]) -> None:
    _, adapter = pair
    _set(adapter, key, pattern)
    with pytest.raises(InputError) as exc:
        load_adapter(adapter)
    assert exc.value.key == key and repr(pattern) in exc.value.one_line() and "regular expression" in exc.value.one_line()
    with pytest.raises(PatternError):
        BoundedRegex(pattern, key)


@pytest.mark.parametrize("key,value", [("target_modules", 3), ("target_modules", ["q_proj", 1]),
                                       ("exclude_modules", {"a": 1}), ("layers_pattern", [None]),
                                       ("layers_to_transform", "0"), ("layers_to_transform", [0, True]),
                                       ("modules_to_save", [1]), ("modules_to_save", {"a": 1}),
                                       ("target_parameters", "experts.down_proj")])
def test_selection_fields_of_the_wrong_type_name_their_key(key: str, value: object, pair: tuple[Path, Path]) -> None:
    _, adapter = pair
    edit_json(adapter / "adapter_config.json", **{key: value})
    with pytest.raises(InputError) as exc:
        load_adapter(adapter)
    assert exc.value.key == key


def test_peft_rules_are_kept() -> None:
    sel = ModuleSelection.from_config(r".*\.(q|v)_proj", r".*layers\.0\..*", [1, 2], "layers")
    assert sel.selects("model.layers.1.self_attn.q_proj") is True
    assert sel.selects("model.layers.0.self_attn.q_proj") is False     # excluded
    assert sel.selects("model.layers.3.self_attn.q_proj") is False     # layers_to_transform
    assert sel.selects("model.layers.1.self_attn.k_proj") is False     # fullmatch
    assert ModuleSelection.from_config("q_proj").selects("model.layers.1.self_attn.q_proj") is False
    assert ModuleSelection.from_config(["q_proj"], ["self_attn.q_proj"]).selects(NAME) is False
    assert ModuleSelection.from_config("all-linear").selects(NAME) is None


@pytest.mark.parametrize("key,pattern", list(zip(KEYS, EXPONENTIAL * 2)))
def test_cli_exponential_pattern_is_exit_2_naming_the_key(key: str, pattern: str, pair: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    base, adapter = pair
    _set(adapter, key, pattern)
    out = tmp_path / "out"
    proc = run_cli("merge", base, adapter, "-o", out, "--device", "cpu", timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert key in line and repr(pattern) in line and "catastrophic" in line, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("key", ["target_modules", "rank_pattern"])
def test_cli_invalid_pattern_is_exit_2_naming_the_key(key: str, pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = pair
    _set(adapter, key, "(")
    proc = run_cli("plan", base, adapter, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert key in proc.stderr and "not a valid regular expression" in proc.stderr


def test_cli_pattern_that_hangs_re_merges(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """`(.*)*Z` as a rank_pattern key selects nothing (PEFT's meaning) and the merge completes."""
    base, adapter = pair
    _set(adapter, "rank_pattern", RE_CATASTROPHIC[0])
    proc = run_cli("merge", base, adapter, "-o", tmp_path / "out", "--device", "cpu", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


# moved from test_planner.py (assertions unchanged)

def test_peft_pattern_semantics() -> None:
    pats = compile_patterns({"q_proj": 4, r"layers\.0\.self_attn\.q_proj": 8, "proj": 1, ".*_proj": 2},
                            "rank_pattern")
    assert pattern_value(pats, "model.layers.0.self_attn.q_proj", 16) == 4       # first match wins
    assert pattern_value(pats, "model.layers.0.self_attn.k_proj", 16) == 2       # "proj" needs a '.' before it
    assert pattern_value(pats, "model.layers.0.mlp.up_proj", 16) == 2
    pats = compile_patterns({"p_proj": 4}, "rank_pattern")
    assert pattern_value(pats, "model.layers.0.mlp.up_proj", 16) == 16           # '.' boundary
    pats = compile_patterns({"model.layers.0.mlp.up_proj": 4}, "rank_pattern")
    assert pattern_value(pats, "model.layers.0.mlp.up_proj", 16) == 4            # full path
    with pytest.raises(ValueError):
        compile_patterns({"(": 1}, "rank_pattern")


def test_peft_target_selection() -> None:
    assert peft_targets("model.layers.1.self_attn.q_proj", ["q_proj"]) is True
    assert peft_targets("model.layers.1.self_attn.q_proj", ["k_proj"]) is False
    assert peft_targets("model.layers.1.self_attn.q_proj", ["q_proj"], layers_to_transform=[0]) is False
    assert peft_targets("model.layers.1.self_attn.q_proj", r".*\.q_proj") is True
    assert peft_targets("model.layers.1.self_attn.q_proj", "all-linear") is None
