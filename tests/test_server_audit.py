"""The audit sink and reader: file mode, append-only, crash-safe lines, bounded queue, follow."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from homeport.proto.audit import STREAM, Audit
from homeport.server import audit as au
from homeport.testing.deadline import wait_for


def ev(i: int, kind: str = STREAM) -> Audit:
    return Audit(kind, 1_764_900_000.0 + i, (("src", "laptop"), ("n", str(i))))


def test_lines_are_appended_0600_and_survive_reopen(tmp_path: Path) -> None:
    path = au.audit_path(tmp_path)
    path.write_bytes(b'{"ts": 1, "kind": "old"}\n')
    os.chmod(path, 0o644)  # an existing file is tightened
    sink = au.AuditSink(path)
    for i in range(3):
        sink.submit(ev(i))
    sink.close()
    sink.close()  # idempotent
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = path.read_bytes().splitlines()
    assert lines[0] == b'{"ts": 1, "kind": "old"}'  # never rewritten
    assert [json.loads(x)["n"] for x in lines[1:]] == ["0", "1", "2"]
    assert sink.written == 3 and sink.fsyncs >= 1
    sink2 = au.AuditSink(path)
    sink2.submit(ev(9))
    sink2.close()
    assert [e.get("n") for e in au.read_events(path)] == [None, "0", "1", "2", "9"]


def test_new_file_is_created_0600(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        sink = au.AuditSink(au.audit_path(tmp_path))
        sink.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(au.audit_path(tmp_path).stat().st_mode) == 0o600


def test_each_event_is_on_disk_before_close(tmp_path: Path) -> None:
    """Flushed per event: a reader sees it while the sink is still open (no user buffer)."""
    path = au.audit_path(tmp_path)
    sink = au.AuditSink(path)
    try:
        sink.submit(ev(1))
        wait_for(lambda: len(list(au.read_events(path))) == 1, 5, "the event in the file")
        wait_for(lambda: sink.fsyncs >= 1, 5, "an fsync once the queue ran dry")
    finally:
        sink.close()


def test_fields_cannot_overwrite_ts_or_kind_and_are_bounded(tmp_path: Path) -> None:
    line = au.format_line(
        Audit("stream", 5.0, (("kind", "forged"), ("ts", "0"), ("reason", "x" * 5000)))
    )
    obj = json.loads(line)
    assert (obj["kind"], obj["ts"], obj["field_kind"], obj["field_ts"]) == (
        "stream",
        5.0,
        "forged",
        "0",
    )
    assert len(obj["reason"]) == au.MAX_FIELD
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    hostile = au.format_line(Audit("stream", 5.0, (("src", "a\nb\u2028c"),)))
    assert hostile.count(b"\n") == 1 and hostile.isascii()


def test_torn_and_damaged_lines_are_skipped_by_the_reader(tmp_path: Path) -> None:
    path = au.audit_path(tmp_path)
    good = au.format_line(ev(1)) + au.format_line(ev(2))
    path.write_bytes(good + b"garbage\n[1]\n" + au.format_line(ev(3)) + b'{"ts": 4, "kind": "str')
    stats = au.ReadStats()
    events = list(au.read_events(path, stats))
    assert [e["n"] for e in events] == ["1", "2", "3"]
    assert stats.skipped == 2
    assert stats.offset == path.stat().st_size - len(b'{"ts": 4, "kind": "str')
    # the server (restarted after the crash) appends after the torn line: the reader loses
    # only the torn record, never the next one
    sink = au.AuditSink(path)
    sink.submit(ev(5))
    sink.close()
    assert [e.get("n") for e in au.read_events(path)] == ["1", "2", "3", "5"]


def test_full_queue_drops_counts_and_records_the_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(au, "MAX_QUEUE", 4)
    gate = threading.Event()
    path = au.audit_path(tmp_path)

    class Stalled(au.AuditSink):
        def _write(self, line: bytes) -> None:
            gate.wait(10)  # a disk that hangs
            super()._write(line)

    sink = Stalled(path)
    try:
        for i in range(20):
            sink.submit(ev(i))  # never blocks, even with the writer stuck
        assert sink.dropped_total >= 20 - 4 - 1  # one may be in the writer's hands
    finally:
        gate.set()
        sink.close()
    kinds = [e["kind"] for e in au.read_events(path)]
    assert kinds.count(au.DROPPED) == 1
    dropped = next(e for e in au.read_events(path) if e["kind"] == au.DROPPED)
    assert int(dropped["count"]) == sink.dropped_total
    assert kinds.count(STREAM) + sink.dropped_total == 20


def test_fsync_at_least_every_interval_under_load(tmp_path: Path) -> None:
    ticks = iter(range(1000))
    clock = lambda: float(next(ticks)) * 0.6  # noqa: E731 - each look at the clock is 0.6 s later
    gate = threading.Event()

    class Slow(au.AuditSink):
        def _write(self, line: bytes) -> None:
            gate.wait(10)
            super()._write(line)

    sink = Slow(au.audit_path(tmp_path), clock=clock)
    for i in range(6):
        sink.submit(ev(i))
    gate.set()
    sink.close()
    # the queue never ran dry until the end, yet the clock forced syncs on the way
    assert sink.fsyncs >= 4  # 2 forced by the clock, 1 when the queue ran dry, 1 on close


def test_follow_sees_appends_and_completes_a_partial_line(tmp_path: Path) -> None:
    path = au.audit_path(tmp_path)
    path.write_bytes(au.format_line(ev(1)))
    stats = au.ReadStats()
    assert [e["n"] for e in au.read_events(path, stats)] == ["1"]
    line2 = au.format_line(ev(2))
    got: list[str] = []
    polls: list[float] = []

    def sleep(s: float) -> None:  # the poll: called with the bound, drives the writer
        polls.append(s)
        if len(polls) == 1:
            with open(path, "ab") as f:
                f.write(line2[:10])  # a write in progress
        elif len(polls) == 2:
            with open(path, "ab") as f:
                f.write(line2[10:] + au.format_line(ev(3)))

    for e in au.follow(path, stats, until=lambda: len(got) == 2 or len(polls) > 10, sleep=sleep):
        got.append(e["n"])
    assert got == ["2", "3"]
    assert all(p == au.FOLLOW_POLL for p in polls)


def test_follow_starts_over_when_the_file_was_replaced(tmp_path: Path) -> None:
    path = au.audit_path(tmp_path)
    path.write_bytes(au.format_line(ev(1)) * 5)
    stats = au.ReadStats()
    list(au.read_events(path, stats))
    path.write_bytes(au.format_line(ev(7)))
    got = list(au.follow(path, stats, until=lambda: stats.offset == path.stat().st_size))
    assert [e["n"] for e in got] == ["7"]


def test_render_quotes_values_that_need_it() -> None:
    text = au.render({"ts": 0.0, "kind": "stream", "src": "lap top", "dst": "labpc", "x": ""})
    assert text == '1970-01-01 00:00:00 UTC stream src="lap top" dst=labpc x=""'
