"""TLS contexts with credentials loaded from files: the I/O half of :mod:`homeport.crypto.tls`.

``crypto.tls`` decides the policy (TLS 1.3 only, ALPN, which peer certificates
are required) without touching the disk; this module loads a key, certificate
and CA into such a context. Python's ``ssl`` can load a certificate chain only
from a file (``load_cert_chain`` has no in-memory form), which is why the split
is here and not a bytes-in API.

Standard library only: ``homeport nc`` imports it on its direct path.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from homeport.crypto.tls import control_client_policy, control_server_policy, stream_policy
from homeport.io import recstream


def control_client_context(cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Context for dialing the server (:func:`~homeport.crypto.tls.control_client_policy`).

    ``cert``/``key``: the node's identity; None while enrolling (no identity yet).
    """
    ctx = control_client_policy()
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def data_client_context() -> ssl.SSLContext:
    """Context for the outer TLS of a TLS-wrapped data connection (:mod:`homeport.wire.data`).

    The control client's policy (the server is pinned after the handshake) with
    exactly one ALPN name, ``homeport-data/1``, which is how the server tells it
    from a control connection. No client certificate: the preamble's token is
    what the relay checks, and the stream inside is end-to-end authenticated.
    """
    from homeport.wire.data import ALPN_DATA

    ctx = control_client_policy()
    ctx.set_alpn_protocols([ALPN_DATA])
    return ctx


def webpki_client_context() -> ssl.SSLContext:
    """Context that checks the server's certificate the way a browser does (system CAs).

    Used only to let a node follow a renewal of a publicly trusted server
    certificate (see :func:`homeport.io.dial.renewed_pin`); ``SSL_CERT_FILE``
    and ``SSL_CERT_DIR`` choose other trust anchors, as for any OpenSSL client.
    """
    ctx = control_client_policy()
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_default_certs()
    return ctx


def control_server_context(cert: Path, key: Path, ca_cert: Path) -> ssl.SSLContext:
    """Context for the server's listener, trusting node certificates of ``ca_cert``."""
    ctx = control_server_policy()
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca_cert))
    return ctx


def stream_context(*, server_side: bool, cert: Path, key: Path, ca_cert: Path) -> ssl.SSLContext:
    """Context for an end-to-end stream (:func:`~homeport.crypto.tls.stream_policy`)."""
    ctx = stream_policy(server_side=server_side, records=recstream.enabled())
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca_cert))
    return ctx
