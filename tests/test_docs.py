"""README and configs stay true: both set-up commands, every command documented, every config loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import run_cli
from stream_merge.cli import build_parser
from stream_merge.config import build_config, load_yaml

ROOT = Path(__file__).resolve().parent.parent


def test_readme_first_block_has_exactly_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```\n(.*?)```", readme, re.S).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) == 2
    assert "scripts/demo.py" in lines[0] and "torch==2.13.0" in lines[0]
    assert lines[1] in (ROOT / ".ci" / "run").read_text()


def test_every_command_has_help_and_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"stream-merge {name}" in readme, name
        r = run_cli(name, "--help")
        assert r.returncode == 0 and "usage:" in r.stdout
        for opt in re.findall(r"(--[a-z][a-z-]+)", r.stdout):
            assert opt in readme or opt == "--help", f"{name} {opt} is not documented in the README"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#") and "stream-merge " in text.split("\n\n")[0]
    cfg = build_config(load_yaml(path))
    assert cfg.base and cfg.adapters
