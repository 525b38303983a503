"""The one table of naming rules: node names, service names, peer host names, --expose targets.

Every check returns None for a valid name or one line for the user saying what
is wrong (never an exception, never a traceback): the CLI prints it, the server
puts it into ERROR(bad-name), the local API into its error reply. A name longer
than its limit gets a message that says so, with the name cut for display.

=====================  ====================================  =======================
rule                   allowed                               used for
=====================  ====================================  =======================
node name              1..63 of ``a-z 0-9 -``, no ``-`` at   ``up --name``, ENROLL,
                       either end (a lowercase DNS label)    ssh host alias, file name
service name           1..63 of ``A-Z a-z 0-9 - _``, not     ``--expose NAME=``,
                       all digits (that reads as a port)     ANNOUNCE
service reference      a port 1..65535, or a service name    ``nc HOST PORT``,
                                                             ``forward NODE:PORT``
peer host name         1..253 of ``A-Z a-z 0-9 . _ -``, not  ``nc`` / ``ssh`` ``%h``;
                       starting with ``.``                   ``known_hosts/<name>``
target host            an IPv4/IPv6 address, or a DNS name   ``--expose =HOST:PORT``
                       (labels 1..63 of ``A-Z a-z 0-9 -``,
                       no ``-`` at either end; 1..253)
user name              1..128: a lowercase login (``a-z 0-9  ``users create``,
                       . _ - +``, starting alnum), optionally ``keys create --user``
                       ``@`` a lowercase DNS name; no ``:``
tag                    ``tag:`` + 1..63 of ``a-z 0-9 -``     ``keys create --tag``
=====================  ====================================  =======================

Pure and import-free (not even ``re`` or ``__future__``): ``homeport nc``
checks its arguments with it on the warm path, which loads only builtins.
"""

#: Longest node name (a DNS label).
MAX_NODE_NAME = 63
#: Longest service name.
MAX_SERVICE_NAME = 63
#: Longest peer host name or --expose target host name (a DNS name).
MAX_HOST_NAME = 253
#: Longest label of a DNS name.
MAX_LABEL = 63
#: Highest TCP port.
MAX_PORT = 65535
#: How much of a bad name a message shows.
SHOWN = 40

_LOWER_DIGITS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_ALNUM = _LOWER_DIGITS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_NODE_CHARS = _LOWER_DIGITS | {"-"}
_SERVICE_CHARS = _ALNUM | {"-", "_"}
_HOST_CHARS = _ALNUM | {"-", "_", "."}
_LABEL_CHARS = _ALNUM | {"-"}


def _show(name: str) -> str:
    """``name`` quoted for a message, cut to :data:`SHOWN` characters."""
    if len(name) > SHOWN:
        return repr(name[:SHOWN]) + "…"
    return repr(name)


def _too_long(kind: str, name: str, limit: int) -> str:
    return f"bad {kind} {_show(name)}: {len(name)} characters, the limit is {limit}"


def node_name_problem(name: str) -> str | None:
    """Why ``name`` is not a node name (a lowercase DNS label), or None."""
    if not name:
        return "bad node name: empty"
    if len(name) > MAX_NODE_NAME:
        return _too_long("node name", name, MAX_NODE_NAME)
    if not set(name) <= _NODE_CHARS or name[0] == "-" or name[-1] == "-":
        return (
            f"bad node name {_show(name)}: use lowercase letters, digits and '-', "
            f"up to {MAX_NODE_NAME} characters, not starting or ending with '-'"
        )
    return None


def service_name_problem(name: str) -> str | None:
    """Why ``name`` is not a service name, or None."""
    if not name:
        return "bad service name: empty"
    if len(name) > MAX_SERVICE_NAME:
        return _too_long("service name", name, MAX_SERVICE_NAME)
    if not set(name) <= _SERVICE_CHARS:
        return f"bad service name {_show(name)}: use letters, digits, '-' and '_'"
    if name.isdigit():
        return f"bad service name {_show(name)}: all digits reads as a port"
    return None


def port_problem(port: int) -> str | None:
    """Why ``port`` is not a TCP port a service may have, or None."""
    if not 0 < port <= MAX_PORT:
        return f"port {port} out of range (1-{MAX_PORT})"
    return None


def service_ref_problem(text: str) -> str | None:
    """Why ``text`` names no service (a port number or a service name), or None."""
    if text.isascii() and text.isdigit():
        if len(text) > 5:
            return f"port {_show(text)} out of range (1-{MAX_PORT})"
        return port_problem(int(text))
    if len(text) > MAX_SERVICE_NAME:
        return f"bad PORT {_show(text)}: {len(text)} characters, the limit is {MAX_SERVICE_NAME}"
    if service_name_problem(text) is not None:
        return f"bad PORT {_show(text)}: a port number or a service name (letters, digits, -, _)"
    return None


def host_name_problem(host: str) -> str | None:
    """Why ``host`` is not a peer host name (also a file name under known_hosts/), or None."""
    if not host:
        return "bad host name: empty"
    if len(host) > MAX_HOST_NAME:
        return _too_long("host name", host, MAX_HOST_NAME)
    if not set(host) <= _HOST_CHARS or host[0] == ".":
        return (
            f"bad host name {_show(host)}: use letters, digits, '.', '_' and '-', "
            "not starting with '.'"
        )
    return None


def _dns_name_ok(host: str) -> bool:
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return all(
        0 < len(label) <= MAX_LABEL
        and set(label) <= _LABEL_CHARS
        and label[0] != "-"
        and label[-1] != "-"
        for label in labels
    )


def target_host_problem(host: str) -> str | None:
    """Why ``host`` is no address or DNS name an agent can connect to (``--expose``), or None.

    ``[v6]`` brackets are the caller's to strip.
    """
    if not host:
        return "bad target host: empty"
    if len(host) > MAX_HOST_NAME:
        return _too_long("target host", host, MAX_HOST_NAME)
    if host.isascii() and ":" in host:
        import ipaddress  # only here: nc never checks a target host

        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"bad target host {_show(host)}: not an IPv6 address"
        return None
    if not host.isascii() or not _dns_name_ok(host):
        return (
            f"bad target host {_show(host)}: use an IP address or a DNS name "
            "(letters, digits and '-' in dot-separated labels)"
        )
    return None


#: Longest user name (``alice`` or ``alice@example.com``).
MAX_USER_NAME = 128
#: Longest tag name after ``tag:``.
MAX_TAG = 63
_USER_LOCAL_CHARS = _LOWER_DIGITS | {".", "_", "-", "+"}


def user_name_problem(name: str) -> str | None:
    """Why ``name`` is not a user name, or None.

    A login name (``alice``) or an e-mail-like one (``alice@example.com``), in
    lowercase so ``Alice`` and ``alice`` can never be two people; no ``:``, so
    a user can never be read as a policy selector (``tag:x``, ``group:x``).
    """
    if not name:
        return "bad user name: empty"
    if len(name) > MAX_USER_NAME:
        return _too_long("user name", name, MAX_USER_NAME)
    local, at, domain = name.partition("@")
    ok = (
        bool(local)
        and set(local) <= _USER_LOCAL_CHARS
        and local[0] in _LOWER_DIGITS
        and (not at or (bool(domain) and domain == domain.lower() and _dns_name_ok(domain)))
    )
    if not ok:
        return (
            f"bad user name {_show(name)}: use a lowercase login name such as alice, "
            "or an address such as alice@example.com"
        )
    return None


def tag_problem(tag: str) -> str | None:
    """Why ``tag`` is not a tag (``tag:`` + a lowercase name such as ``tag:server``), or None."""
    body = tag[4:] if tag.startswith("tag:") else ""
    if len(body) > MAX_TAG:
        return _too_long("tag", tag, MAX_TAG + 4)
    if not body or not set(body) <= _NODE_CHARS or body[0] == "-" or body[-1] == "-":
        return (
            f"bad tag {_show(tag)}: use tag:NAME with lowercase letters, digits and '-', "
            "e.g. tag:server"
        )
    return None
