"""The ``homeport`` command line (click). Subcommands live with their process:

* server side: :mod:`homeport.server.cli` — ``server``, ``keys``, ``nodes``
* node side:   :mod:`homeport.agent.cli` — ``up``; :mod:`homeport.client.cli` —
  ``status``, ``nc``, ``ssh``, ``ssh-config``, ``forward``, ``service``

Command modules must import heavy dependencies inside the command functions so
``homeport --help`` stays quick.
"""

from __future__ import annotations

import click

from homeport import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="homeport")
def cli() -> None:
    """Reach machines behind NAT with plain OpenSSH, through your own relay."""


def _register() -> None:
    from homeport.agent.cli import register as register_agent
    from homeport.client.cli import register as register_client
    from homeport.server.cli import register as register_server

    register_server(cli)
    register_agent(cli)
    register_client(cli)
    from homeport.client import cli as client_cli
    from homeport.server.cli import admin_login_approve

    client_cli.ADMIN_LOGIN_APPROVE = admin_login_approve  # ``login approve`` on the server host
    client_cli.add_profile_options(cli)  # --profile NAME wherever there is a --state


_register()
