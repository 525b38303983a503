"""Client commands: status, nc, ssh, ssh-config, forward, service (``up`` is in agent.cli).

Heavy modules (asyncio, the agent, ``cryptography`` via enrollment) are
imported inside the command functions so ``homeport --help`` stays quick;
``homeport nc`` never even gets here (``__main__`` dispatches it first).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

STATE_HELP = "state directory (env HOMEPORT_STATE, default ~/.local/state/homeport)"


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"homeport: {message}", err=True)
    sys.exit(code)


def _state_dir(state: str | None) -> Path:
    from homeport.node.state import resolve_dir

    return resolve_dir(state)


def _load(state: str | None) -> Any:
    from homeport.node import state as node_state

    try:
        return node_state.load(_state_dir(state))
    except node_state.StateError as exc:
        _fail(str(exc))


# -- status ---------------------------------------------------------------------


def _netmap(st: Any, welcome: list[Any] | None = None) -> Any:
    from homeport.io.dial import DialError, request_netmap

    try:
        return request_netmap(st, welcome=welcome)
    except DialError as exc:
        _fail(f"cannot get the network map from {st.server}: {exc.message}")


@click.command()
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def status(state: str | None, as_json: bool) -> None:
    """Show the network's nodes: online, last seen, services, path."""
    from homeport.client import status as st_mod

    st = _load(state)
    welcome: list[Any] = []
    nm = _netmap(st, welcome)
    me = st_mod.self_status(welcome[0] if welcome else None)
    shields = st_mod.shields_up(st.dir)
    agent = _agent_query(st.dir, "status")  # the agent holds the paths; None: not running
    paths = {p["node_id"]: p for p in agent.get("peers", [])} if agent else {}
    if as_json:
        extra: dict[str, Any] = {"shields_up": shields, "agent_running": agent is not None}
        if agent:
            extra["direct"] = {
                k: agent.get(k) for k in ("direct_port", "nat", "nat_reason", "candidates")
            }
            extra["counters"] = agent.get("counters", {})
        click.echo(
            json.dumps({**st_mod.to_json(nm, paths=paths), **me.as_json(), **extra}, indent=2)
        )
    else:
        if shields:
            click.echo(st_mod.SHIELDS_UP_LINE)
        click.echo(st_mod.render_table(nm, paths=paths), nl=False)
        for line in me.warnings:
            click.echo(f"warning: {line}", err=True)


def _agent_query(state_dir: Path, op: str, dst: str = "", timeout: float = 5.0) -> Any:
    """The local agent's answer to a query (:func:`homeport.io.localapi.query`), None if none."""
    from homeport.io.localapi import query

    try:
        ans = query(state_dir, op, dst, timeout)
    except (OSError, ValueError):
        return None
    if ans is not None and ans.get("ok") is not True and ans.get("code") == "unknown-op":
        return None  # an older agent
    return ans


@click.command()
@click.argument("name")
@click.option("--count", "-c", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--timeout", type=float, default=3.0, show_default=True, metavar="S")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per probe")
def ping(name: str, count: int, timeout: float, state: str | None, as_json: bool) -> None:
    """Probe NAME through the path streams take now; stops once a probe went direct."""
    import time

    from homeport.client import ping as ping_mod

    st = _load(state)
    got_pong = False
    for i in range(count):
        if i:
            time.sleep(ping_mod.INTERVAL)  # pacing between probes, as ping(8)
        ans = _agent_query(st.dir, "ping", name, timeout)
        if ans is None:
            _fail("no local agent answers: run 'homeport up' first (ping asks it)")
        got_pong = got_pong or ans.get("ok") is True
        if as_json:
            click.echo(json.dumps({"seq": i + 1, "peer": name, **ans}))
        else:
            click.echo(ping_mod.probe_line(name, ans))
        if ping_mod.is_direct(ans):
            return
    if not got_pong:
        sys.exit(1)


@click.command()
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def netcheck(state: str | None, as_json: bool) -> None:
    """Measure this node's network: server reachability and latency, NAT mapping, port mapping."""
    from homeport.client import netcheck as nc_mod

    st = _load(state)
    ans = _agent_query(st.dir, "netcheck", "", 10.0)
    if ans is None:
        _fail("no local agent answers: run 'homeport up' first (netcheck runs in it)")
    if ans.get("ok") is not True:
        _fail(f"netcheck: {ans.get('message') or ans.get('code')}")
    if as_json:
        click.echo(json.dumps(ans, indent=2))
    else:
        click.echo(nc_mod.render(ans), nl=False)


# -- nc / ssh / ssh-config --------------------------------------------------------


@click.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def nc(args: tuple[str, ...]) -> None:
    """ssh ProxyCommand: homeport nc [--state DIR] HOST PORT."""
    from homeport.client.nc import main

    sys.exit(main(list(args)))


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.argument("name")
@click.argument("ssh_args", nargs=-1, type=click.UNPROCESSED)
def ssh(state: str | None, name: str, ssh_args: tuple[str, ...]) -> None:
    """Run the system ssh to NAME through homeport (extra args go to ssh)."""
    from homeport.client.ssh import exec_ssh

    st = _load(state)
    try:
        exec_ssh(name, list(ssh_args), st.dir)
    except OSError as exc:
        _fail(f"cannot run ssh: {exc.strerror or exc}")


@click.command("ssh-config")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.argument("names", nargs=-1)
def ssh_config(state: str | None, as_json: bool, names: tuple[str, ...]) -> None:
    """Print a Host block for ~/.ssh/config (all other nodes, or NAMES)."""
    from homeport.client.ssh import ssh_config_block, ssh_config_json

    st = _load(state)
    hosts = list(names)
    if not hosts:
        nm = _netmap(st)
        hosts = sorted(n.name for n in nm.nodes if n.node_id != nm.self_id)
    if as_json:
        click.echo(ssh_config_json(hosts, st.dir))
    else:
        click.echo(ssh_config_block(hosts, st.dir), nl=False)


# -- forward --------------------------------------------------------------------


@click.command()
@click.option("--bind", default="127.0.0.1", show_default=True, help="local address to listen on")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.argument("local_port", type=click.IntRange(0, 65535), metavar="LOCALPORT")
@click.argument("target", metavar="NODE:PORT|NODE:SERVICE")
def forward(bind: str, state: str | None, as_json: bool, local_port: int, target: str) -> None:
    """Listen on LOCALPORT; tunnel each connection to NODE's PORT or SERVICE."""
    from homeport.client.forward import Forwarder, parse_target, printer

    try:
        spec = parse_target(target)
    except ValueError as exc:
        _fail(str(exc), 2)
    st = _load(state)
    report = printer(as_json)
    try:
        fwd = Forwarder(st, spec, bind, local_port, report=report)
    except OSError as exc:
        _fail(f"cannot listen on {bind}:{local_port}: {exc.strerror or exc}")
    host, port = fwd.address
    report({"event": "listening", "listen": f"{host}:{port}", "to": target})
    try:
        fwd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        fwd.stop()


# -- trust ----------------------------------------------------------------------


@click.group()
def trust() -> None:
    """The node ids and ssh host keys this machine pinned for its peers."""


@trust.command("list")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def trust_list(state: str | None, as_json: bool) -> None:
    """Show each pinned peer: node id, host key fingerprints, pinned since."""
    import time

    from homeport.node import hostkeys

    pins = hostkeys.list_pins(_state_dir(state))
    if as_json:
        click.echo(json.dumps({"pins": [p.to_json() for p in pins]}, indent=2))
        return
    if not pins:
        click.echo("no pinned peers yet (the first connection to a peer pins it)")
        return
    for p in pins:
        since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(p.since))
        node = p.node_id or "(adopted from known_hosts; node id pinned on next use)"
        click.echo(f"{p.name}  node {node}  since {since}")
        for k in p.host_keys:
            click.echo(f"    {hostkeys.fingerprint(k)}")


@trust.command("reset")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.argument("name")
def trust_reset(state: str | None, name: str) -> None:
    """Forget NAME's pin: the next connection trusts (and pins) what the server says."""
    from homeport.node import hostkeys

    try:
        found = hostkeys.reset_pin(_state_dir(state), name)
    except ValueError as exc:
        _fail(str(exc), 2)
    except OSError as exc:
        _fail(f"cannot forget {name}: {exc.strerror or exc}")
    if not found:
        _fail(f"nothing pinned for {name}")
    click.echo(f"forgot the pin for {name}; the next connection pins what it finds")


# -- service --------------------------------------------------------------------


@click.group()
def service() -> None:
    """Run homeport under systemd."""


@service.command("install")
@click.option("--server", "is_server", is_flag=True, help="install the server, not the agent")
@click.option("--print", "print_only", is_flag=True, help="only print the unit")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--data", metavar="DIR", help="server data directory (with --server)")
@click.option("--listen", default="0.0.0.0:8443", show_default=True, help="with --server")
@click.option("--user", metavar="NAME", help="run as this user (system units)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def service_install(  # noqa: PLR0917 - click passes options positionally
    is_server: bool,
    print_only: bool,
    state: str | None,
    data: str | None,
    listen: str,
    user: str | None,
    as_json: bool,
) -> None:
    """Write a systemd unit (root: system unit; otherwise: user unit)."""
    from homeport.client import service as svc
    from homeport.client.ssh import needs_pythonpath, package_root

    if is_server:
        raw = data or os.environ.get("HOMEPORT_DATA") or "~/.local/share/homeport/server"
        directory = Path(raw).expanduser().absolute()
    else:
        directory = _state_dir(state)
    p = svc.plan(
        server=is_server,
        directory=directory,
        listen=listen,
        user=user,
        pythonpath=package_root() if needs_pythonpath() else None,
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "unit": p.name,
                    "path": str(p.path),
                    "text": p.text,
                    "enable": p.enable_command,
                    "written": not print_only,
                },
                indent=2,
            )
        )
    elif print_only:
        click.echo(f"# {p.path}")
        click.echo(p.text, nl=False)
    if print_only:
        return
    try:
        svc.install(p)
    except OSError as exc:
        _fail(f"cannot write {p.path}: {exc.strerror or exc} (try --print)")
    if not as_json:
        click.echo(f"wrote {p.path}\nenable and start it with:\n  {p.enable_command}")


def register(cli: click.Group) -> None:
    """Add the client commands to the top-level ``homeport`` group."""
    for cmd in (status, nc, ssh, ssh_config, forward, trust, service, ping, netcheck):
        cli.add_command(cmd)
