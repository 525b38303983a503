"""Announced sshd host keys: real OpenSSH public keys pass, anything else is a WireError."""

from __future__ import annotations

import base64
import contextlib
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from homeport.wire.errors import TooLarge, WireError
from homeport.wire.hostkey import (
    MAX_HOST_KEY_LEN,
    MAX_HOST_KEYS,
    HostKey,
    parse_host_key_untrusted,
    sanitize_host_keys,
)

ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJCM22JZUrvyZbfuD74UOXyFBC4Z3UDAooS0XFHTNSR+"
SSH_KEYGEN = shutil.which("ssh-keygen")


def ssh_string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def line(key_type: str, *fields: bytes) -> str:
    blob = ssh_string(key_type.encode()) + b"".join(ssh_string(f) for f in fields)
    return f"{key_type} {base64.b64encode(blob).decode()}"


SK_ED = line("sk-ssh-ed25519@openssh.com", b"\x11" * 32, b"ssh:")
#: The P-256 generator: a point on the curve (OpenSSH checks that).
P256_G = bytes.fromhex(
    "04"
    "6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"
    "4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5"
)
SK_EC = line("sk-ecdsa-sha2-nistp256@openssh.com", b"nistp256", P256_G, b"ssh:")


@pytest.fixture(scope="module")
def real_keys(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Fresh public keys of every non-FIDO type, made by OpenSSH's ssh-keygen."""
    if SSH_KEYGEN is None:
        pytest.skip("needs ssh-keygen")
    d = tmp_path_factory.mktemp("keys")
    out = []
    for kind, bits in [
        ("ed25519", None),
        ("ecdsa", 256),
        ("ecdsa", 384),
        ("ecdsa", 521),
        ("rsa", 2048),
    ]:
        path = d / f"{kind}{bits}"
        argv = [SSH_KEYGEN, "-q", "-t", kind, "-N", "", "-C", "root@lab", "-f", str(path)]
        if bits:
            argv[4:4] = ["-b", str(bits)]
        subprocess.run(argv, check=True, timeout=60)
        out.append(path.with_suffix(".pub").read_text().strip())
    return out


def test_real_openssh_keys_parse_and_lose_their_comment(real_keys: list[str]) -> None:
    types = set()
    for text in real_keys:
        key = parse_host_key_untrusted(text)
        assert text.startswith(key.line() + " root@lab")
        types.add(key.key_type)
    assert types == {
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "ssh-rsa",
    }


def test_rendered_lines_are_accepted_by_ssh_keygen(real_keys: list[str], tmp_path: Path) -> None:
    """What we write into known_hosts, OpenSSH itself reads as a public key."""
    assert SSH_KEYGEN is not None
    for text in [*real_keys, SK_ED, SK_EC]:
        f = tmp_path / "k.pub"
        f.write_text(parse_host_key_untrusted(text).line() + "\n")
        res = subprocess.run([SSH_KEYGEN, "-l", "-f", str(f)], capture_output=True, timeout=30)
        assert res.returncode == 0, (text[:40], res.stderr)


def test_fido_key_types_parse() -> None:
    assert parse_host_key_untrusted(SK_ED).key_type == "sk-ssh-ed25519@openssh.com"
    assert parse_host_key_untrusted(SK_EC).key_type == "sk-ecdsa-sha2-nistp256@openssh.com"


def test_hostkey_is_frozen_and_renders_type_base64() -> None:
    key = parse_host_key_untrusted(ED + " a comment with spaces")
    assert key == HostKey("ssh-ed25519", base64.b64decode(ED.split()[1]))
    assert key.line() == ED
    with pytest.raises(AttributeError):
        key.key_type = "ssh-rsa"  # type: ignore[misc]


ED_BLOB = base64.b64decode(ED.split()[1])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ssh-ed25519",
        "ssh-dss " + ED.split()[1],  # DSA is not allowed
        "@cert-authority " + ED,
        "ssh-ed25519-cert-v01@openssh.com " + ED.split()[1],
        ED + "\nevil ssh-ed25519 AAAA",
        ED + "\r",
        ED.replace("AAAA", "AA\x00A", 1),
        "ssh-ed25519 not*base64",
        "ssh-ed25519 " + ED.split()[1].rstrip("+") + "=",  # bad padding
        SK_ED[:-2] + chr(ord(SK_ED[-2]) + 1) + "=",  # non-canonical: pad bits set
        "ssh-rsa " + ED.split()[1],  # blob type differs from the text's type
        line("ssh-ed25519", b"\x00" * 31),  # short key
        line("ssh-ed25519", b"\x00" * 32, b"extra"),  # trailing field
        "ssh-ed25519 " + base64.b64encode(ED_BLOB + b"\x00").decode(),  # trailing byte
        "ssh-ed25519 " + base64.b64encode(ED_BLOB[:-1]).decode(),  # truncated
        line("ecdsa-sha2-nistp256", b"nistp384", b"\x04" + b"\x01" * 64),  # wrong curve
        line("ecdsa-sha2-nistp256", b"nistp256", b"\x02" + b"\x01" * 32),  # compressed point
        line("ecdsa-sha2-nistp256", b"nistp256", b"\x04" + b"\x22" * 64),  # not on the curve
        line("ecdsa-sha2-nistp256", b"nistp256", P256_G[:-1] + bytes([P256_G[-1] ^ 1])),
        line("ssh-rsa", b"\x01\x00\x01", b"\x00\x80" + b"\x01" * 63),  # 512-bit modulus
        line("ssh-rsa", b"\x00\x03", b"\x00\x80" + b"\x01" * 255),  # redundant zero in e
        line("ssh-rsa", b"\x83", b"\x00\x80" + b"\x01" * 255),  # negative e
        line("sk-ssh-ed25519@openssh.com", b"\x11" * 32, b""),  # empty application
        "ssh-ed25519 " + "A" * MAX_HOST_KEY_LEN,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJCM22JZUrvyZbfuD74UOXyFBC4Z3UDAooS0XFHTNSR+ é",
    ],
)
def test_everything_else_is_a_wire_error(text: str) -> None:
    with pytest.raises(WireError):
        parse_host_key_untrusted(text)


def test_too_long_is_too_large() -> None:
    with pytest.raises(TooLarge):
        parse_host_key_untrusted(ED + " " + "c" * MAX_HOST_KEY_LEN)


def test_not_text_is_a_wire_error() -> None:
    with pytest.raises(WireError):
        parse_host_key_untrusted(b"ssh-ed25519 AAAA")  # type: ignore[arg-type]


def test_sanitize_keeps_valid_deduplicated_capped() -> None:
    many = [line("ssh-ed25519", bytes([i]) * 32) for i in range(MAX_HOST_KEYS + 5)]
    got = sanitize_host_keys(["junk", ED, ED + " dup", 42, "", SK_ED, *many])
    assert got[:2] == (ED, SK_ED)
    assert len(got) == MAX_HOST_KEYS and len(set(got)) == MAX_HOST_KEYS


def test_sanitize_of_nothing_valid_is_empty() -> None:
    assert sanitize_host_keys(["ssh-ed25519 AAAAtest", "garbage", ""]) == ()


@given(st.text(max_size=600))
def test_fuzz_text_parses_or_raises_wire_error(text: str) -> None:
    try:
        key = parse_host_key_untrusted(text)
    except WireError:
        return
    assert parse_host_key_untrusted(key.line()) == key


@given(
    st.binary(max_size=400),
    st.sampled_from(sorted(__import__("homeport.wire.hostkey", fromlist=["KEY_TYPES"]).KEY_TYPES)),
)
def test_fuzz_blobs_parse_or_raise_wire_error(blob: bytes, key_type: str) -> None:
    prefixed = ssh_string(key_type.encode()) + blob
    for raw in (blob, prefixed):
        text = f"{key_type} {base64.b64encode(raw).decode()}"
        with contextlib.suppress(WireError):
            parse_host_key_untrusted(text)


@given(st.integers(min_value=0, max_value=len(ED) - 1), st.characters(max_codepoint=0x2FF))
def test_fuzz_one_changed_character(pos: int, char: str) -> None:
    text = ED[:pos] + char + ED[pos + 1 :]
    try:
        key = parse_host_key_untrusted(text)
    except WireError:
        return
    assert key.key_type == "ssh-ed25519"
