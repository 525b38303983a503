"""The web admin UI (``/ui`` on the admin listener): see :mod:`.pages`.

Imported lazily: :mod:`homeport.server.admin` uses :mod:`.session` (one-time login
links), and must not pull Starlette or Jinja2 into every CLI command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from homeport.server.web.app import AdminContext


def routes(ctx: AdminContext, **kwargs: Any) -> list[BaseRoute]:
    """The UI's routes for the admin app (``AdminContext.extra_routes``): ``/ui/...``, and
    ``/`` redirecting there.

    ``kwargs`` go to :class:`~homeport.server.webui.pages.WebUI` (tests pass clocks).
    """
    from homeport.server.webui.pages import WebUI, build_routes

    return build_routes(WebUI(ctx, **kwargs))
