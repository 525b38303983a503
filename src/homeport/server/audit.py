"""The audit log: an append-only JSON Lines file, ``audit.jsonl`` in the server data dir.

Why a file of its own, not the database or the process log: an audit record must
outlive both a rewritten database row (a removed node, a revoked key) and a log
level or rotation setting, and people read it with ``homeport audit``, ``jq`` or
``grep`` long after the fact. One event is one line::

    {"ts": 1764906758.1, "kind": "stream", "src": "laptop", "dst": "labpc", ...}

``ts`` and ``kind`` come first and are never overwritten by an event's fields;
the kinds are :mod:`homeport.proto.audit`'s stable strings.

How it is written (:class:`AuditSink`): the coordinator's :class:`Audit`
commands are executed on the event loop, which must never wait for a disk, so
``submit`` only puts the record on a bounded queue (:data:`MAX_QUEUE`) and a
writer thread appends it with one ``write(2)`` on an ``O_APPEND`` descriptor
(flushed per event: nothing sits in a user-space buffer, so a crash of the
server loses nothing already written, and a torn last line is the worst a
power cut leaves). The file is fsynced at least every :data:`FSYNC_INTERVAL`
seconds while events arrive, when the queue runs dry, and on close. When the
queue is full (a disk that stalls for long) events are dropped, counted, and
the count is itself written as an ``audit-dropped`` line once there is room:
the log says that it has a gap rather than silently having one.

How it is read (:func:`read_events`, :func:`follow`): line by line, skipping a
last line without its newline (a write in progress or torn by a crash) and any
line that is not a JSON object (counted, never fatal). ``follow`` polls the
file every :data:`FOLLOW_POLL` seconds and reads at most :data:`MAX_READ` bytes
per poll.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from homeport.node.files import open_append
from homeport.proto.audit import Audit

log = logging.getLogger("homeport.audit")

AUDIT_FILE = "audit.jsonl"
AUDIT_MODE = 0o600
#: Records waiting for the writer thread; past this, events are dropped and counted.
MAX_QUEUE = 10_000
#: Seconds between fsyncs while events keep arriving (also done when the queue runs dry).
FSYNC_INTERVAL = 1.0
#: Characters kept of one field value (names, reasons: all short; a cap against abuse).
MAX_FIELD = 1024
#: Longest line the reader accepts; a longer one is skipped as damaged.
MAX_LINE = 64 * 1024
#: Bytes ``follow`` reads per poll, and seconds between polls.
MAX_READ = 1024 * 1024
FOLLOW_POLL = 0.25
#: The kind of the line that records how many events a full queue dropped.
DROPPED = "audit-dropped"
_RESERVED = ("ts", "kind")


def audit_path(data_dir: Path) -> Path:
    return data_dir / AUDIT_FILE


def format_line(ev: Audit) -> bytes:
    """One JSON line for ``ev`` (ASCII; ``ts`` and ``kind`` first and never overwritten)."""
    obj: dict[str, Any] = {"ts": round(ev.now, 3), "kind": ev.kind}
    for key, value in ev.fields:
        name = f"field_{key}" if key in _RESERVED else key
        obj[name[:64]] = str(value)[:MAX_FIELD]
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def _open_append(path: Path) -> int:
    """Open ``path`` for appending, creating it 0600 (never through a symlink: node.files)."""
    return open_append(path, AUDIT_MODE)


def _end_torn_line(fd: int) -> None:
    """Terminate a last line a crash left without its newline, so the next event is whole.

    The torn record stays unreadable (the reader skips it); without this, the
    first event after a restart would be glued to it and lost too.
    """
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")


def append_now(path: Path, ev: Audit) -> None:
    """Append one event synchronously and fsync it (offline admin commands: no server runs)."""
    fd = _open_append(path)
    try:
        _end_torn_line(fd)
        os.write(fd, format_line(ev))
        os.fsync(fd)
    finally:
        os.close(fd)


_STOP = object()


class AuditSink:
    """Appends audit events from any thread without ever blocking the caller.

    ``clock`` is monotonic time for the fsync schedule (a test can replace it).
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._queue: queue.Queue[object] = queue.Queue(maxsize=MAX_QUEUE)
        self._fd = _open_append(path)
        _end_torn_line(self._fd)
        self._lock = threading.Lock()
        self._dropped = 0  # not yet reported in the file
        #: Totals for logs and tests.
        self.written = 0
        self.dropped_total = 0
        self.fsyncs = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="homeport-audit", daemon=True)
        self._thread.start()

    def submit(self, ev: Audit) -> None:
        """Queue ``ev`` (never blocks: a full queue drops it and counts the drop)."""
        if self._closed:
            return
        try:
            self._queue.put_nowait(ev)
        except queue.Full:
            with self._lock:
                self._dropped += 1
                self.dropped_total += 1
                first = self._dropped == 1
            if first:
                log.warning("audit queue full (%d events): dropping events", MAX_QUEUE)

    def close(self) -> None:
        """Write what is queued, fsync, close the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)  # blocks only while the writer drains a full queue
        self._thread.join()
        self._sync()
        os.close(self._fd)

    # -- the writer thread -------------------------------------------------------------
    def _run(self) -> None:
        """Write each event as it comes; fsync when the queue runs dry or a second passed."""
        last_sync = self._clock()
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if not isinstance(item, Audit):
                continue
            self._write(format_line(item))
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                self._write(format_line(Audit(DROPPED, time.time(), (("count", str(dropped)),))))
            if self._queue.empty() or self._clock() - last_sync >= FSYNC_INTERVAL:
                self._sync()
                last_sync = self._clock()

    def _write(self, line: bytes) -> None:
        try:
            view = memoryview(line)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            self.written += 1
        except OSError as exc:  # a full disk: the event is lost, the server goes on
            log.error("cannot write the audit log %s: %s", self.path, exc)

    def _sync(self) -> None:
        try:
            os.fsync(self._fd)
            self.fsyncs += 1
        except OSError as exc:
            log.error("cannot fsync the audit log %s: %s", self.path, exc)


# -- reading --------------------------------------------------------------------------


@dataclass
class ReadStats:
    """What a reader skipped (damaged lines) and where it stopped (for ``follow``)."""

    offset: int = 0
    skipped: int = 0


def _parse(line: bytes, stats: ReadStats) -> dict[str, Any] | None:
    if len(line) > MAX_LINE:
        stats.skipped += 1
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        stats.skipped += 1
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        stats.skipped += 1
        return None
    if not isinstance(obj.get("ts"), int | float):
        stats.skipped += 1
        return None
    return obj


def parse_chunk(data: bytes, stats: ReadStats) -> tuple[list[dict[str, Any]], bytes]:
    """Events in the complete lines of ``data``; returns them and the unfinished tail."""
    *lines, tail = data.split(b"\n")
    events = [e for e in (_parse(ln, stats) for ln in lines if ln.strip()) if e is not None]
    return events, tail


def read_events(path: Path, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Every complete event in ``path``, in file order; ``stats.offset`` ends after the last.

    A last line without its newline is left out (a write in progress, or torn by
    a crash): ``follow`` picks it up once it is complete.
    """
    stats = stats if stats is not None else ReadStats()
    with open(path, "rb") as f:
        tail = b""
        while chunk := f.read(MAX_READ):
            events, tail = parse_chunk(tail + chunk, stats)
            stats.offset += len(chunk)
            yield from events
            if len(tail) > MAX_LINE:  # a damaged giant line: skip to its end
                stats.skipped += 1
                tail = b""
        stats.offset -= len(tail)


def follow(
    path: Path,
    stats: ReadStats,
    *,
    poll: float = FOLLOW_POLL,
    until: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[dict[str, Any]]:
    """Events appended after ``stats.offset``, polling every ``poll`` seconds until ``until()``.

    Reads at most :data:`MAX_READ` bytes per poll; a file that shrank (replaced
    or truncated by an operator) is read again from its start.
    """
    while not until():
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = 0
        if size < stats.offset:
            stats.offset = 0
        if size == stats.offset:
            sleep(poll)
            continue
        with open(path, "rb") as f:
            f.seek(stats.offset)
            data = f.read(MAX_READ)
        events, tail = parse_chunk(data, stats)
        used = len(data) - len(tail)
        if used == 0 and len(tail) >= MAX_LINE:  # no newline in a whole read: damaged
            stats.skipped += 1
            used = len(data)
        stats.offset += used
        yield from events
        if used == 0:
            sleep(poll)


def since_filter(events: Iterator[dict[str, Any]], since: float | None) -> Iterator[dict[str, Any]]:
    """Events at or after unix time ``since`` (None: all)."""
    for ev in events:
        if since is None or float(ev["ts"]) >= since:
            yield ev


def render(ev: dict[str, Any]) -> str:
    """One human line: UTC time, kind, then ``key=value`` fields (values quoted if needed)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(ev["ts"])))
    parts = [when, str(ev["kind"])]
    for key, value in ev.items():
        if key in _RESERVED:
            continue
        text = str(value)
        if not text or any(c.isspace() or c in "\"'\\" for c in text) or not text.isprintable():
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)
