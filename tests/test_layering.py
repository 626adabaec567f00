"""DESIGN.md's layering rules, checked on the source: pure modules import no IO, only progress uses tqdm,
only cli prints."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "stream_merge"
PLANNER_PARTS = {"planner", "plan_state", "plan_modules", "plan_params", "plan_fp8", "plan_dtype", "plan_layout"}
PURE = {"lora", "keymap", "records", "compat", "errors", "ties", "patterns", "options", "partition",
        "recipes", "quant", "tie_table", "hf_ties",  # hf_ties: transformers on the meta device, no file IO
        "model_config", "load_renames", "plan_report"} | PLANNER_PARTS
TORCH_MATH = {"lora", "recipes", "quant"}  # pure block math: tensors in, tensors out
# every other module of the package may do IO: the set is derived, so a new module is IO until declared pure
MODULES = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__"}
IO_MODULES = MODULES - PURE
IO_STDLIB = {"os", "io", "shutil", "subprocess", "socket", "pathlib", "tempfile", "fcntl", "urllib", "http"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                names |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            else:
                names.add(node.module.split(".")[0])
    return names


def _prints(path: Path) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
               for n in ast.walk(ast.parse(path.read_text())))


def test_declared_modules_exist() -> None:
    assert PURE <= MODULES, PURE - MODULES


def test_pure_modules_import_no_io() -> None:
    for name in PURE:
        bad = _imports(PKG / f"{name}.py") & (IO_MODULES | IO_STDLIB | {"torch"} - ({"torch"} if name in TORCH_MATH else set()))
        assert not bad, f"{name}.py imports {bad}"


def test_plan_imports_only_records_keymap_errors() -> None:
    for part in PLANNER_PARTS:
        internal = _imports(PKG / f"{part}.py") & MODULES
        assert internal <= PURE, (part, internal)


def test_only_progress_uses_tqdm_and_only_cli_prints() -> None:
    for path in PKG.glob("*.py"):
        if path.stem != "progress":
            assert "tqdm" not in _imports(path), path.name
        if path.stem not in ("cli",):
            assert not _prints(path), f"{path.name} prints"
