"""Server-side commands: ``server``, ``users``, ``keys``, ``nodes``, ``audit``, ``policy``.

Heavy modules (asyncio, cryptography, SQLAlchemy) are imported inside the
command functions so ``homeport --help`` and ``homeport nc`` stay fast.
Reporting commands print a table, or one JSON document with ``--json``;
``keys create`` prints exactly one line on stdout — the key — so
``KEY=$(homeport keys create)`` works; hints go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

DEFAULT_EXPIRY = "24h"
#: Node-key lifetime unless ``homeport server --key-expiry`` says otherwise.
DEFAULT_KEY_EXPIRY = "180d"
#: ``server --admin-listen`` default (web.listener.DEFAULT_ADMIN_LISTEN; not imported: uvicorn).
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8445"


def default_data_dir() -> Path:
    env = os.environ.get("HOMEPORT_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".local" / "share" / "homeport" / "server"


_data_option = click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Server data directory [env HOMEPORT_DATA; default ~/.local/share/homeport/server].",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _duration(text: str, option: str) -> float | None:
    """``parse_duration`` that insists on a unit: ``--expiry 3`` meaning 3 s surprised users."""
    from homeport.server.admin import parse_duration

    t = text.strip()
    if t.replace(".", "", 1).isdigit() and t != "0":
        raise click.BadParameter(
            f"{text!r} has no unit: write e.g. {t}h, {t}d, {t}m, {t}s or never", param_hint=option
        )
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None


def _resolve_data(data_dir: Path | None) -> Path:
    return (data_dir or default_data_dir()).expanduser().absolute()


def _admin(data_dir: Path | None, request: dict[str, Any]) -> dict[str, Any]:
    from homeport.server.admin import AdminError, admin_request

    try:
        answer = admin_request(_resolve_data(data_dir), request)
    except AdminError as exc:
        raise click.ClickException(str(exc)) from None
    if not answer.get("ok"):
        raise click.ClickException(str(answer.get("error", "admin request failed")))
    return answer


def admin_login_approve(code: str, data_dir: Path | None) -> str | None:
    """``homeport login approve CODE`` on the server host: approve through the admin socket.

    None when this host runs no server here (the client then approves from its device).
    """
    from homeport.server.admin import ADMIN_SOCKET

    resolved = _resolve_data(data_dir)
    if data_dir is None and not (resolved / ADMIN_SOCKET).exists():
        return None
    answer = _admin(data_dir, {"op": "login.approve", "code": code})
    return str(answer.get("message", "approved"))


def _when(ts: float | None, now: float) -> str:
    if ts is None:
        return "-"
    delta = now - ts
    future = delta < 0
    d = abs(delta)
    if d < 90:
        text = f"{d:.0f}s"
    elif d < 90 * 60:
        text = f"{d / 60:.0f}m"
    elif d < 36 * 3600:
        text = f"{d / 3600:.0f}h"
    else:
        text = f"{d / 86400:.0f}d"
    return f"in {text}" if future else f"{text} ago"


def _key_state(node: dict[str, Any], now: float) -> str:
    if not node.get("approved", True):
        return "pending"
    if node.get("expiry_disabled"):
        return "no expiry"
    if node.get("expires_at") is None:
        return "-"
    if node["expires_at"] <= now:
        return "EXPIRED"
    return "expires " + _when(node["expires_at"], now)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def register(cli: click.Group) -> None:
    """Add the server-side commands to the ``homeport`` group."""

    @cli.group("server", invoke_without_command=True)
    @_data_option
    @click.option("--listen", default="0.0.0.0:8443", show_default=True, help="ADDR:PORT.")
    @click.option(
        "--tls-cert",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="TLS certificate chain (PEM) instead of the self-made one (e.g. a public CA's).",
    )
    @click.option(
        "--tls-key",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Private key (PEM) of --tls-cert.",
    )
    @click.option(
        "--db",
        "db_url",
        default=None,
        help="Database: postgresql://USER:PASS@HOST/DB (needs homeport[postgres]) or "
        "sqlite:///REL/PATH (relative to the current directory) or sqlite:////ABS/PATH; "
        "remembered in DIR [default: SQLite in DIR].",
    )
    @click.option(
        "--idle-timeout",
        type=float,
        default=None,
        help="Seconds of silence before a node counts as offline [default: 15].",
    )
    @click.option(
        "--probe-port",
        type=click.IntRange(0, 65535),
        default=None,
        help="Whoami probe port for NAT discovery [default: main port + 1; 0 disables].",
    )
    @click.option(
        "--relay-only",
        is_flag=True,
        default=False,
        help="Never coordinate direct paths: every stream goes through this relay.",
    )
    @click.option(
        "--no-tls-data",
        is_flag=True,
        default=False,
        help="Refuse TLS-wrapped data connections (nodes behind TLS-only middleboxes, "
        "docs/proxy.md); they cost this server CPU.",
    )
    @click.option(
        "--key-expiry",
        default=DEFAULT_KEY_EXPIRY,
        show_default=True,
        help="Node-key lifetime (e.g. 90d, never); online nodes renew themselves, "
        "tagged nodes are exempt.",
    )
    @click.option(
        "--admin-listen",
        default=DEFAULT_ADMIN_LISTEN,
        show_default=True,
        metavar="ADDR:PORT|off",
        help="REST API and /metrics (docs/api.md). Loopback: plain HTTP; any other address: "
        "HTTPS with the server certificate, and /metrics needs a token too.",
    )
    @click.pass_context
    def server_cmd(
        ctx: click.Context,
        *,
        admin_listen: str,
        key_expiry: str,
        data_dir: Path | None,
        listen: str,
        tls_cert: Path | None,
        tls_key: Path | None,
        db_url: str | None,
        idle_timeout: float | None,
        probe_port: int | None,
        relay_only: bool,
        no_tls_data: bool,
    ) -> None:
        """Run the homeport server (coordinator and relay) in the foreground."""
        if ctx.invoked_subcommand is not None:  # e.g. ``homeport server migrate-db``
            return
        from homeport.server.app import parse_listen, run_server

        if (tls_cert is None) != (tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together")
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--listen") from None
        key_seconds = _duration(key_expiry, "--key-expiry")
        if key_seconds is not None and key_seconds < 86400:
            raise click.BadParameter(
                "node keys must live at least 1d (nodes renew with a third left)",
                param_hint="--key-expiry",
            )
        from homeport.server.web.listener import parse_admin_listen

        try:
            admin = parse_admin_listen(admin_listen)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--admin-listen") from None
        source = ctx.get_parameter_source("admin_listen")
        code = run_server(
            _resolve_data(data_dir),
            listen,
            tls_cert,
            tls_key,
            db_url,
            idle_timeout=idle_timeout,
            probe_port=probe_port,
            relay_only=relay_only,
            key_expiry=key_seconds,
            admin_listen=None if admin is None else admin_listen,
            admin_optional=source is click.core.ParameterSource.DEFAULT,
            tls_data=not no_tls_data,
        )
        sys.exit(code)

    _register_migrate_db(server_cmd)

    @cli.group("keys")
    def keys() -> None:
        """Auth keys that let new nodes join (run on the server host)."""

    @keys.command("create")
    @click.option("--reusable", is_flag=True, help="Allow many enrollments with this key.")
    @click.option(
        "--expiry",
        default=DEFAULT_EXPIRY,
        show_default=True,
        help="Lifetime: 30m, 1h, 7d, 2w or never.",
    )
    @click.option("--note", default="", help="A note shown by 'keys list'.")
    @click.option("--user", default="", metavar="USER", help="Nodes enrolled belong to USER.")
    @click.option(
        "--tag", "tags", multiple=True, metavar="tag:NAME", help="Nodes enrolled carry this tag."
    )
    @click.option("--ephemeral", is_flag=True, help="Remove its nodes once offline for 10 minutes.")
    @click.option(
        "--approval", is_flag=True, help="Its nodes wait for 'homeport nodes approve NAME'."
    )
    @_json_option
    @_data_option
    def keys_create(  # noqa: PLR0917 - one option each
        reusable: bool,
        expiry: str,
        note: str,
        user: str,
        tags: tuple[str, ...],
        ephemeral: bool,
        approval: bool,
        as_json: bool,
        data_dir: Path | None,
    ) -> None:
        """Create an auth key; prints only the key on stdout."""
        seconds = _duration(expiry, "--expiry")
        answer = _admin(
            data_dir,
            {
                "op": "keys.create",
                "reusable": reusable,
                "expiry_seconds": seconds,
                "note": note,
                "user": user,
                "tags": list(tags),
                "ephemeral": ephemeral,
                "approval": approval,
            },
        )
        if as_json:
            click.echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
            return
        click.echo(answer["key"])
        kind = "reusable" if reusable else "single-use"
        life = "never expires" if seconds is None else f"expires in {expiry}"
        extra = [
            *([f"user {user}"] if user else []),
            *(list(tags)),
            *(["ephemeral"] if ephemeral else []),
            *(["needs approval"] if approval else []),
        ]
        click.echo(
            f"({', '.join([kind, life, *extra])}) on the node: HOMEPORT_AUTHKEY=KEY "
            "homeport up --server HOST:PORT --name NAME (or --authkey-file FILE)",
            err=True,
        )

    @keys.command("list")
    @_json_option
    @_data_option
    def keys_list(as_json: bool, data_dir: Path | None) -> None:
        """List auth keys (never their secrets)."""
        answer = _admin(data_dir, {"op": "keys.list"})
        if as_json:
            click.echo(json.dumps(answer["keys"]))
            return
        now = time.time()
        rows = [
            [
                "KEY ID",
                "STATUS",
                "REUSABLE",
                "OWNER",
                "FLAGS",
                "USES",
                "CREATED",
                "EXPIRES",
                "LAST USED",
                "NOTE",
            ]
        ]
        for k in answer["keys"]:
            flags = [
                *(["ephemeral"] if k.get("ephemeral") else []),
                *(["approval"] if k.get("approval") else []),
            ]
            rows.append(
                [
                    k["key_id"],
                    k["status"],
                    "yes" if k["reusable"] else "no",
                    k.get("user") or ",".join(k.get("tags", [])) or "-",
                    ",".join(flags) or "-",
                    str(k["uses"]),
                    _when(k["created_at"], now),
                    "never" if k["expires_at"] is None else _when(k["expires_at"], now),
                    _when(k["last_used_at"], now),
                    k["note"],
                ]
            )
        click.echo(_table(rows) if len(rows) > 1 else "no auth keys")

    @keys.command("revoke")
    @click.argument("key_id")
    @_json_option
    @_data_option
    def keys_revoke(key_id: str, as_json: bool, data_dir: Path | None) -> None:
        """Revoke an auth key so it can no longer enroll nodes."""
        _revoke(data_dir, "keys.revoke", key_id, as_json, "revoked")

    @cli.group("nodes")
    def nodes() -> None:
        """Nodes of the network (run on the server host)."""

    @nodes.command("list")
    @_json_option
    @_data_option
    def nodes_list(as_json: bool, data_dir: Path | None) -> None:
        """List nodes: name, id, online, last seen, services, address."""
        answer = _admin(data_dir, {"op": "nodes.list"})
        if as_json:
            click.echo(json.dumps(answer["nodes"]))
            return
        now = time.time()
        rows = [["NAME", "ID", "ONLINE", "LAST SEEN", "SERVICES", "ADDRESS", "OWNER", "KEY"]]
        warnings: list[str] = []
        for n in answer["nodes"]:
            services = ",".join(f"{s['name']}/{s['port']}" for s in n["services"]) or "-"
            rows.append(
                [
                    n["name"],
                    n["node_id"],
                    "yes" if n["online"] else "no",
                    "now" if n["online"] else _when(n["last_seen"], now),
                    services,
                    n["address"] or "-",
                    n.get("user") or ",".join(n.get("tags", [])) or "-",
                    _key_state(n, now),
                ]
            )
            if not n.get("approved", True):
                warnings.append(
                    f"{n['name']} waits for approval: homeport nodes approve {n['name']}"
                )
            if n.get("expiry_warning"):
                warnings.append(
                    f"{n['name']}: node key {n['expiry_warning']}"
                    + (
                        "; it renews itself while online"
                        if n["expiry_warning"] != "expired"
                        else ""
                    )
                    + f" (homeport nodes extend {n['name']})"
                )
        click.echo(_table(rows) if len(rows) > 1 else "no nodes")
        for w in warnings:
            click.echo(f"warning: {w}", err=True)
        if not answer.get("live"):
            click.echo("(the server is not running: every node shows offline)", err=True)

    def _node_action(action: str, name: str, as_json: bool, data_dir: Path | None) -> None:
        answer = _admin(data_dir, {"op": f"nodes.{action}", "name": name})
        if as_json:
            click.echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
            return
        now = time.time()
        if action == "approve":
            click.echo(f"approved {answer['name']}")
        elif answer["expiry_disabled"]:
            click.echo(f"{answer['name']}: key expiry disabled")
        elif action == "expire":
            click.echo(f"{answer['name']}: node key expired now")
        else:
            click.echo(f"{answer['name']}: node key expires {_when(answer['expires_at'], now)}")

    @nodes.command("approve")
    @click.argument("name")
    @_json_option
    @_data_option
    def nodes_approve(name: str, as_json: bool, data_dir: Path | None) -> None:
        """Approve a node enrolled with an --approval key: it may now reach and be reached."""
        _node_action("approve", name, as_json, data_dir)

    @nodes.command("expire")
    @click.argument("name")
    @_json_option
    @_data_option
    def nodes_expire(name: str, as_json: bool, data_dir: Path | None) -> None:
        """Expire a node's key now: it is disconnected until 'nodes extend'."""
        _node_action("expire", name, as_json, data_dir)

    @nodes.command("extend")
    @click.argument("name")
    @_json_option
    @_data_option
    def nodes_extend(name: str, as_json: bool, data_dir: Path | None) -> None:
        """Give a node's key a full lifetime from now (re-admits an expired node remotely)."""
        _node_action("extend", name, as_json, data_dir)

    @nodes.command("disable-expiry")
    @click.argument("name")
    @_json_option
    @_data_option
    def nodes_disable_expiry(name: str, as_json: bool, data_dir: Path | None) -> None:
        """Never expire this node's key (e.g. an unattended server)."""
        _node_action("disable-expiry", name, as_json, data_dir)

    @nodes.command("rename")
    @click.argument("name")
    @click.argument("new_name", metavar="NEW")
    @_json_option
    @_data_option
    def nodes_rename(name: str, new_name: str, as_json: bool, data_dir: Path | None) -> None:
        """Rename a node; it learns its new name at once (or when it next connects)."""
        answer = _admin(data_dir, {"op": "nodes.rename", "name": name, "new_name": new_name})
        if as_json:
            click.echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
            return
        click.echo(f"renamed {name} to {answer['name']}; ssh to it as {answer['name']} now")

    @cli.group("users")
    def users() -> None:
        """People that nodes belong to (run on the server host)."""

    @users.command("create")
    @click.argument("name")
    @_json_option
    @_data_option
    def users_create(name: str, as_json: bool, data_dir: Path | None) -> None:
        """Add a user (alice or alice@example.com); then 'keys create --user NAME'."""
        answer = _admin(data_dir, {"op": "users.create", "name": name})
        if as_json:
            click.echo(json.dumps({"name": answer["name"]}))
        else:
            click.echo(f"created user {answer['name']}")

    @users.command("list")
    @_json_option
    @_data_option
    def users_list(as_json: bool, data_dir: Path | None) -> None:
        """List users and their nodes."""
        answer = _admin(data_dir, {"op": "users.list"})
        if as_json:
            click.echo(json.dumps(answer["users"]))
            return
        now = time.time()
        rows = [["USER", "CREATED", "NODES"]]
        for u in answer["users"]:
            rows.append([u["name"], _when(u["created_at"], now), ",".join(u["nodes"]) or "-"])
        click.echo(_table(rows) if len(rows) > 1 else "no users")

    @users.command("remove")
    @click.argument("name")
    @click.option("--force", is_flag=True, help="Also remove the user's nodes.")
    @_json_option
    @_data_option
    def users_remove(name: str, force: bool, as_json: bool, data_dir: Path | None) -> None:
        """Remove a user and revoke its auth keys (refused while it has nodes, unless --force)."""
        answer = _admin(data_dir, {"op": "users.remove", "name": name, "force": force})
        if as_json:
            click.echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
            return
        gone = answer["removed_nodes"]
        click.echo(f"removed user {answer['name']}" + (f" and {', '.join(gone)}" if gone else ""))

    @nodes.command("remove")
    @click.argument("name")
    @_json_option
    @_data_option
    def nodes_remove(name: str, as_json: bool, data_dir: Path | None) -> None:
        """Remove a node: its sessions and streams end now; it must re-enroll to return."""
        answer = _admin(data_dir, {"op": "nodes.remove", "name": name})
        if as_json:
            click.echo(json.dumps({"name": answer["name"], "node_id": answer["node_id"]}))
        else:
            click.echo(f"removed {answer['name']} ({answer['node_id']})")

    @cli.command("audit")
    @click.option("--follow", "-f", is_flag=True, help="Keep printing events as they come.")
    @click.option("--since", metavar="AGE", default=None, help="Only events this recent: 1h, 7d.")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
    @_data_option
    def audit_cmd(follow: bool, since: str | None, as_json: bool, data_dir: Path | None) -> None:
        """Print the audit log (audit.jsonl in the data directory; needs its permission)."""
        from homeport.server import audit as au
        from homeport.server.admin import parse_duration

        start: float | None = None
        if since is not None:
            try:
                age = parse_duration(since)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--since") from None
            start = None if age is None else time.time() - age
        path = au.audit_path(_resolve_data(data_dir))

        def show(events: Any) -> None:
            for ev in au.since_filter(events, start):
                click.echo(json.dumps(ev) if as_json else au.render(ev))

        stats = au.ReadStats()
        try:
            if path.exists():
                show(au.read_events(path, stats))
            elif not follow:
                raise click.ClickException(f"no audit log at {path} (has the server run here?)")
            if follow:
                sys.stdout.flush()
                show(au.follow(path, stats))
        except PermissionError as exc:
            raise click.ClickException(
                f"cannot read {path}: {exc.strerror}; run as the server's user"
            ) from None
        except KeyboardInterrupt:
            pass
        if stats.skipped:
            click.echo(f"({stats.skipped} damaged line(s) skipped)", err=True)

    _register_policy(cli)
    _register_admin_link(cli)
    _register_apikeys(cli)


def _db_source(text: str, option: str) -> str:
    """A database URL, or a path: a server data directory or a SQLite file."""
    if "://" in text:
        return text
    from homeport.server.datadir import resolve_db_url

    path = Path(text).expanduser().absolute()
    if path.is_dir():  # a data directory: the database its server uses
        return (
            resolve_db_url(path, None)
            if option == "--from"
            else f"sqlite:///{path / 'homeport.db'}"
        )
    if option == "--from" and not path.exists():
        raise click.BadParameter(f"{path} does not exist", param_hint=option)
    return f"sqlite:///{path}"


def _server_running(url: str) -> Path | None:
    """The data directory of a running server using the SQLite file ``url`` (None: none)."""
    import socket

    from homeport.server.admin import ADMIN_SOCKET

    if not url.startswith("sqlite:///"):
        return None
    sock_path = Path(url.removeprefix("sqlite:///")).parent / ADMIN_SOCKET
    if not sock_path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(sock_path))
        except OSError:
            return None  # a stale socket
    return sock_path.parent


def _register_migrate_db(server: click.Group) -> None:
    @server.command("migrate-db")
    @click.option(
        "--from",
        "source",
        required=True,
        help="Copy from: a server data directory, a SQLite file, or a database URL.",
    )
    @click.option(
        "--to",
        "target",
        required=True,
        help="Copy to: postgresql://USER:PASS@HOST/DB (or a SQLite file/URL).",
    )
    @click.option("--force", is_flag=True, help="Replace the rows a non-empty target holds.")
    @_json_option
    def migrate_db(source: str, target: str, force: bool, as_json: bool) -> None:
        """Copy all server state (nodes, keys, users, ...) into another database.

        One transaction on the target; row counts verified; a target that holds
        rows is refused unless --force. Stop the server first. Afterwards start
        it with --db TARGET (same --data: the CA and TLS keys stay there).
        """
        from homeport.store.dbcopy import copy_database
        from homeport.store.registry import StoreError

        src, dst = _db_source(source, "--from"), _db_source(target, "--to")
        running = _server_running(src)
        if running is not None:
            raise click.ClickException(
                f"a server is running on {running}; stop it first "
                "(the copy needs a database that nothing writes to meanwhile)"
            )
        try:
            report = copy_database(src, dst, force=force)
        except StoreError as exc:
            raise click.ClickException(str(exc)) from None
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "source": report.source,
                        "target": report.target,
                        "source_schema": report.source_version,
                        "schema": report.schema,
                        "tables": dict(report.tables),
                        "replaced": report.replaced,
                    }
                )
            )
            return
        migrated = (
            f" (migrated from schema {report.source_version})"
            if report.source_version != report.schema
            else ""
        )
        click.echo(f"copied {report.source} -> {report.target}, schema {report.schema}{migrated}")
        if report.replaced:
            click.echo(f"  replaced {report.replaced} rows the target held (--force)")
        click.echo(_table([["table", "rows"]] + [[t, str(n)] for t, n in report.tables]))
        click.echo(
            f"{report.total} rows in one transaction; row counts verified on the target.\n"
            f"next: start the server with --db and the --to URL (same --data: its CA and TLS "
            f"keys stay there)"
        )


def _print_problems(source: str, problems: list[dict[str, Any]], more: int) -> None:
    for p in problems:
        where = f"{source}:{p['line']}:{p['column']}"
        path = f" {p['path']}:" if p.get("path") else ""
        click.echo(f"{where}:{path} {p['error']}", err=True)
    if more:
        click.echo(f"... and {more} more", err=True)


def _read_policy_file(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from None


def _register_policy(cli: click.Group) -> None:
    @cli.group("policy")
    def policy() -> None:
        """The ACL policy (HuJSON, a Tailscale-compatible subset; see docs/policy.md)."""

    @policy.command("check")
    @click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
    @_json_option
    def policy_check(file: Path, as_json: bool) -> None:
        """Check FILE offline: syntax, fields, selectors, and its tests/sshTests."""
        from homeport.policy.acl import PolicyError, compile_policy

        text = _read_policy_file(file)
        try:
            compiled = compile_policy(text)
        except PolicyError as exc:
            problems = [p.as_dict() for p in exc.problems]
            if as_json:
                click.echo(json.dumps({"ok": False, "problems": problems, "more": exc.more}))
            else:
                _print_problems(str(file), problems, exc.more)
            sys.exit(1)
        summary = {
            "ok": True,
            "digest": compiled.digest,
            "acls": len(compiled.acls),
            "ssh": len(compiled.ssh),
        }
        if as_json:
            click.echo(json.dumps(summary))
        else:
            click.echo(
                f"{file}: ok ({summary['acls']} acls, {summary['ssh']} ssh rules, "
                f"{compiled.digest})"
            )

    @policy.command("set")
    @click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
    @_json_option
    @_data_option
    def policy_set(file: Path, as_json: bool, data_dir: Path | None) -> None:
        """Put FILE in force (refused with every problem; the old policy then stays)."""
        from homeport.server.admin import AdminError, admin_request

        text = _read_policy_file(file)
        try:
            answer = admin_request(_resolve_data(data_dir), {"op": "policy.set", "text": text})
        except AdminError as exc:
            raise click.ClickException(str(exc)) from None
        if not answer.get("ok"):
            if as_json:
                click.echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
                sys.exit(1)
            if "problems" in answer:
                _print_problems(str(file), answer["problems"], answer.get("more", 0))
            raise click.ClickException(str(answer.get("error", "policy set failed")))
        if as_json:
            click.echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
            return
        where = "in force" if answer.get("live") else "stored (applies when the server starts)"
        click.echo(
            f"policy {answer['digest']} {where}: {answer['acls']} acls, {answer['ssh']} ssh rules"
        )

    @policy.command("unset")
    @_json_option
    @_data_option
    def policy_unset(as_json: bool, data_dir: Path | None) -> None:
        """Remove the policy: back to the default (every node reaches every exposed service)."""
        answer = _admin(data_dir, {"op": "policy.unset"})
        if as_json:
            click.echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
        elif answer["removed"]:
            click.echo("policy removed: every node may reach every service another node exposes")
        else:
            click.echo("no policy was set", err=True)

    @policy.command("get")
    @_json_option
    @_data_option
    def policy_get(as_json: bool, data_dir: Path | None) -> None:
        """Print the policy in force (its text as stored)."""
        answer = _admin(data_dir, {"op": "policy.get"})
        if as_json:
            click.echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
        elif not answer["set"]:
            click.echo(
                "no policy: every node may reach every service another node exposes", err=True
            )
        else:
            click.echo(answer["text"], nl=not answer["text"].endswith("\n"))

    @policy.command("explain")
    @click.argument("src")
    @click.argument("dst_port", metavar="DST:PORT")
    @click.option("--user", "local_user", default=None, help="Also explain ssh login as USER.")
    @_json_option
    @_data_option
    def policy_explain(
        src: str, dst_port: str, local_user: str | None, as_json: bool, data_dir: Path | None
    ) -> None:
        """Dry run: may SRC reach DST:PORT (a port, a service name, or exit)? Verdict and rule."""
        dst, sep, service = dst_port.rpartition(":")
        if not sep or not dst or not service:
            raise click.BadParameter("expected DST:PORT, e.g. labpc:22", param_hint="DST:PORT")
        request: dict[str, Any] = {"op": "policy.explain", "src": src, "dst": dst}
        request["service"] = service
        if local_user is not None:
            request["user"] = local_user
        answer = _admin(data_dir, request)
        if as_json:
            click.echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
            return
        click.echo(f"{answer['verdict']}  (rule {answer['rule']})  {answer['reason']}")
        ssh = answer.get("ssh")
        if ssh is not None:
            click.echo(
                f"ssh as {ssh['user']}: {ssh['verdict']}  (rule {ssh['rule']})  {ssh['reason']}"
            )


def _register_apikeys(cli: click.Group) -> None:
    @cli.group("apikeys")
    def apikeys() -> None:
        """Tokens for the REST API on the admin listener (run on the server host; docs/api.md)."""

    @apikeys.command("create")
    @click.option("--name", required=True, help="What the token is for (shown in lists and logs).")
    @click.option(
        "--scope",
        type=click.Choice(["read", "admin"]),
        default="read",
        show_default=True,
        help="read: look only (GET); admin: everything the admin commands can do.",
    )
    @click.option(
        "--user", default=None, metavar="USER", help="Tie the token to USER: it ends with the user."
    )
    @click.option(
        "--expiry", default="never", show_default=True, help="Lifetime: 30d, 12h, ... or never."
    )
    @_json_option
    @_data_option
    def apikeys_create(  # noqa: PLR0917 - one option each
        name: str,
        scope: str,
        user: str | None,
        expiry: str,
        as_json: bool,
        data_dir: Path | None,
    ) -> None:
        """Create an API token; prints only the token on stdout (it is shown this once)."""
        seconds = _duration(expiry, "--expiry")
        answer = _admin(
            data_dir,
            {
                "op": "apikeys.create",
                "name": name,
                "scope": scope,
                "user": user,
                "expiry_seconds": seconds,
            },
        )
        if as_json:
            click.echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
            return
        click.echo(answer["token"])
        life = "never expires" if seconds is None else f"expires in {expiry}"
        click.echo(
            f"(API key {answer['key_id']}, scope {scope}, {life}) use it as "
            "'Authorization: Bearer TOKEN'; it cannot be shown again",
            err=True,
        )

    @apikeys.command("list")
    @_json_option
    @_data_option
    def apikeys_list(as_json: bool, data_dir: Path | None) -> None:
        """List API keys (never their tokens)."""
        answer = _admin(data_dir, {"op": "apikeys.list"})
        if as_json:
            click.echo(json.dumps(answer["keys"]))
            return
        now = time.time()
        rows = [["KEY ID", "NAME", "SCOPE", "USER", "STATUS", "CREATED", "EXPIRES"]]
        for k in answer["keys"]:
            rows.append(
                [
                    k["key_id"],
                    k["name"],
                    k["scope"],
                    k["user"] or "-",
                    k["status"],
                    _when(k["created_at"], now),
                    "never" if k["expires_at"] is None else _when(k["expires_at"], now),
                ]
            )
        click.echo(_table(rows) if len(rows) > 1 else "no API keys")

    @apikeys.command("revoke")
    @click.argument("key_id")
    @_json_option
    @_data_option
    def apikeys_revoke(key_id: str, as_json: bool, data_dir: Path | None) -> None:
        """Revoke an API key: requests with its token are refused from now on."""
        _revoke(data_dir, "apikeys.revoke", key_id, as_json, "revoked API key")


def _revoke(data_dir: Path | None, op: str, key_id: str, as_json: bool, done: str) -> None:
    """Revoke an auth or API key through the admin socket; print what the server revoked."""
    answer = _admin(data_dir, {"op": op, "key_id": key_id})
    if as_json:
        click.echo(json.dumps({"key_id": answer["key_id"], "revoked": True}))
    else:
        click.echo(f"{done} {answer['key_id']}")


def _register_admin_link(cli: click.Group) -> None:
    @cli.command("admin-link")
    @_json_option
    @_data_option
    def admin_link(as_json: bool, data_dir: Path | None) -> None:
        """Print a one-time login link for the web admin UI (run on the server host).

        The running server makes it and keeps it in memory: it works once, for 10
        minutes. The secret is in the part after '#', which browsers never send to a
        server; the login page exchanges it for a session cookie and removes it from the
        address bar.
        """
        answer = _admin(data_dir, {"op": "ui.link"})
        if as_json:
            click.echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
            return
        click.echo(answer["url"])
        click.echo("(one-time login link for the web UI; valid 10 minutes)", err=True)
