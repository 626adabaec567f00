"""One fork server for the tests that start many CLI runs: a helper process imports torch and stream_merge once,
then forks one child per run, which runs `python -m stream_merge`'s own `__main__` (via runpy) with the given
argv, stdout and stderr (and, if given, its whole environment, working folder and an alarm). Each child is a
real, separate process: it can be signalled or SIGKILLed mid-write (tests/test_crash_resume.py) or simply
waited for (tests/test_hub_merge.py). Starting a Python that imports torch costs ~2.5 CPU-seconds, which this
pays once per module instead of once per run.

huggingface_hub is not imported by the server: it reads HF_* variables when a child imports it, so each child's
own environment decides.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SCRIPT = r"""
import json, os, runpy, signal, sys, traceback
import torch  # noqa: F401  - the slow import, paid once
import stream_merge.cli, stream_merge.runner  # noqa: F401
assert not [m for m in sys.modules if m.split(".")[0] in ("huggingface_hub", "httpx2", "httpx")], "imported too early"
proto = sys.stdout
proto.write("ready\n"); proto.flush()
for line in sys.stdin:
    req = json.loads(line)
    if "reap" in req:
        _, status = os.waitpid(req["reap"], 0)
        proto.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n"); proto.flush()
        continue
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if req.get("timeout"):
                signal.alarm(req["timeout"])
            if req.get("env") is not None:
                os.environ.clear(); os.environ.update(req["env"])
            if req.get("cwd"):
                os.chdir(req["cwd"])
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
            os.dup2(os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            sys.argv = ["stream_merge", *req["argv"]]
            try:
                runpy.run_module("stream_merge", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    proto.write(json.dumps({"pid": pid}) + "\n"); proto.flush()
"""


class Zygote:
    """The fork server. `start` returns a running Child; `run` waits for it like subprocess.run."""

    def __init__(self, logdir: Path, env: Mapping[str, str] | None = None) -> None:
        self.logdir = logdir
        logdir.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self.proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, env=None if env is None else dict(env))
        self._ready = False

    def line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("the zygote did not answer")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote died (rc={self.proc.poll()})")
        return line

    def start(self, argv: Sequence[object], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
              timeout: int | None = None) -> "Child":
        if not self._ready:
            assert self.line(300) == "ready\n"
            self._ready = True
        self.n += 1
        out, err = self.logdir / f"{self.n}.out", self.logdir / f"{self.n}.err"
        req = {"argv": [str(a) for a in argv], "stdout": str(out), "stderr": str(err), "timeout": timeout,
               "env": None if env is None else dict(env), "cwd": None if cwd is None else str(cwd)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        pid = json.loads(self.line(60))["pid"]
        return Child(self, pid, out, err, time.perf_counter())

    def run(self, argv: Sequence[object], **how: object) -> subprocess.CompletedProcess:
        child = self.start(argv, **how)  # type: ignore[arg-type]
        rc = child.wait()
        return subprocess.CompletedProcess(["stream_merge", *map(str, argv)], rc, child.stdout, child.stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Child:
    zygote: Zygote
    pid: int
    out_path: Path
    err_path: Path
    started: float
    rc: int | None = None
    seconds: float = 0.0

    def signal(self, sig: int) -> None:
        # Safe even if it has exited: the zygote reaps it only on wait(), so the pid cannot be reused before.
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 300) -> int:
        if self.rc is None:
            self.zygote.proc.stdin.write(json.dumps({"reap": self.pid}) + "\n")
            try:
                line = self.zygote.line(timeout)
            except TimeoutError:
                os.kill(self.pid, signal.SIGKILL)
                line = self.zygote.line(60)
            self.rc = json.loads(line)["rc"]
            self.seconds = time.perf_counter() - self.started
        return self.rc

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()
