"""Client commands: status, nc, ssh, ssh-config, forward, socks, service (``up``: agent.cli).

Heavy modules (asyncio, the agent, ``cryptography`` via enrollment) are
imported inside the command functions so ``homeport --help`` stays quick;
``homeport nc`` never even gets here (``__main__`` dispatches it first).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

STATE_HELP = "state directory (env HOMEPORT_STATE, default ~/.local/state/homeport)"


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"homeport: {message}", err=True)
    sys.exit(code)


def _state_dir(state: str | None) -> Path:
    from homeport.node.state import StateError, resolve_dir

    try:
        return resolve_dir(state)
    except StateError as exc:
        _fail(str(exc), 2)


PROFILE_HELP = (
    "which homeport network (env HOMEPORT_PROFILE; default: 'homeport switch', else 'default')"
)


def _set_profile(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """``--profile NAME``: through the environment, so every state lookup (and nc) sees it."""
    if value is None:
        return
    from homeport.node.state import ENV_PROFILE, profile_problem

    problem = profile_problem(value)
    if problem is not None:
        raise click.BadParameter(problem)
    os.environ[ENV_PROFILE] = value


def add_profile_options(group: click.Group) -> None:
    """Give ``--profile NAME`` to the group and to every command that takes ``--state``."""

    def option() -> click.Option:
        return click.Option(
            ["--profile"],
            metavar="NAME",
            expose_value=False,
            is_eager=True,
            callback=_set_profile,
            help=PROFILE_HELP,
        )

    group.params.append(option())
    todo: list[click.Command] = list(group.commands.values())
    while todo:
        cmd = todo.pop()
        if isinstance(cmd, click.Group):
            todo += cmd.commands.values()
        names = {p.name for p in cmd.params}
        if "state" in names and "profile" not in names:
            cmd.params.append(option())


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
        nm = request_netmap(st, welcome=welcome)
    except DialError as exc:
        _fail(f"cannot get the network map from {st.server}: {exc.message}")
    return _with_self(nm, st)


def _with_self(nm: Any, st: Any) -> Any:
    """The map with this node's own row: under an ACL policy a node's peer map holds only
    the peers it may reach, which need not include itself (the rows are shared by every
    node the same rules select), so the row comes from the local state instead."""
    import dataclasses
    import time

    from homeport.wire.control import NodeInfo, ServiceInfo

    if not nm.self_id or any(n.node_id == nm.self_id for n in nm.nodes):
        return nm
    me = NodeInfo(
        node_id=nm.self_id,
        name=st.name,
        online=True,
        last_seen=time.time(),
        fingerprint="",
        services=tuple(ServiceInfo(s.name, s.port) for s in st.services),
    )
    return dataclasses.replace(nm, nodes=(me, *nm.nodes))


@click.command()
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--watch", is_flag=True, help="a live view, redrawn every --interval (Ctrl-C quits)")
@click.option(
    "--interval",
    type=click.FloatRange(0.2, 3600),
    default=1.0,
    show_default=True,
    metavar="S",
    help="with --watch: seconds between frames",
)
@click.option(
    "--count", type=click.IntRange(1), default=None, metavar="N", help="with --watch: N frames"
)
@click.pass_context
def status(  # noqa: PLR0917 - click passes options positionally
    ctx: click.Context,
    state: str | None,
    as_json: bool,
    watch: bool,
    interval: float,
    count: int | None,
) -> None:
    """Show the network's nodes: online, last seen, services, path."""
    from click.core import ParameterSource

    from homeport.client import status as st_mod

    if not watch:  # silently ignoring them would print one frame the user did not ask for
        given = [
            f"--{p}"
            for p in ("interval", "count")
            if ctx.get_parameter_source(p) is not ParameterSource.DEFAULT
        ]
        if given:
            _fail(f"{' and '.join(given)} only go with --watch (status --watch {given[0]} …)", 2)
    st = _load(state)
    if watch:
        if as_json:
            _fail("--watch draws for people; for machines run 'status --json' in a loop", 2)
        _watch(st, interval, count)
        return
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


#: With a local agent (fresh online flags and paths every frame), the server's map
#: (services, last seen) is fetched this often; without one, every frame.
WATCH_NETMAP_EVERY = 10.0


def _watch(st: Any, interval: float, count: int | None) -> None:
    """``status --watch``: fetch, render (:mod:`homeport.client.watch`), repeat."""
    import shutil
    import time

    from homeport.client import watch as w
    from homeport.io.dial import DialError, request_netmap
    from homeport.node.state import PROFILES_DIR
    from homeport.wire.logtext import esc

    tty = sys.stdout.isatty()
    out = sys.stdout
    profile = st.dir.name if st.dir.parent.name == PROFILES_DIR else "default"
    header = f"homeport [{profile}] {st.name} on {st.server}"
    nm: Any = None
    nm_at = 0.0
    prev: dict[str, int] = {}
    last = 0.0
    frames = 0
    try:
        if tty:
            out.write(w.HIDE_CURSOR + "\x1b[2J")  # one clear at the start, never again
        while True:
            mono = time.monotonic()
            agent = _agent_query(st.dir, "status", timeout=2.0)
            note = ""
            if nm is None or agent is None or mono - nm_at >= WATCH_NETMAP_EVERY:
                try:
                    nm = _with_self(request_netmap(st, timeout=5.0), st)
                    nm_at = mono
                except DialError as exc:
                    note = f" (server unreachable: {exc.message})"
            if nm is None:
                lines = [esc(header + note, 300)]
            else:
                rows, prev_next = w.build_rows(
                    nm, agent, prev, mono - last if last else 0.0, time.time()
                )
                prev, last = prev_next, mono
                cols = shutil.get_terminal_size().columns if tty else 0
                lines = w.render(rows, header=header + note, now=time.time(), width=cols)
            out.write(w.screen(lines, tty=tty))
            out.flush()
            frames += 1
            if count is not None and frames >= count:
                break
            time.sleep(interval)  # the frame rate, not a synchronisation
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # status --watch | head
        sys.stderr.close()
        return
    finally:
        if tty:
            out.write(w.SHOW_CURSOR + "\n")
            out.flush()


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
@click.option(
    "--count",
    "-c",
    type=click.IntRange(1, 1000),
    default=10,
    show_default=True,
    help="most probes (stops early once direct)",
)
@click.option(
    "--timeout", type=float, default=3.0, show_default=True, metavar="S", help="per probe"
)
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per probe")
def ping(name: str, count: int, timeout: float, state: str | None, as_json: bool) -> None:
    """Probe NAME through the path streams take now; stops once a probe went direct."""
    import time

    from homeport.client import ping as ping_mod

    st = _load(state)
    mine = ping_mod.self_problem(name, st.name)
    if mine is not None:
        _fail(mine)
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
        if ping_mod.is_final(ans):
            break
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


#: ``homeport ssh``'s own long options (-> takes a value), also accepted after NAME.
SSH_OWN_OPTIONS = {"--state": True, "--user": True, "--no-cert": False, "--profile": True}


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--user", "account", metavar="USER", help="local account to log in as (certificate)")
@click.option("--no-cert", is_flag=True, help="do not ask the server for an SSH certificate")
@click.argument("ssh_args", nargs=-1, type=click.UNPROCESSED, metavar="[SSH OPTIONS] NAME [CMD]")
def ssh(state: str | None, account: str | None, no_cert: bool, ssh_args: tuple[str, ...]) -> None:
    """Run the system ssh to NAME through homeport. ssh's own options (-i KEY, -p PORT,
    -l USER, -o X=Y, -J, -L …) and homeport's may come before or after NAME (up to the
    remote command), as with ssh. NAME.PROFILE is NAME in that profile.

    A fresh key and a short-lived certificate for the account are fetched first
    when the server's policy allows it (keyless SSH); otherwise your own keys.
    """
    from homeport.client.ssh import SshArgsError, exec_ssh, parse_ssh_args

    try:
        line = parse_ssh_args(list(ssh_args), SSH_OWN_OPTIONS)
    except SshArgsError as exc:
        _fail(str(exc), 2)
    for opt, value in line.own:  # homeport's options given after NAME (docs/policy.md)
        if opt == "--state":
            state = value
        elif opt == "--user":
            account = value
        elif opt == "--no-cert":
            no_cert = True
        elif opt == "--profile" and value is not None:
            from homeport.node.state import ENV_PROFILE, profile_problem

            problem = profile_problem(value)
            if problem is not None:
                _fail(f"--profile: {problem}", 2)
            os.environ[ENV_PROFILE] = value
    if account and line.user and line.user != account:  # the certificate is for one login
        _fail(f"--user {account} and the ssh login {line.user} disagree: give one of them", 2)
    target, profile = _split_profile(state, line.host)
    if profile is not None:
        from homeport.node.state import ENV_PROFILE

        os.environ[ENV_PROFILE] = profile
        line = line.with_host(target)
    st = _load(state)
    extra: list[tuple[str, str]] = []
    reason = _precheck(st, target, line.port or "22")
    if reason is not None:  # one line, and no ssh (with its own noise) at all
        from homeport.client.nc import format_error

        if reason.startswith("no node named"):
            reason += _elsewhere_hint(st.dir, state, target)
        _fail(format_error(target, reason).removeprefix("homeport nc: "), 255)
    args = line.argv()
    if not no_cert:
        import getpass

        who = account or line.user or getpass.getuser()
        extra = _cert_options(st, target, who)
        if account and not line.user:
            args = ["-l", account, *args]
    try:
        exec_ssh(args, st.dir, extra)
    except OSError as exc:
        _fail(f"cannot run ssh: {exc.strerror or exc}")


def _elsewhere_hint(here: Path, state: str | None, node: str) -> str:
    """``; did you mean pi.home?`` when another profile has met ``node`` before: its pinned
    keys or known_hosts file for it are on disk (no map is kept there, and asking every
    profile's server would cost a round trip each)."""
    from homeport.node import hostkeys
    from homeport.node import state as node_state

    base = node_state.base_dir(state)
    found = [
        f"{node}.{p}"
        for p in node_state.list_profiles(base)
        if (d := node_state.profile_dir(base, p)) != here
        and any(
            (d / sub / node).is_file() for sub in (hostkeys.PINS_DIR, node_state.KNOWN_HOSTS_DIR)
        )
    ]
    return f"; did you mean {' or '.join(found)}?" if found else ""


def _split_profile(state: str | None, name: str) -> tuple[str, str | None]:
    """``[user@]labpc.work`` -> (``[user@]labpc``, "work") when "work" is a profile here;
    anything else unchanged (node names have no dots, so nothing is taken by mistake)."""
    from homeport.node import state as node_state

    user, at, host = name.rpartition("@")
    node, dot, suffix = host.rpartition(".")
    if not dot or not node or suffix not in node_state.list_profiles(node_state.base_dir(state)):
        return name, None
    return f"{user}{at}{node}", suffix


def _precheck(st: Any, host: str, service: str) -> str | None:
    """Why ``host`` cannot be reached now, or None (see :mod:`homeport.client.precheck`).

    The local agent answers from its peer map; without one, the server's map
    (one round trip) tells the same facts. A name that is not a node name at all
    is left to ssh (it may be an ordinary host the user reaches through us).
    """
    import time

    from homeport.client import precheck
    from homeport.client.nc import parse_reply
    from homeport.wire.names import host_name_problem

    if host_name_problem(host) is not None:
        return None
    reply = precheck.ask_agent(str(st.dir), host, parse_reply)
    if not reply or reply.get("ready") is not True:
        from homeport.io.dial import DialError, request_netmap

        try:
            nm = _with_self(request_netmap(st), st)
        except DialError:
            return None  # the real open will say why
        node = next((n for n in nm.nodes if n.name == host), None)
        reply = {"ok": True, "ready": True, "known": node is not None}
        if node is not None:
            reply |= {
                "online": node.online,
                "last_seen": node.last_seen,
                "services": ",".join(f"{s.name}/{s.port}" for s in node.services),
            }
    return precheck.verdict(reply, host, service, time.time())


def _cert_options(st: Any, host: str, account: str) -> list[tuple[str, str]]:
    from homeport.client.login import CertRefused, DialError, fetch_certificate, ssh_cert_options

    try:
        files = fetch_certificate(st, host, account)
    except CertRefused as exc:
        if exc.code not in {"no-ssh-ca", "no-policy"}:
            click.echo(
                f"homeport: no SSH certificate for {account}@{host} ({exc}); "
                "trying your own ssh keys",
                err=True,
            )
        return []
    except DialError as exc:
        click.echo(
            f"homeport: no SSH certificate ({exc.message}); trying your own ssh keys", err=True
        )
        return []
    return ssh_cert_options(files)


@click.command("ssh-cert")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--user", "account", metavar="USER", help="local account [default: yours]")
@click.option("--quiet", is_flag=True, help="print nothing on success (ssh_config Match exec)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.argument("name")
def ssh_cert(state: str | None, account: str | None, quiet: bool, as_json: bool, name: str) -> None:
    """Fetch a fresh key and SSH certificate to log in to NAME (exit 1 if refused)."""
    import getpass

    from homeport.client.login import CertRefused, DialError, fetch_certificate

    st = _load(state)
    who = account or getpass.getuser()
    try:
        files = fetch_certificate(st, name, who)
    except CertRefused as exc:
        _fail(f"no SSH certificate for {who}@{name}: {exc}")
    except DialError as exc:
        _fail(f"cannot reach {st.server}: {exc.message}")
    if as_json:
        click.echo(
            json.dumps(
                {
                    "key": str(files.key),
                    "cert": str(files.cert),
                    "principals": list(files.principals),
                    "valid_before": files.valid_before,
                    "rule": files.rule,
                }
            )
        )
    elif not quiet:
        click.echo(f"{files.cert} ({', '.join(files.principals)}; rule {files.rule})")


@click.command("ssh-config")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option(
    "--certs",
    is_flag=True,
    help="add a Match exec block that fetches a short-lived SSH certificate before each login",
)
@click.option(
    "--install",
    is_flag=True,
    help="write ~/.ssh/homeport.conf and put 'Include ~/.ssh/homeport.conf' atop ~/.ssh/config",
)
@click.option(
    "--no-precheck",
    is_flag=True,
    help="no Match exec that checks the node first (one less process per ssh; on failure "
    "OpenSSH adds two lines of its own after homeport's reason)",
)
@click.argument("names", nargs=-1)
def ssh_config(  # noqa: PLR0917 - click passes options positionally
    state: str | None,
    as_json: bool,
    certs: bool,
    install: bool,
    no_precheck: bool,
    names: tuple[str, ...],
) -> None:
    """Print Host blocks for ~/.ssh/config (all other nodes, or NAMES); --install writes them.

    With several profiles (and no --profile or NAMES), every profile's nodes get
    NAME.PROFILE, and the default profile's nodes their bare NAME too.
    """
    from homeport.client.ssh import ConfigError, ssh_config_json
    from homeport.client.term import printable
    from homeport.node import state as node_state

    base = node_state.base_dir(state)
    every = not names and not os.environ.get(node_state.ENV_PROFILE)
    profiles = node_state.list_profiles(base) if every else []
    if len(profiles) > 1:
        parts = _profile_parts(base, profiles)
    else:
        st = _load(state)
        hosts = list(names) or _other_nodes(st)
        parts = [(hosts, st.dir, "")]
    try:
        block, check = _config_texts(parts, certs=certs, precheck=not no_precheck, split=install)
    except ConfigError as exc:
        _fail(printable(str(exc)), 2)
    if install:
        _install_ssh_config(block, check, as_json)
    elif as_json:
        if len(parts) == 1:
            click.echo(ssh_config_json(parts[0][0], parts[0][1]))
        else:
            click.echo(
                json.dumps(
                    {"hosts": [h + sfx for hosts, _d, sfx in parts for h in hosts]}, indent=2
                )
            )
    else:
        click.echo(block, nl=False)


def _other_nodes(st: Any) -> list[str]:
    """The network's other nodes, by valid name (a hostile name is skipped, never written)."""
    from homeport.client.ssh import safe_names
    from homeport.client.term import printable

    nm = _netmap(st)
    hosts, problems = safe_names(sorted(n.name for n in nm.nodes if n.node_id != nm.self_id))
    for problem in problems:
        click.echo(f"homeport: skipped a node: {printable(problem)}", err=True)
    return hosts


def _profile_parts(base: Path, profiles: list[str]) -> list[tuple[list[str], Path, str]]:
    """(hosts, state dir, suffix) per enrolled profile: ``.PROFILE`` for each, "" (bare names)
    for the default one. A profile whose server cannot be reached is skipped, and said so."""
    from homeport.io.dial import DialError, request_netmap
    from homeport.node import state as node_state

    current = node_state.current_profile(base)
    parts: list[tuple[list[str], Path, str]] = []
    for name in profiles:
        try:
            st = node_state.load(node_state.profile_dir(base, name))
        except node_state.StateError:
            continue  # not enrolled (yet): nothing to reach
        try:
            nm = _with_self(request_netmap(st), st)
        except DialError as exc:
            click.echo(
                f"homeport: profile {name}: cannot get its nodes from {st.server} "
                f"({exc.message}); left out",
                err=True,
            )
            continue
        from homeport.client.ssh import safe_names

        hosts, _problems = safe_names(sorted(n.name for n in nm.nodes if n.node_id != nm.self_id))
        parts.append((hosts, st.dir, f".{name}"))
        if name == current:
            parts.append((hosts, st.dir, ""))
    return parts


def _config_texts(
    parts: list[tuple[list[str], Path, str]], *, certs: bool, precheck: bool, split: bool
) -> tuple[str, str]:
    """(Host blocks, precheck blocks); ``split``: the precheck apart (for --install),
    else inside the Host text, each ahead of its block."""
    from homeport.client.ssh import precheck_text, ssh_config_block

    blocks: list[str] = []
    checks: list[str] = []
    for hosts, state_dir, suffix in parts:
        blocks.append(
            ssh_config_block(
                hosts,
                state_dir,
                certs=certs and not suffix,  # the certificate exec names the node as typed
                precheck=precheck and not split,
                suffix=suffix,
            )
        )
        if precheck and split:
            checks.append(precheck_text(hosts, state_dir, suffix=suffix))
    return "\n".join(blocks), "".join(checks)


def _install_ssh_config(block: str, check: str, as_json: bool) -> None:
    """Write ~/.ssh/homeport.conf and include it first in ~/.ssh/config (idempotent).

    ``check``: the precheck Match blocks, written to ~/.ssh/homeport-check.conf and
    included from the top of homeport.conf (OpenSSH reads it first; paramiko
    ignores the Include); empty: no check file, and an old one is removed.
    """
    from homeport.client.ssh import CHECK_FILE, INCLUDE_FILE, quote_config
    from homeport.node.files import write_private

    ssh_dir = Path.home() / ".ssh"
    conf = ssh_dir / INCLUDE_FILE
    try:
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        check_path = ssh_dir / CHECK_FILE
        if check:
            write_private(check_path, check.encode())
            block = f"Include {quote_config(str(check_path))}\n\n{block}"
        else:
            check_path.unlink(missing_ok=True)
        write_private(conf, block.encode())
    except OSError as exc:
        _fail(f"cannot write {exc.filename or ssh_dir}: {exc.strerror or exc}")
    main, line, added = _include_homeport_conf()
    if as_json:
        click.echo(json.dumps({"written": str(conf), "included": str(main), "added": added}))
        return
    click.echo(f"wrote {conf}")
    click.echo(
        f"{'added' if added else 'already has'} '{line}' "
        f"at the top of {main}; now plain ssh/scp/rsync/VS Code reach the nodes by name"
    )


def _include_homeport_conf() -> tuple[Path, str, bool]:
    """Put the Include of ~/.ssh/homeport.conf atop ~/.ssh/config if it is not there:
    (that file, the Include line, whether it was added)."""
    import pwd

    from homeport.client.ssh import add_include, include_line
    from homeport.node.files import write_private

    home = Path.home()
    try:
        login_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    except KeyError:
        login_home = home
    ssh_dir = home / ".ssh"
    main = ssh_dir / "config"
    line = include_line(home, login_home)
    try:
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        try:
            old = main.read_text()
        except FileNotFoundError:
            old = ""
        new = add_include(old, line)
        if new is not None:
            write_private(main, new.encode())
    except OSError as exc:
        _fail(f"cannot write {exc.filename or main}: {exc.strerror or exc}")
    return main, line, new is not None


# -- code -----------------------------------------------------------------------


def _code_node_known(state: str | None, host: str) -> None:
    """Fail (one line, nothing written) when ``host`` (``labpc`` or ``labpc.PROFILE``) is no
    node of its network; when the server cannot be asked, the ssh check after says why."""
    from homeport.io.dial import DialError, request_netmap
    from homeport.node.state import ENV_PROFILE

    node, profile = _split_profile(state, host)
    saved = os.environ.get(ENV_PROFILE)
    if profile is not None:
        os.environ[ENV_PROFILE] = profile
    try:
        st = _load(state)
    finally:
        if profile is not None:
            if saved is None:
                os.environ.pop(ENV_PROFILE, None)
            else:
                os.environ[ENV_PROFILE] = saved
    try:
        nm = _with_self(request_netmap(st), st)
    except DialError:
        return
    if not any(n.name == node for n in nm.nodes):
        _fail(f"no node named {node!r} in this network (see: homeport status)")


def _ssh_g(config: Path, host: str) -> tuple[bool, str]:
    """(ssh routes ``host`` through homeport with ``config``, what ssh -G said on stderr)."""
    import subprocess

    from homeport.client.code import routed

    if not config.exists():
        return False, ""
    try:
        res = subprocess.run(
            ["ssh", "-F", str(config), "-G", host],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _fail(f"cannot run ssh -G: {exc}")
    return res.returncode == 0 and routed(res.stdout), res.stderr


@click.command("code")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option(
    "--no-install",
    is_flag=True,
    help="do not add the homeport Include to ~/.ssh/config (only say what is missing)",
)
@click.argument("target", metavar="NAME[:PATH]")
@click.pass_context
def code(ctx: click.Context, state: str | None, no_install: bool, target: str) -> None:
    """Open VS Code (Remote-SSH) on node NAME, in the folder PATH (absolute) if given.

    VS Code's Remote-SSH reads ~/.ssh/config: when ssh would not route NAME
    through homeport, this installs the homeport Include first (as
    'homeport ssh-config --install') and says so.
    """
    import shutil
    import subprocess

    from homeport.client.code import code_argv, folder_uri, parse_target
    from homeport.client.term import printable

    try:
        spec = parse_target(target)
    except ValueError as exc:
        _fail(printable(str(exc)), 2)
    from homeport.client.ssh import INCLUDE_FILE

    config = Path.home() / ".ssh" / "config"
    ok, said = _ssh_g(config, spec.host)
    if not ok:
        if no_install:
            _fail(
                f"ssh does not reach {spec.host} through homeport with {config}; VS Code reads "
                "that file: run 'homeport ssh-config --install' (or drop --no-install)"
            )
        _code_node_known(state, spec.host)  # an unknown name: fail before writing anything
        conf = config.parent / INCLUDE_FILE
        if conf.exists():  # the user's own install (its --state/--profile): only include it
            main, line, added = _include_homeport_conf()
            if added:
                click.echo(f"added '{line}' at the top of {main} (VS Code reads it)")
        else:
            click.echo(
                f"{spec.host} is not in {config} yet (VS Code reads it): "
                "installing the homeport Include"
            )
            ctx.invoke(
                ssh_config,
                state=state,
                as_json=False,
                certs=False,
                install=True,
                no_precheck=False,
                names=(),
            )
        ok, said = _ssh_g(config, spec.host)
        if not ok:
            _fail(
                f"ssh does not route {spec.host} through homeport: {conf} was written for "
                "another state directory or profile, or before this node joined; rewrite it "
                "with 'homeport ssh-config --install' (with the --state/--profile you use)"
                if conf.exists()
                else f"{spec.host} is not a node ssh can reach here "
                "(see: homeport status, homeport profiles)"
            )
    for line in said.splitlines():  # the precheck's reason (offline …): VS Code only times out
        if line.startswith("homeport"):
            click.echo(f"warning: {printable(line)}", err=True)
    exe = shutil.which("code")
    where = folder_uri(spec) if spec.path else f"ssh-remote+{spec.host}"
    if exe is None:
        import shlex

        _fail(
            "VS Code's 'code' command is not on PATH (in VS Code: 'Shell Command: Install "
            f"code in PATH'), then run: {shlex.join(code_argv('code', spec))}; or in VS Code: "
            f"'Remote-SSH: Connect to Host…' {spec.host}"
        )
    argv = code_argv(exe, spec)
    click.echo(f"opening {where} in VS Code")
    try:
        res = subprocess.run(argv, check=False)
    except OSError as exc:
        _fail(f"cannot run {exe}: {exc.strerror or exc}")
    sys.exit(res.returncode)


# -- profiles -------------------------------------------------------------------


@click.command("profiles")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def profiles_cmd(state: str | None, as_json: bool) -> None:
    """List this machine's homeport networks (profiles); * marks the default one."""
    from homeport.node import state as node_state

    base = node_state.base_dir(state)
    current = node_state.current_profile(base)
    rows: list[dict[str, Any]] = []
    for name in node_state.list_profiles(base):
        d = node_state.profile_dir(base, name)
        try:
            st = node_state.load(d)
            row = {"profile": name, "node": st.name, "server": st.server, "enrolled": True}
        except node_state.StateError:
            row = {"profile": name, "node": "", "server": "", "enrolled": False}
        running = _agent_query(d, "status", timeout=2.0) is not None
        rows.append({**row, "default": name == current, "agent": running, "dir": str(d)})
    if as_json:
        click.echo(json.dumps({"default": current, "profiles": rows}, indent=2))
        return
    from homeport.client.term import printable

    for r in rows:
        mark = "*" if r["default"] else " "
        what = (
            f"{r['node']} on {r['server']}" + ("" if r["agent"] else " (agent not running)")
            if r["enrolled"]
            else "not enrolled: homeport up --profile " + r["profile"] + " --server …"
        )
        click.echo(printable(f"{mark} {r['profile']:<12} {what}"))
    if len(rows) == 1:
        click.echo("add a network: homeport up --profile NAME --server HOST:PORT --name NODE")


@click.command("switch")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.argument("name")
def switch(state: str | None, name: str) -> None:
    """Make profile NAME the default: commands without --profile, and bare ssh names, use it."""
    from homeport.node import state as node_state

    problem = node_state.profile_problem(name)
    if problem is not None:
        _fail(problem, 2)
    base = node_state.base_dir(state)
    if name not in node_state.list_profiles(base):
        _fail(node_state.no_profile_message(base, name))
    try:
        node_state.set_current_profile(base, name)
    except (OSError, node_state.StateError) as exc:
        _fail(f"cannot switch: {exc}")
    click.echo(f"default profile: {name}")
    conf = Path.home() / ".ssh" / "homeport.conf"
    if conf.exists():
        click.echo(
            "bare ssh names follow the default profile: run 'homeport ssh-config --install' "
            "to update ~/.ssh/homeport.conf"
        )


# -- forward --------------------------------------------------------------------


@click.command()
@click.option("--bind", default="127.0.0.1", show_default=True, help="local address to listen on")
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@click.argument("local_port", type=click.IntRange(0, 65535), metavar="LOCALPORT")
@click.argument("target", metavar="NODE:PORT|NODE:SERVICE|NODE:HOST:PORT")
def forward(bind: str, state: str | None, as_json: bool, local_port: int, target: str) -> None:
    """Listen on LOCALPORT; tunnel each connection to NODE's PORT or SERVICE.

    NODE:HOST:PORT reaches HOST:PORT behind NODE, an exit node (homeport up
    --advertise-exit there), e.g. homeport forward 8888 labpc:192.168.1.50:80.
    """
    from homeport.client.forward import Forwarder, parse_target, printer, target_problem
    from homeport.client.term import printable

    try:
        spec = parse_target(target)
    except ValueError as exc:
        _fail(str(exc), 2)
    st = _load(state)
    found = target_problem(_netmap(st), spec)
    if found is not None:
        fatal, why = found
        if fatal:
            _fail(printable(why))
        click.echo(f"homeport: warning: {printable(why)}", err=True)
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


# -- socks ----------------------------------------------------------------------


@click.command()
@click.option(
    "--listen",
    default="127.0.0.1:1080",
    show_default=True,
    metavar="HOST:PORT",
    help="local address of the proxy (loopback unless --allow-remote)",
)
@click.option("--via", required=True, metavar="NODE", help="the exit node connections leave from")
@click.option(
    "--allow-remote", is_flag=True, help="allow a non-loopback --listen (others use NODE as you)"
)
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
def socks(listen: str, via: str, allow_remote: bool, state: str | None, as_json: bool) -> None:
    """A local SOCKS5 proxy (CONNECT, no auth) whose connections leave from NODE.

    NODE must be an exit node (homeport up --advertise-exit NETS there) that the
    policy lets this node use; names are resolved by NODE.

    \b
    Try:  curl --socks5-hostname 127.0.0.1:1080 http://192.168.1.50/
    """
    from homeport.client.forward import ForwardSpec, printer, target_problem
    from homeport.client.socks import SocksProxy, parse_listen
    from homeport.client.term import printable
    from homeport.wire import names

    problem = names.host_name_problem(via)
    if problem is not None:
        _fail(problem, 2)
    try:
        host, port = parse_listen(listen, allow_remote=allow_remote)
    except ValueError as exc:
        _fail(str(exc), 2)
    st = _load(state)
    found = target_problem(_netmap(st), ForwardSpec(via, "", exit="*"))
    if found is not None:
        fatal, why = found
        if fatal:
            _fail(printable(why))
        click.echo(f"homeport: warning: {printable(why)}", err=True)
    report = printer(as_json)
    try:
        proxy = SocksProxy(st, via, host, port, report=report)
    except OSError as exc:
        _fail(f"cannot listen on {listen}: {exc.strerror or exc}")
    bound_host, bound_port = proxy.address
    report({"event": "listening", "listen": f"{bound_host}:{bound_port}", "to": f"{via} (SOCKS5)"})
    try:
        proxy.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()


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


# -- login (check rules) ----------------------------------------------------------


@click.group(invoke_without_command=True)
@click.option("--state", metavar="DIR", help=STATE_HELP)
@click.option("--wait", default=600.0, show_default=True, help="seconds to wait for approval")
@click.pass_context
def login(ctx: click.Context, state: str | None, wait: float) -> None:
    """Complete a login check (for 'check' ssh rules): prints a code to approve.

    An admin approves it on the server host with 'homeport login approve CODE',
    or you do from another of your devices whose own check is fresh.
    """
    if ctx.invoked_subcommand is not None:
        return
    from homeport.client.login import DialError
    from homeport.client.login import login as run_login

    st = _load(state)

    def show(ls: Any) -> None:
        if ls.state == "pending":
            click.echo(ls.message)
            click.echo("waiting for approval …")

    try:
        final = run_login(st, show, wait=wait)
    except DialError as exc:
        _fail(f"cannot reach {st.server}: {exc.message}")
    if final.state != "approved":
        _fail(f"login {final.state}: {final.message}")
    click.echo("approved: certificates for 'check' rules are issued until the check period ends")


#: Set by ``homeport.cli`` to the server's admin approval (processes do not import each
#: other): ``(code, data_dir) -> message``, or None when this host runs no server.
ADMIN_LOGIN_APPROVE: Callable[[str, Path | None], str | None] | None = None


@login.command("approve")
@click.option("--state", metavar="DIR", help=STATE_HELP + " (approve from this device)")
@click.option("--data", "data_dir", metavar="DIR", help="server data directory (admin approval)")
@click.argument("code")
def login_approve(state: str | None, data_dir: str | None, code: str) -> None:
    """Approve a login CODE: as the admin on the server host, or from an approved device."""
    if state is None and ADMIN_LOGIN_APPROVE is not None:
        try:
            message = ADMIN_LOGIN_APPROVE(code, Path(data_dir) if data_dir else None)
        except click.ClickException as exc:
            _fail(exc.message)
        if message is not None:
            click.echo(message)
            return
    from homeport.client.login import DialError, approve_from_device

    st = _load(state)
    try:
        ls = approve_from_device(st, code)
    except DialError as exc:
        _fail(f"cannot reach {st.server}: {exc.message}")
    if ls.state != "approved":
        _fail(ls.message)
    click.echo(ls.message)


def register(cli: click.Group) -> None:
    """Add the client commands to the top-level ``homeport`` group."""
    for cmd in (
        code,
        profiles_cmd,
        switch,
        status,
        nc,
        ssh,
        ssh_cert,
        ssh_config,
        forward,
        socks,
        trust,
        service,
        login,
        ping,
        netcheck,
    ):
        cli.add_command(cmd)
