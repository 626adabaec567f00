"""errors.py holds every error class; allocation failures of every shape become exit 2 "not enough memory"
(never exit 1, which means "verification failed", never a crash where it can be avoided)."""

from __future__ import annotations

import ast
import errno
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from stream_merge import cli, errors
from stream_merge.errors import (HubError, InputError, NotEnoughMemoryError, OutputError, PlanError, StreamMergeError,
                                 memory_error)

PKG = Path(__file__).resolve().parent.parent / "stream_merge"


def test_every_error_class_lives_in_errors_py() -> None:
    known = {name for name, v in vars(errors).items() if isinstance(v, type) and issubclass(v, StreamMergeError)}
    for path in PKG.glob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                # (an internal exception a module raises and catches itself may stay with it)
                assert not bases & known, f"{path.name} defines the error class {node.name}: move it to errors.py"


def test_hub_error_is_an_input_error_importable_from_errors() -> None:
    assert issubclass(HubError, InputError) and HubError("x").exit_code == 2
    from stream_merge import hub, push

    assert hub.HubError is HubError and push.HubError is HubError


def test_plan_error_carries_the_plan() -> None:
    plan = object()
    e = PlanError(["a", "b"], plan=plan)  # type: ignore[arg-type]
    assert e.plan is plan and e.problems == ["a", "b"] and "2 problems" in e.one_line()
    assert PlanError(["a"]).plan is None


def _raised_from_none(inner: BaseException) -> OutputError:
    try:
        try:
            raise inner
        except OSError as exc:
            raise OutputError(f"cannot create a file in the output folder ({exc.strerror})", file="/o/x") from None
    except OutputError as outer:
        return outer


@pytest.mark.parametrize("exc", [
    MemoryError(),
    MemoryError("Unable to allocate 3.00 GiB for an array"),
    OSError(errno.ENOMEM, "Cannot allocate memory"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 2097152 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("can't start new thread"),
    ImportError("libtorch_cpu.so: failed to map segment from shared object"),
    OSError("libgomp.so.1: failed to map segment from shared object"),
    RuntimeError("std::bad_alloc"),
])
def test_allocation_failures_are_recognised(exc: BaseException) -> None:
    e = memory_error(exc, block_size_mb=64)
    assert isinstance(e, NotEnoughMemoryError) and e.exit_code == 2
    assert e.message.startswith("not enough memory: ") and "lower --block-size-mb (now 64)" in e.one_line()


def test_an_allocation_failure_wrapped_in_our_error_is_still_memory() -> None:
    outer = _raised_from_none(OSError(errno.ENOMEM, "Cannot allocate memory"))
    e = memory_error(outer)
    assert e is not None and e.file == "/o/x"
    assert e.message.startswith("not enough memory: ") and "while: cannot create a file" in e.message


@pytest.mark.parametrize("exc", [ValueError("x"), OSError(errno.ENOENT, "No such file"), RuntimeError("shape"),
                                 _raised_from_none(OSError(errno.ENOSPC, "No space left on device")),
                                 StreamMergeError("out of memory budget is not a thing"), KeyError("memory")])
def test_other_errors_are_not_memory(exc: BaseException) -> None:
    assert memory_error(exc) is None


def test_cli_maps_memory_errors_to_exit_2(pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from stream_merge import runner

    base, adapter = pair
    for exc in (MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory"),
                _raised_from_none(OSError(errno.ENOMEM, "Cannot allocate memory"))):
        def boom(*_a: object, exc: BaseException = exc, **_k: object) -> None:
            raise exc
        monkeypatch.setattr(runner, "run", boom)
        code = cli.main(["merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "--block-size-mb", "16"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: not enough memory: ") and err.count("\n") == 1, err
        assert "--block-size-mb (now 16)" in err


def _limited(limit_mb: int, *args: object) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))

    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "stream_merge", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limit, env=env, timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS semantics are Linux's")
@pytest.mark.parametrize("limit_mb", [400, 650, 750, 900])
def test_merge_under_an_address_space_limit_exits_0_or_2_with_a_memory_message(
        pair: tuple[Path, Path], tmp_path: Path, limit_mb: int) -> None:
    base, adapter = pair
    out = tmp_path / "out"
    for args in (("merge", base, adapter, "-o", out, "--device", "cpu", "--quiet"), ("plan", base, adapter)):
        r = _limited(limit_mb, *args)
        assert r.returncode in (0, 2), (limit_mb, r.returncode, r.stderr[-2000:])
        if r.returncode == 2:
            assert r.stderr.startswith("error: not enough memory: ") and r.stderr.count("\n") == 1, r.stderr
    if (out / "model.safetensors.index.json").exists():
        assert subprocess.run([sys.executable, "-m", "stream_merge", "verify", out], capture_output=True).returncode == 0
