"""Merge a Hub base shard while it downloads.

Without this, an output shard starts only once its base shard is downloaded and its sha256 checked, so every
Hub merge pays one whole shard's merge after its download, and a push pays it again before each upload. Here
the reader of a shard that is still downloading reads the partial file huggingface_hub is writing, each read
waiting until `hub_follow.PartialFollower` has hashed the bytes it needs (they are then in the file and final).

Nothing unchecked is ever published: before an output shard is fsynced and renamed (`confirm`, called by the
shard loop) the reader waits for the download's verdict, and accepts the bytes it read only when the verdict is
the sha256 of those very bytes, followed as they arrived in the one file it read (`PartialFollower.streamed`).
A failed or retried download, a digest only matched by a second pass over the file, or a download that never
showed a partial file (then nothing was read early) make the shard loop write the shard again from the checked
file (`RedoFromFile`), which is how it always worked.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from pathlib import Path

from .errors import RedoFromFile
from .hub_follow import PartialFollower
from .records import ShardHeader
from .safetensors_io import ShardReader

_POLL_S = 0.02


class ShardStream:
    """One base shard on its way: the download's result (the checked file) and the follower of the attempt in
    progress, set by the downloader and read by `StreamedShardReader`."""

    def __init__(self, file: str, result: Future[Path]) -> None:
        self.file = file
        self.result = result
        self.follower: PartialFollower | None = None    # the current attempt's (a retry sets a new one)
        self.verified_by: PartialFollower | None = None  # whose streamed hash the checked file matched

    def attempt(self, follower: PartialFollower | None) -> None:
        """A download attempt starts (follower None: it is not followed, so it cannot be read early)."""
        self.follower = follower

    def verified(self, follower: PartialFollower | None) -> None:
        """The downloaded file's digest matched; from the bytes `follower` handed out, when it says so."""
        self.verified_by = follower if follower is not None and follower.streamed else None

    def wait_start(self, abandoned: threading.Event) -> tuple[PartialFollower, int] | None:
        """The follower of a download that has started writing, with a descriptor of its partial file of our own,
        or None once the download has ended (then the checked file is read as a plain file). A follower closed as
        we come (its attempt ended) is passed over for the next attempt's or the result. Raises RedoFromFile when
        `abandoned`."""
        while not self.result.done():
            follower = self.follower
            if follower is not None and follower.opened.is_set():
                fd = follower.dup()
                if fd is not None:
                    return follower, fd
            if abandoned.wait(_POLL_S):
                raise RedoFromFile(self.file)
        return None


class StreamedShardReader(ShardReader):
    """A `ShardReader` of a base shard that may still be downloading (see the module). Reads wait for their
    bytes; a download that is already over, or ends before the first read, is read as a plain checked file."""

    def __init__(self, stream: ShardStream, header: ShardHeader) -> None:
        self.path = Path(stream.file)
        self.header = header
        self._stream = stream
        self._fd = -1
        self._leased = False
        self._follower: PartialFollower | None = None
        self._plain: ShardReader | None = None
        self._abandoned = threading.Event()
        self._attach_lock = threading.Lock()

    def _attach(self) -> None:
        with self._attach_lock:
            if self._fd >= 0 or self._plain is not None:
                return
            started = self._stream.wait_start(self._abandoned)
            if started is None:  # over: the checked file, with every check of a local file
                self._plain = ShardReader(self._stream.result.result(), self.header)
                self.path, self._fd = self._plain.path, self._plain._fd
                return
            self._follower, self._fd = started

    def _ready(self, start: int, end: int) -> None:
        if not self._follower.wait_for(end, self._abandoned):  # type: ignore[union-attr]
            raise RedoFromFile(self._stream.file)

    def view(self, data_offset: int, nbytes: int) -> memoryview:
        """As `ShardReader.view`, but a copy while the download runs: huggingface_hub truncates its partial file
        when a resumed request is answered from the start, and a map of a truncated file faults (SIGBUS)."""
        if self._fd < 0:
            self._attach()
        if self._plain is not None:
            return self._plain.view(data_offset, nbytes)
        if self._settled():
            return super().view(data_offset, nbytes)
        buf = bytearray(max(nbytes, 0))
        if buf:
            self.read_into(data_offset, memoryview(buf))
        return memoryview(buf)

    def _settled(self) -> bool:
        """The download is over and vouches for the bytes of our descriptor: reading is as from a local file."""
        return self._follower is not None and self._stream.result.done() and self._stream.verified_by is self._follower

    def _pread(self, pos: int, buf: memoryview) -> None:
        if self._fd < 0:
            self._attach()
        if self._plain is not None:
            return self._plain._pread(pos, buf)
        self._ready(pos, pos + len(buf))
        done = 0
        while done < len(buf):
            got = os.preadv(self._fd, [buf[done:]], pos + done)
            if got == 0:  # truncated under us (a restarted download): the digest will not vouch for it
                raise RedoFromFile(self._stream.file)
            done += got

    def check_unchanged(self) -> None:
        """A download in progress is checked by its digest at `confirm`; a plain file as any local file."""
        if self._plain is not None:
            self._plain.check_unchanged()

    def confirm(self) -> None:
        """Wait for the download's verdict; raise RedoFromFile unless it vouches for the bytes read."""
        if self._follower is None:
            return  # nothing read, or read from the checked file
        self._stream.result.result()  # the download's own error, if it failed
        if self._stream.verified_by is not self._follower:
            raise RedoFromFile(self._stream.file)

    def abandon(self) -> None:
        self._abandoned.set()

    def close(self) -> None:
        self._abandoned.set()
        with self._attach_lock:
            if self._plain is not None:
                self._plain.close()
            elif self._fd >= 0:
                os.close(self._fd)
            self._plain, self._fd = None, -1
