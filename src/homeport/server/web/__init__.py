"""The admin listener's HTTP side: REST API (``/api/v1``), ``/metrics``, the web UI's routes.

Starlette applications served by uvicorn on the server's own event loop
(:mod:`homeport.server.web.listener`). Nothing here is imported by ``homeport nc``.
"""
