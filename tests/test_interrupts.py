"""A Ctrl-C or SIGTERM that Python drops (it arrived inside a weakref callback or a `__del__`) still stops the
merge at its next safe point, and prints no "Exception ignored" traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from stream_merge import interrupts


def test_a_signal_dropped_inside_a_finalizer_is_raised_again_by_check() -> None:
    code = textwrap.dedent("""
        import os, signal, sys
        from stream_merge import interrupts
        restore = interrupts.install()

        class Finalized:
            def __del__(self):  # the signal's KeyboardInterrupt is raised in here, where Python drops it
                os.kill(os.getpid(), signal.SIGTERM)

        Finalized()
        print("still running", flush=True)
        try:
            interrupts.check()
        except KeyboardInterrupt:
            print("stopped at the safe point", flush=True)
        restore()
        interrupts.check()  # forgotten once restored
        print("restored", flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["still running", "stopped at the safe point", "restored"]
    assert r.stderr == ""  # no "Exception ignored in ..." traceback


def test_check_is_silent_without_a_request_and_other_errors_still_reach_the_hook() -> None:
    interrupts.check()
    code = textwrap.dedent("""
        from stream_merge import interrupts
        interrupts.install()

        class Broken:
            def __del__(self):
                raise ValueError("a real bug in a finalizer")

        Broken()
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ValueError: a real bug in a finalizer" in r.stderr  # only dropped interrupts are hidden


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_writer_refuses_more_work_once_an_interrupt_was_asked(sig: int) -> None:
    import threading

    from stream_merge.compute import BufferPool
    from stream_merge.worker import _Writer

    restore = interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)  # the handler raises right here, and records the request
        class Sink:
            def write(self, data: memoryview) -> None:
                raise AssertionError("nothing is written after an interrupt")
        pool = BufferPool(16, 2)
        writer = _Writer(Sink(), pool, lambda n: None, bound=2)  # type: ignore[arg-type]
        with pytest.raises(KeyboardInterrupt):
            writer.submit(pool.get(16), 16)
        writer.stop()
        assert not writer.thread.is_alive() and threading.current_thread() is threading.main_thread()
    finally:
        restore()
    interrupts.check()  # the request is forgotten with the handlers
