"""Server-side commands: ``server``, ``keys create|list|revoke``, ``nodes list|remove``.

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


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def register(cli: click.Group) -> None:
    """Add the server-side commands to the ``homeport`` group."""

    @cli.command("server")
    @_data_option
    @click.option("--listen", default="0.0.0.0:8443", show_default=True, help="ADDR:PORT.")
    @click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None)
    @click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None)
    @click.option("--db", "db_url", default=None, help="SQLAlchemy URL [default: SQLite in DIR].")
    @click.option(
        "--idle-timeout", type=float, default=None, help="Seconds of silence before offline."
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
    def server_cmd(
        *,
        data_dir: Path | None,
        listen: str,
        tls_cert: Path | None,
        tls_key: Path | None,
        db_url: str | None,
        idle_timeout: float | None,
        probe_port: int | None,
        relay_only: bool,
    ) -> None:
        """Run the homeport server (coordinator and relay) in the foreground."""
        from homeport.server.app import parse_listen, run_server

        if (tls_cert is None) != (tls_key is None):
            raise click.UsageError("--tls-cert and --tls-key go together")
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--listen") from None
        code = run_server(
            _resolve_data(data_dir),
            listen,
            tls_cert,
            tls_key,
            db_url,
            idle_timeout=idle_timeout,
            probe_port=probe_port,
            relay_only=relay_only,
        )
        sys.exit(code)

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
    @_json_option
    @_data_option
    def keys_create(
        reusable: bool, expiry: str, note: str, as_json: bool, data_dir: Path | None
    ) -> None:
        """Create an auth key; prints only the key on stdout."""
        from homeport.server.admin import parse_duration

        try:
            seconds = parse_duration(expiry)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--expiry") from None
        answer = _admin(
            data_dir,
            {"op": "keys.create", "reusable": reusable, "expiry_seconds": seconds, "note": note},
        )
        if as_json:
            click.echo(json.dumps({k: v for k, v in answer.items() if k != "ok"}))
            return
        click.echo(answer["key"])
        kind = "reusable" if reusable else "single-use"
        life = "never expires" if seconds is None else f"expires in {expiry}"
        click.echo(
            f"({kind}, {life}) on the node: homeport up --server HOST:PORT "
            "--authkey KEY --name NAME",
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
        rows = [["KEY ID", "STATUS", "REUSABLE", "USES", "CREATED", "EXPIRES", "LAST USED", "NOTE"]]
        for k in answer["keys"]:
            rows.append(
                [
                    k["key_id"],
                    k["status"],
                    "yes" if k["reusable"] else "no",
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
        answer = _admin(data_dir, {"op": "keys.revoke", "key_id": key_id})
        if as_json:
            click.echo(json.dumps({"key_id": answer["key_id"], "revoked": True}))
        else:
            click.echo(f"revoked {answer['key_id']}")

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
        rows = [["NAME", "ID", "ONLINE", "LAST SEEN", "SERVICES", "ADDRESS"]]
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
                ]
            )
        click.echo(_table(rows) if len(rows) > 1 else "no nodes")
        if not answer.get("live"):
            click.echo("(the server is not running: every node shows offline)", err=True)

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
