"""The SSH CA key pair in the server's data directory (``ssh_ca`` 0600, ``ssh_ca.pub``).

Created on first start, like the node CA: the key never leaves the data
directory; only its public line travels (WELCOME.ssh_ca, SSH_CERT.ca_key).
"""

from __future__ import annotations

import os
from pathlib import Path

from homeport.crypto.sshca import CA_KEY_FILE, CA_PUB_FILE, SshCa, SshCaError
from homeport.node.files import write_private, write_public


def load_or_create_ssh_ca(data_dir: Path) -> SshCa:
    """The server's SSH user CA, created (0600) if the data directory has none.

    Raises:
        SshCaError: the key file exists but is not usable, or is readable by others.
    """
    path = data_dir / CA_KEY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = SshCa.generate()
        write_private(path, data)
    else:
        if os.stat(path).st_mode & 0o077:
            raise SshCaError(f"{path} must not be readable by others (chmod 600 {path})")
    ca = SshCa(data)
    pub = data_dir / CA_PUB_FILE
    line = (ca.public_line + " homeport-ssh-ca\n").encode()
    try:
        current = pub.read_bytes()
    except FileNotFoundError:
        current = b""
    if current != line:
        write_public(pub, line)
    return ca
