"""Crash and resume: kill real merge processes at random moments and require a correct, resumable OUT.

Invariants checked after every kill or interrupt:
- OUT never holds `model.safetensors.index.json` unless it is complete (every file byte-identical to a
  reference merge);
- every published file in OUT (shards, config, card, record) is already byte-identical to the reference
  (files are only ever published whole), and every shard the journal lists is on disk with its size and mtime;
- re-running the same command completes, byte-identical to the reference (shards, index and all side files).

Starting a Python that imports torch costs ~2.5 CPU-seconds, which would make 20+ kills slow on a 2-CPU
machine. So the random-kill loops start their merges from a "zygote": a helper process that imports
torch and stream_merge once, then forks one child per merge, which runs `python -m stream_merge`'s own
`__main__` (via runpy) with the given argv, stdout and stderr. Each child is a real, separate process that
we SIGKILL mid-write. The reference merge, the signal tests, the RLIMIT_FSIZE test, one SIGKILL test and the
second run of the lock test use the real `python -m stream_merge` entry point (subprocess.Popen).

Kill moments are random but tied to progress where the load of a shared 2-CPU machine would otherwise skew
them: a random byte of the output stream (the kill fires once that many shard bytes are in OUT), a random
moment after the journal holds i shards, or (for a re-run that writes no shard bytes) a random delay within
its measured duration. All seeds are fixed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import make_pair
from zygote import Child, Zygote
from stream_merge.fileio import owner_tag, temp_name
from stream_merge.journal import SHARDS_DIR, load_journal

from stream_merge.synthetic import LlamaShape, write_adapter

INDEX = "model.safetensors.index.json"
JOURNAL = "stream_merge.journal.json"
LOCK = ".stream-merge.lock"
TMP = ".stream-merge-tmp."
# ~29 MB of BF16 in 9 shards; with --block-size-mb 1 the MLP tensors take several fp32 row blocks
SHAPE = LlamaShape(hidden=384, intermediate=1024, layers=8, vocab=2048, heads=8, kv_heads=4)
SHARD_BYTES = 4_000_000
RESUMED = re.compile(r"\((\d+) resumed\)")

def sha256(path: Path) -> str:
    """A file's digest; the model card names the exact command that made it (OUT, --fresh, ...), so that
    command is taken out of the card first: the rest of the card must still be the reference's."""
    data = path.read_bytes()
    if path.name == "README.md":
        data, n = re.subn(rb"```sh\n[^\n]*\n```", b"```sh\n<the command>\n```", data)
        assert n <= 1, "more than one command block in the card"
    return hashlib.sha256(data).hexdigest()


def listing(out: Path) -> list[str]:
    """OUT's files (the journal's per-shard records are checked through journal_shards)."""
    return sorted(p.name for p in out.iterdir() if p.name != SHARDS_DIR) if out.exists() else []


def temps(out: Path) -> list[str]:
    return [n for n in listing(out) if n.startswith(TMP)]


def snapshot(out: Path) -> dict[str, str]:
    return {n: sha256(out / n) for n in listing(out)}


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "stream_merge", *map(str, args)]


@dataclass
class World:
    root: Path
    base: Path
    adapter: Path
    ref: Path
    ref_files: dict[str, str]
    shards: list[str]
    zygote: Zygote
    t_full: float = 0.0
    t_noop: float = 0.0
    kills: list[str] = field(default_factory=list)  # one entry per SIGKILL that hit a running merge

    def args(self, out: Path, *extra: object, adapter: Path | None = None) -> list[str]:
        return ["merge", str(self.base), str(adapter or self.adapter), "-o", str(out), "--block-size-mb", "1",
                "--device", "cpu", *map(str, extra)]

    def assert_identical(self, out: Path, allow_lock: bool = False) -> None:
        """OUT is complete: the same files as the reference, byte for byte (no temp files, no lock)."""
        names = set(listing(out)) - ({LOCK} if allow_lock else set())
        assert names == set(self.ref_files), f"files differ from the reference: {sorted(names ^ set(self.ref_files))}"
        bad = [n for n in sorted(names) if sha256(out / n) != self.ref_files[n]]
        assert not bad, f"not byte-identical to the reference: {bad}"

    def check_invariant(self, out: Path) -> str:
        """The crash invariant; returns 'complete', 'partial' (some shards, no index) or 'empty'."""
        names = listing(out)
        if INDEX in names:
            self.assert_identical(out, allow_lock=True)
            return "complete"
        for n in names:
            if n in (LOCK, JOURNAL) or n.startswith(TMP):
                continue
            assert n in self.ref_files, f"unexpected file {n!r} in OUT"
            assert sha256(out / n) == self.ref_files[n], f"published file {n!r} differs from the reference"
        if JOURNAL in names:
            for f, entry in journal_shards(out).items():
                assert f in names, f"journal lists {f} but it is not in OUT"
                assert sha256(out / f) == self.ref_files[f], f
                st = (out / f).stat()
                assert entry["size"] == st.st_size and entry["mtime_ns"] == st.st_mtime_ns, (f, entry)
                assert entry.get("sha256") in (None, self.ref_files[f]), (f, entry)
        return "partial" if any(n in self.shards for n in names) else "empty"

    def calibrate(self) -> None:
        """Time a full merge and a no-op re-run now (the machine's load changes; the kill delays follow it)."""
        scratch = self.root / "calibrate"
        shutil.rmtree(scratch, ignore_errors=True)
        self.t_full = self.finish(scratch).seconds
        self.t_noop = self.finish(scratch).seconds
        shutil.rmtree(scratch)

    def finish(self, out: Path, *extra: object) -> Child:
        child = self.zygote.start(self.args(out, *extra))
        assert child.wait() == 0, child.stderr
        self.assert_identical(out)
        return child

    def kill_after_journaled(self, out: Path, n: int, label: str) -> None:
        """Start a merge into OUT, SIGKILL it once the journal holds n shards; it must not finish first."""
        child = self.zygote.start(self.args(out))
        wait_for(lambda: journaled(out, n)() or not alive(child.pid), what=f"{n} journaled shard(s)")
        child.signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL, "the merge finished before it could be killed"
        self.kills.append(label)

    def kill_at(self, out: Path, when: Callable[[Child], str], *extra: object) -> str:
        """Start a merge, wait for `when(child)` (which says when it fired), SIGKILL the merge, check the
        invariant. Returns the state OUT was left in, or 'finished' if the merge completed first."""
        child = self.zygote.start(self.args(out, *extra))
        moment = when(child)
        child.signal(signal.SIGKILL)
        rc = child.wait()
        if rc == 0:  # it finished first
            self.assert_identical(out)
            return "finished"
        assert rc == -signal.SIGKILL, f"rc={rc}\n{child.stderr}"
        self.kills.append(f"{out.name}@{moment}")
        return self.check_invariant(out)


def after_seconds(delay: float) -> Callable[[Child], str]:
    def when(child: Child) -> str:
        time.sleep(max(0.0, delay - (time.perf_counter() - child.started)))
        return f"{delay:.3f}s"
    return when


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def shard_bytes_in(out: Path) -> int:
    """Bytes of shards in OUT, published or still being written."""
    n = 0
    for e in os.scandir(out):
        if e.name.endswith(".safetensors") or (e.name.startswith(TMP) and ".safetensors." in e.name):
            try:
                n += e.stat().st_size
            except FileNotFoundError:
                pass
    return n


def after_written(out: Path, target: int) -> Callable[[Child], str]:
    """Once this run has (re)written its journal (so any --fresh cleanup is over) and `target` bytes of shards
    are in OUT: a random point of the output byte stream, the same whatever the machine's load."""
    before = _stamp(out / JOURNAL)

    def when(child: Child) -> str:
        wait_for(lambda: _stamp(out / JOURNAL) not in (None, before) or not alive(child.pid), what="journal")
        wait_for(lambda: not alive(child.pid) or shard_bytes_in(out) >= target, what=f"{target} bytes")
        return f"{target}B"
    return when


def wait_for(cond: Callable[[], bool], timeout: float = 120, what: str = "") -> None:
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.002)


def _state(pid: int) -> str:
    return _state_of(Path(f"/proc/{pid}/stat"))


def _state_of(path: Path) -> str:
    try:
        stat = path.read_text()
    except FileNotFoundError:  # a thread that just ended
        return "X"
    return stat[stat.rindex(")") + 2]


def stopped(pid: int) -> bool:
    """Every thread stopped (a writer thread finishes the write it is in before it stops)."""
    tasks = list(Path(f"/proc/{pid}/task").iterdir())
    return all(_state_of(t / "stat") in "tT" for t in tasks)


def alive(pid: int) -> bool:
    """Still running (a zygote child stays a zombie until reaped, so its pid stays valid)."""
    return _state(pid) not in "ZX"


def journal_shards(out: Path) -> dict:
    """The finished-shard records of OUT's journal (one small file per shard)."""
    journal = load_journal(out)
    return journal.shards if journal else {}


def journaled(out: Path, n: int) -> Callable[[], bool]:
    """At least n shards recorded in OUT's journal."""
    def cond() -> bool:
        try:
            return len(journal_shards(out)) >= n
        except (OSError, ValueError, KeyError):
            return False
    return cond


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("crash")
    (root / "logs").mkdir()
    zygote = Zygote(root / "logs")  # imports torch while we build the inputs and the reference
    try:
        base, adapter = make_pair(root, SHAPE, shard_bytes=SHARD_BYTES)
        ref = root / "ref"
        res = subprocess.run(cli(*["merge", base, adapter, "-o", ref, "--block-size-mb", "1", "--device", "cpu",
                                   "--quiet"]),  # the same command as World.args: the card names it
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        shards = sorted(set(json.loads((ref / INDEX).read_text())["weight_map"].values()))
        assert 8 <= len(shards) <= 12
        w = World(root=root, base=base, adapter=adapter, ref=ref, ref_files=snapshot(ref), shards=shards,
                  zygote=zygote)
        w.calibrate()  # also proves that the zygote's merges are byte-identical to the real CLI's
        yield w
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capman = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capman is not None:
            with capman.global_and_fixture_disabled():
                reporter.write_line(f"\ntest_crash_resume: {len(w.kills)} SIGKILLs landed mid-merge "
                                    f"(full merge {w.t_full:.2f} s, no-op re-run {w.t_noop:.2f} s)")
    finally:
        zygote.close()


# ----------------------------------------------------------------------------------------------------------------
# SIGKILL at random moments


def test_sigkill_at_random_moments_then_resume(world: World) -> None:
    """Two OUT folders, six random kills each, each followed by a re-run to completion. The kills hit a new
    folder, a `--fresh` restart over a complete folder (both at a random byte of the output), and a re-run of
    a complete folder (at a random time: it writes no shard bytes)."""
    rng = random.Random(1234)
    outs = [world.root / "rand-a", world.root / "rand-b"]
    total = sum((world.ref / s).stat().st_size for s in world.shards)
    world.calibrate()  # the no-op re-run's duration under the load of this moment
    seen: dict[str, int] = {}
    kills_before = len(world.kills)
    for i in range(6):
        for j, out in enumerate(outs):
            mode = ("new-folder", "fresh-flag", "rerun-complete")[(i + j) % 3]
            if mode == "new-folder":
                shutil.rmtree(out, ignore_errors=True)
            if mode == "rerun-complete":
                when = after_seconds(rng.uniform(0, world.t_noop))
            else:
                when = after_written(out, int(rng.uniform(0, 1) * total))
            state = world.kill_at(out, when, *(("--fresh",) if mode == "fresh-flag" else ()))
            seen[state] = seen.get(state, 0) + 1
            world.finish(out)
    assert len(world.kills) - kills_before >= 7, seen
    assert seen.get("partial", 0) >= 4, f"too few kills landed while shards were being written: {seen}"


def test_repeated_sigkills_on_one_out_then_finish(world: World) -> None:
    """kill, kill, kill, ... on the same OUT, each run resuming the last, then finish. Kill i lands at a random
    moment after the journal holds i shards, so every run makes some progress whatever the machine's load."""
    rng = random.Random(99)
    out = world.root / "chain"
    world.calibrate()
    per_shard = world.t_full / len(world.shards)
    states = []
    for i in range(1, len(world.shards)):
        child = world.zygote.start(world.args(out))
        wait_for(lambda: journaled(out, i)() or not alive(child.pid), what=f"{i} journaled shards")
        time.sleep(rng.uniform(0, per_shard))
        child.signal(signal.SIGKILL)
        rc = child.wait()
        if rc == 0:
            states.append("finished")
            break
        assert rc == -signal.SIGKILL, f"rc={rc}\n{child.stderr}"
        world.kills.append(f"chain-{i}")
        states.append(world.check_invariant(out))
    world.finish(out)
    assert states.count("partial") >= 6, states


def test_sigkill_real_cli_process_then_resume(world: World) -> None:
    """The literal `python -m stream_merge merge ...` process, SIGKILLed once two shards are journaled."""
    out = world.root / "real-kill"
    proc = subprocess.Popen(cli(*world.args(out)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: journaled(out, 2)() or proc.poll() is not None, what="two journaled shards")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the merge finished before it could be killed"
    world.kills.append("real-cli")
    assert world.check_invariant(out) == "partial"
    res = subprocess.run(cli(*world.args(out)), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    m = RESUMED.search(res.stdout)
    assert m and int(m.group(1)) >= 2, res.stdout
    world.assert_identical(out)


# ----------------------------------------------------------------------------------------------------------------
# SIGINT / SIGTERM, and a write that fails


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_exits_130_cleanly_and_resumes(world: World, sig: int) -> None:
    out = world.root / f"interrupt-{sig.name}"
    # --quiet: no progress lines, so that stderr is the one error line
    proc = subprocess.Popen(cli(*world.args(out, "--quiet")), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: journaled(out, 1)() or proc.poll() is not None, what="the first journaled shard")
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, f"rc={proc.returncode}\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert temps(out) == [], f"temp files left behind: {temps(out)}"
    assert world.check_invariant(out) == "partial"
    m = RESUMED.search(world.finish(out).stdout)
    assert m and int(m.group(1)) >= 1


def test_failing_write_exits_2_naming_the_shard_then_resumes(world: World) -> None:
    """RLIMIT_FSIZE makes one shard's write fail with EFBIG (Python ignores SIGXFSZ)."""
    sizes = [(world.ref / s).stat().st_size for s in world.shards]
    # the first shard that is bigger than every shard before it fails; the ones before it succeed
    fail = next((i for i in range(1, len(sizes)) if sizes[i] > max(sizes[:i])), 0)
    below = max(sizes[:fail]) if fail else 0
    limit = below + (sizes[fail] - below) // 2
    assert limit > 64 * 1024  # the journal and other small files still fit
    out = world.root / "fsize"

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run(cli(*world.args(out, "--quiet")), capture_output=True, text=True, timeout=600,
                         preexec_fn=limit_file_size)  # --quiet: no progress lines before the one error line
    assert res.returncode == 2, f"rc={res.returncode}\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert world.shards[fail] in res.stderr, f"the error does not name {world.shards[fail]}: {res.stderr}"
    assert temps(out) == [], f"temp files left behind: {temps(out)}"
    assert not (out / INDEX).exists()
    assert world.check_invariant(out) in ("partial", "empty")
    assert all((out / s).exists() for s in world.shards[:fail])
    done = world.finish(out)
    assert f"({fail} resumed)" in done.stdout, done.stdout


# ----------------------------------------------------------------------------------------------------------------
# resume semantics


def test_rerun_resumes_finished_shards(world: World) -> None:
    out = world.root / "resume"
    world.kill_after_journaled(out, 3, "resume")
    world.check_invariant(out)
    n_journaled = len(journal_shards(out))
    done = world.finish(out)
    m = RESUMED.search(done.stdout)
    assert m and int(m.group(1)) == n_journaled >= 3, done.stdout


def test_damaged_finished_shards_are_redone(world: World) -> None:
    out = world.root / "damaged"
    shutil.copytree(world.ref, out)
    flipped, cut, gone = world.shards[1], world.shards[4], world.shards[-1]
    data = bytearray((out / flipped).read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit off
    (out / flipped).write_bytes(bytes(data))
    with open(out / cut, "r+b") as f:
        f.truncate((out / cut).stat().st_size - 1)
    (out / gone).unlink()
    done = world.finish(out)
    assert f"({len(world.shards) - 3} resumed)" in done.stdout, done.stdout


def _assert_refused(child: Child, *names: str) -> None:
    rc = child.wait()
    err = child.stderr
    assert rc == 2, f"rc={rc}\n{err}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for n in names:
        assert n in err, f"{n!r} not in {err!r}"


def test_other_inputs_or_options_are_refused_until_fresh(world: World) -> None:
    other = world.root / "other-adapter"
    if not other.exists():
        write_adapter(other, SHAPE, r=4, alpha=6.0, seed=5)
    out = world.root / "mismatch"
    shutil.copytree(world.ref, out)
    before = snapshot(out)
    # a different adapter, and different --weights, into a complete OUT: refused, OUT untouched
    _assert_refused(world.zygote.start(world.args(out, adapter=other)), "--fresh")
    _assert_refused(world.zygote.start(world.args(out, "--weights", "0.5")), "--fresh")
    lock_left = LOCK in listing(out)  # checked last, so that the rest of the test still runs
    assert {n: h for n, h in snapshot(out).items() if n != LOCK} == before
    # ... and into a partial OUT
    partial = world.root / "mismatch-partial"
    world.kill_after_journaled(partial, 2, "mismatch-partial")
    partial_before = {n: h for n, h in snapshot(partial).items() if not n.startswith(TMP) and n != LOCK}
    _assert_refused(world.zygote.start(world.args(partial, adapter=other)), "--fresh")
    assert {n: h for n, h in snapshot(partial).items() if not n.startswith(TMP) and n != LOCK} == partial_before
    world.finish(partial)
    # --fresh starts over with the new options; then the original command is refused again, and --fresh restores
    child = world.zygote.start(world.args(out, "--weights", "0.5", "--fresh"))
    assert child.wait() == 0, child.stderr
    assert (out / INDEX).exists()
    changed = [s for s in world.shards if sha256(out / s) != world.ref_files[s]]
    assert changed, "--weights 0.5 produced the same shards as weight 1.0"
    _assert_refused(world.zygote.start(world.args(out)), "--fresh")
    world.finish(out, "--fresh")
    assert not lock_left, f"a refused run left {LOCK} behind in a complete output folder"


def test_second_concurrent_run_fails_fast_on_the_lock(world: World) -> None:
    out = world.root / "locked"
    first = world.zygote.start(world.args(out))
    try:
        wait_for(lambda: journaled(out, 1)() or not alive(first.pid), what="the first run to hold the lock")
        first.signal(signal.SIGSTOP)  # hold it mid-merge, lock taken
        wait_for(lambda: stopped(first.pid), timeout=30, what="SIGSTOP to take effect")
        before = snapshot(out)
        t0 = time.perf_counter()
        res = subprocess.run(cli(*world.args(out)), capture_output=True, text=True, timeout=120)
        took = time.perf_counter() - t0
        assert res.returncode == 2, f"rc={res.returncode}\n{res.stderr}"
        assert "Traceback" not in res.stderr
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and str(out) in lines[0], res.stderr
        assert took < 60, f"the second run waited {took:.1f} s instead of failing fast"
        assert snapshot(out) == before, "the refused second run changed OUT"
    finally:
        first.signal(signal.SIGCONT)
    assert first.wait() == 0, first.stderr
    world.assert_identical(out)


def dead_owner() -> str:
    """The owner part of temp names of a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{owner_tag().split('-')[0]}-{proc.pid}-abcdef"


def test_stale_temp_files_are_removed(world: World) -> None:
    """Temp files of killed runs of this host are removed by the next run (their owner provably ended)."""
    dead = dead_owner()
    stale = {temp_name(world.shards[0], dead): b"half a shard", temp_name(JOURNAL, dead): b'{"version": 1, "shar'}
    # an otherwise empty OUT holding only stale temp files
    out = world.root / "stale-new"
    out.mkdir()
    for name, data in stale.items():
        (out / name).write_bytes(data)
    world.finish(out)  # assert_identical: no temp file left
    # a partial OUT (after a kill) plus stale temp files
    out = world.root / "stale-partial"
    world.kill_after_journaled(out, 1, "stale-partial")
    for name, data in stale.items():
        (out / name).write_bytes(data)
    record_tmp = out / SHARDS_DIR / temp_name(f"{world.shards[-1]}.json", dead)  # a kill inside a record write
    record_tmp.write_bytes(b'{"size": 1')
    world.finish(out)
    assert not record_tmp.exists()


# ----------------------------------------------------------------------------------------------------------------
# the interrupt window of the atomic writer itself

INTERRUPT_LOOP = r"""
import os, random, shutil, signal, sys, time
from pathlib import Path
from stream_merge.fileio import TMP_PREFIX, AtomicFile, write_file_atomic
root, trials, budget = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rng = random.Random(5)
leaks = []
done = 0
start = time.monotonic()
for i in range(trials):
    if time.monotonic() - start > budget:  # a disk slowed by other writers makes each fsync slow: stop early
        break
    sig = (signal.SIGINT, signal.SIGTERM)[i % 2]
    d = root / f"t{i}"
    d.mkdir()
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        # as in `python -m stream_merge`: SIGINT raises KeyboardInterrupt, and cli.main maps SIGTERM onto it
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        signal.signal(signal.SIGINT, signal.default_int_handler)  # cli.main handles it even if inherited ignored
        os.write(w, b"go")
        try:
            k = 0
            while os.getppid() == parent:  # never outlive a loop killed by a timeout (an orphan fsyncing for ever)
                with AtomicFile(d / f"model-{k % 3}.safetensors") as f:
                    f.write(b"x" * 4096)
                    f.commit()
                write_file_atomic(d / "stream_merge.journal.json", b"{}")
                k += 1
        except KeyboardInterrupt:
            os._exit(130)
        os._exit(1)
    os.close(w)
    os.read(r, 2)
    os.close(r)
    time.sleep(rng.uniform(0.001, 0.01))
    os.kill(pid, sig)
    # Python drops an exception raised while it runs a finalizer ("Exception ignored in ..."), so a signal
    # that lands there is lost and the child writes on: signal it again (a Ctrl-C pressed twice), give up
    # (and count a failure) after 20 s.
    for tick in range(2000):
        if os.waitpid(pid, os.WNOHANG)[0]:
            break
        if tick % 100 == 99:
            os.kill(pid, sig)
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        leaks.append((sig.name, ["the child never exited"]))
    left = sorted(p.name for p in d.iterdir() if p.name.startswith(TMP_PREFIX))
    if left:
        leaks.append((sig.name, left))
    shutil.rmtree(d)
    done += 1
print(f"{len(leaks)} of {done} interrupts left temp files: {leaks[:3]}")
"""


def test_an_interrupt_at_any_moment_leaves_no_temp_file(tmp_path: Path) -> None:
    """Hundreds of SIGINT/SIGTERMs at random moments into a loop of atomic writes (shards and journal). The
    few microseconds between creating the temp file and entering its `with` block must be covered too."""
    res = subprocess.run([sys.executable, "-c", INTERRUPT_LOOP, str(tmp_path), "200", "150"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    leaked, _, done = res.stdout.partition(" of ")
    assert leaked == "0" and int(done.split()[0]) >= 40, res.stdout  # 200 on a quiet disk, in about 7 s
