"""SSH through homeport, side by side with direct ssh and the classic reverse tunnel.

Run from the repository root::

    python -m bench.ssh_paths                          # 1 GiB, 20 set-up runs -> docs/benchmarks.md
    python -m bench.ssh_paths --quick --out /tmp/b.md  # 64 MiB, 5 set-up runs: development

Everything runs on 127.0.0.1 inside one temporary directory, which is removed
at the end, and every process the benchmark starts is stopped by its PID:

* a *target* sshd (the lab PC's) and a *bastion* sshd (the VPS of the classic
  set-up), both from :func:`homeport.testing.sshd.make_sshd`;
* the reverse tunnel "the target" keeps to the bastion:
  ``ssh -N -R 127.0.0.1:RPORT:127.0.0.1:<target sshd> bastion``;
* a homeport server, an agent ``labpc`` exposing the target sshd, a raw TCP
  sink and a close-at-once service, and a client node ``laptop``;
* a raw TCP sink (:mod:`bench.tcp_endpoints`), ``ssh -N -L`` to it and
  ``homeport forward`` to it.

It measures (1) bulk ``cat FILE | ssh HOST 'cat > /dev/null'``, (2) set-up
``ssh HOST true``, each three ways (direct, homeport ProxyCommand, ProxyJump
through the reverse tunnel), (3) a raw TCP stream through ``homeport forward``
and ``ssh -L``, (4) the homeport processes' CPU per GiB during (1) and (3),
and (5) ``homeport nc`` start-up against OpenBSD ``nc``; then prints the
results next to the targets and writes them, with the machine facts and the
exact commands, to ``--out``.

Options: ``--size-mib`` (bulk and raw-stream size, 1024), ``--setup-runs``
(``ssh true`` and start-up runs, 20, after one warm-up), ``--repeats`` (bulk and
raw-stream runs per path, 3; paths interleaved, rotating who goes first),
``--out`` and ``--quick`` (64 MiB, 5 set-up runs, 1 repeat).

If homeport does not work, its rows say ``failed: <reason>`` and the rest is
still measured.  ``BENCH_HOMEPORT_ARGV`` (a command prefix replacing
``python -m homeport``) exists only to test this harness against a stand-in; the
report is then stamped with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from bench.lab import (
    HP_OVERRIDE,
    MIB,
    REPO,
    BenchError,
    Lab,
    Procs,
    free_port,
    log,
    start_endpoints,
    start_homeport,
    start_reverse_tunnel,
    sweep_leftovers,
    write_random_file,
    write_ssh_config,
)
from bench.phases import (
    ForeignLoad,
    Results,
    phase_bulk,
    phase_ciphers,
    phase_interactive,
    phase_raw,
    phase_setup,
    phase_startup,
    results_json,
)
from bench.report import machine_facts, render
from homeport.testing.sshd import make_sshd, sshd_available

# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ssh_paths",
        description="ssh bulk/set-up, raw stream and relay CPU: direct vs homeport vs "
        "reverse tunnel, on loopback.",
    )
    parser.add_argument("--size-mib", type=int, default=None, help="bulk and raw size (1024)")
    parser.add_argument("--setup-runs", type=int, default=None, help="ssh true / nc runs (20)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="bulk and raw-stream runs per path, interleaved (3)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument(
        "--quick", action="store_true", help="development mode: 64 MiB, 5 set-up runs, 1 repeat"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the measurements here (JSON)"
    )
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="JSON of an earlier run (--json) on this machine: shown as the baseline",
    )
    args = parser.parse_args(argv)
    args.before_doc = json.loads(args.before.read_text()) if args.before else None
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.size_mib is None:
        args.size_mib = 64 if args.quick else 1024
    if args.setup_runs is None:
        args.setup_runs = 5 if args.quick else 20
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.size_mib < 1 or args.setup_runs < 1 or args.repeats < 1:
        parser.error("--size-mib, --setup-runs and --repeats must be positive")
    return args


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the cleanup in ``finally`` always runs."""

    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ok, why = sshd_available()
    if not ok:
        log(f"cannot run: {why}")
        return 2
    if shutil.which("nc") is None:
        log("cannot run: nc (netcat-openbsd) not found")
        return 2
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    load_before = os.getloadavg()
    facts = machine_facts()
    tmp = Path(tempfile.mkdtemp(prefix="homeport-bench-"))
    (tmp / "logs").mkdir()
    procs = Procs(tmp / "logs")
    target = make_sshd(tmp / "target-sshd")
    bastion = make_sshd(tmp / "bastion-sshd")
    rport = free_port()
    lab = Lab(
        tmp=tmp,
        procs=procs,
        cfg=write_ssh_config(tmp, target, bastion, rport),
        target=target,
        bastion=bastion,
        data_file=tmp / "data.bin",
        size=args.size_mib * MIB,
        rport=rport,
    )
    lab.cfg_text = lab.cfg.read_text()
    res = Results()
    monitor = ForeignLoad(tmp)
    res.load = monitor
    try:
        monitor.start()
        with terminate_as_interrupt():
            log(f"temp dir {tmp}; writing {args.size_mib} MiB of random data")
            write_random_file(lab.data_file, lab.size)
            target.start()
            bastion.start()
            start_endpoints(lab)
            start_reverse_tunnel(lab)
            try:
                start_homeport(lab)
                log("homeport: server, agent and client node are up")
            except (BenchError, OSError, subprocess.TimeoutExpired) as exc:
                lab.hp_error = str(exc)
                log(f"homeport set-up failed: {exc}")
            monitor.phase("ciphers")
            phase_ciphers(lab, res)
            monitor.phase("start-up")
            phase_startup(lab, res, args.setup_runs)
            monitor.phase("ssh true")
            phase_setup(lab, res, args.setup_runs)
            monitor.phase("interactive")
            phase_interactive(lab, res)
            monitor.phase("bulk")
            phase_bulk(lab, res, args.repeats)
            monitor.phase("raw stream")
            phase_raw(lab, res, args.repeats)
            monitor.stop()
            for name in monitor.disturbed():
                log(f"other processes were busy during {name}")
            summary, doc = render(
                lab,
                res,
                args,
                facts,
                (load_before, os.getloadavg()),
                started,
                time.monotonic() - t0,
            )
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        monitor.stop()
        procs.stop_all()
        target.stop()
        bastion.stop()
        res.leftovers = sweep_leftovers(tmp)
        if res.leftovers:
            log(f"killed stray processes: {res.leftovers}")
        shutil.rmtree(tmp, ignore_errors=True)
    if res.leftovers:
        # Re-render so the document mentions them.
        summary, doc = render(
            lab, res, args, facts, (load_before, os.getloadavg()), started, time.monotonic() - t0
        )
    if HP_OVERRIDE:
        print(f"WARNING: homeport replaced by {HP_OVERRIDE!r} (BENCH_HOMEPORT_ARGV)\n")
    print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(doc)
    if args.json is not None:
        meta = {
            "commit": dict(facts).get("repository", "?"),
            "started": f"{started:%Y-%m-%d %H:%M} UTC",
            "argv": shlex.join(["python", "-m", "bench.ssh_paths", *args.argv]),
        }
        args.json.write_text(json.dumps(results_json(res, meta), indent=1))
        log(f"wrote {args.json}")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
