"""Host-key continuity: the pure pin decision and the pins/ + known_hosts/ files."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from homeport.node import hostkeys as hk
from homeport.node.hostkeys import Pin, PinVerdict
from homeport.wire.hostkey import MAX_HOST_KEYS

# real ed25519 public keys (32-byte points); the wire rule checks their structure
KEY_A = (
    "ssh-ed25519 "
    + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + b"\x01" * 32).decode()
)
KEY_B = (
    "ssh-ed25519 "
    + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + b"\x02" * 32).decode()
)
KEY_C = (
    "ssh-ed25519 "
    + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + b"\x03" * 32).decode()
)
NOW = 1_764_900_000.0
PIN = Pin("labpc", "n0a0b0c", (KEY_A, KEY_B), NOW - 86400)


@pytest.mark.parametrize(
    ("pin", "node_id", "keys", "verdict"),
    [
        (None, "n0a0b0c", (KEY_A,), PinVerdict.FIRST),
        (PIN, "n0a0b0c", (KEY_B, KEY_A), PinVerdict.SAME),  # order does not matter
        (PIN, "n0a0b0c", (KEY_A, KEY_B, KEY_A), PinVerdict.SAME),  # duplicates neither
        (PIN, "nffffff", (KEY_A, KEY_B), PinVerdict.NODE_CHANGED),  # same keys, other node
        (PIN, "nffffff", (KEY_C,), PinVerdict.NODE_CHANGED),  # the re-enrolled impostor
        (PIN, "n0a0b0c", (KEY_C,), PinVerdict.KEYS_CHANGED),  # replaced
        (PIN, "n0a0b0c", (KEY_A, KEY_B, KEY_C), PinVerdict.KEYS_CHANGED),  # one added
        (PIN, "n0a0b0c", (KEY_A,), PinVerdict.KEYS_CHANGED),  # one dropped
        (PIN, "n0a0b0c", (), PinVerdict.NO_KEYS),  # sshd not announced now: pins stay
        (Pin("labpc", "n0a0b0c", (), NOW), "n0a0b0c", (KEY_A,), PinVerdict.KEYS_ADDED),
        (Pin("labpc", "", (KEY_A,), NOW), "n0a0b0c", (KEY_A,), PinVerdict.SAME),  # legacy
        (Pin("labpc", "", (KEY_A,), NOW), "n0a0b0c", (KEY_B,), PinVerdict.KEYS_CHANGED),
        (None, "n0a0b0c", ("ssh-ed25519 AAAA",), PinVerdict.BAD_KEYS),
        (None, "n0a0b0c", (KEY_A + "\nevil.example ssh-ed25519 AAAA",), PinVerdict.BAD_KEYS),
        (None, "", (KEY_A,), PinVerdict.BAD_NODE_ID),
        (None, "n0 evil", (KEY_A,), PinVerdict.BAD_NODE_ID),
        (None, "n" * 65, (KEY_A,), PinVerdict.BAD_NODE_ID),
    ],
)
def test_check_pin_table(
    pin: Pin | None, node_id: str, keys: tuple[str, ...], verdict: PinVerdict
) -> None:
    d = hk.check_pin("labpc", pin, node_id, keys, NOW)
    assert d.verdict is verdict, d.reason
    assert d.allowed == (
        verdict in (PinVerdict.FIRST, PinVerdict.SAME, PinVerdict.KEYS_ADDED, PinVerdict.NO_KEYS)
    )
    if not d.allowed:
        assert d.pin is None and d.keys == ()
        assert "\n" not in d.reason
    if verdict in (PinVerdict.NODE_CHANGED, PinVerdict.KEYS_CHANGED):
        assert d.reason.endswith("run: homeport trust reset labpc")
        assert "since" in d.reason


def test_refusal_messages_say_what_changed() -> None:
    d = hk.check_pin("labpc", PIN, "nffffff", (KEY_C,), NOW)
    assert "different node (nffffff, pinned n0a0b0c since" in d.reason
    d = hk.check_pin("labpc", PIN, "n0a0b0c", (KEY_A, KEY_C), NOW)
    assert f"new {hk.fingerprint(KEY_C)}" in d.reason
    assert f"gone {hk.fingerprint(KEY_B)}" in d.reason


def test_too_many_keys_from_the_server_are_refused() -> None:
    keys = tuple(
        "ssh-ed25519 "
        + base64.b64encode(
            b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + bytes([i]) * 32
        ).decode()
        for i in range(MAX_HOST_KEYS + 1)
    )
    assert hk.check_pin("labpc", None, "n1", keys, NOW).verdict is PinVerdict.BAD_KEYS


def test_fingerprint_matches_ssh_keygen_form() -> None:
    fp = hk.fingerprint(KEY_A)
    assert fp.startswith("ssh-ed25519 SHA256:") and not fp.endswith("=")


# -- files ---------------------------------------------------------------------------


def _kh(state: Path, name: str = "labpc") -> str:
    return (state / "known_hosts" / name).read_text()


def test_admit_pins_then_refuses_another_node_until_reset(tmp_path: Path) -> None:
    d = hk.admit(tmp_path, "labpc", 22, "n0a0b0c", (KEY_A,), now=NOW)
    assert d.verdict is PinVerdict.FIRST
    assert _kh(tmp_path) == f"labpc {KEY_A}\n"
    pin_file = tmp_path / "pins" / "labpc"
    assert stat.S_IMODE(pin_file.stat().st_mode) == 0o600
    assert json.loads(pin_file.read_text())["node_id"] == "n0a0b0c"
    # the same node again: nothing rewritten
    before = os.stat(tmp_path / "known_hosts" / "labpc").st_mtime_ns
    assert hk.admit(tmp_path, "labpc", 22, "n0a0b0c", (KEY_A,), now=NOW).verdict is PinVerdict.SAME
    assert os.stat(tmp_path / "known_hosts" / "labpc").st_mtime_ns == before
    # a re-enrolled labpc with another sshd: refused, and known_hosts still holds the old key
    with pytest.raises(hk.TrustError, match="different node"):
        hk.admit(tmp_path, "labpc", 22, "n1111111", (KEY_B,), now=NOW)
    assert _kh(tmp_path) == f"labpc {KEY_A}\n"
    # the same node with new keys: refused too
    with pytest.raises(hk.TrustError, match="host keys changed"):
        hk.admit(tmp_path, "labpc", 22, "n0a0b0c", (KEY_B,), now=NOW)
    assert [p.name for p in hk.list_pins(tmp_path)] == ["labpc"]
    assert hk.reset_pin(tmp_path, "labpc") is True
    assert hk.reset_pin(tmp_path, "labpc") is False
    assert hk.list_pins(tmp_path) == []
    d = hk.admit(tmp_path, "labpc", 2222, "n1111111", (KEY_B,), now=NOW + 1)
    assert d.verdict is PinVerdict.FIRST
    assert _kh(tmp_path) == f"labpc {KEY_B}\n[labpc]:2222 {KEY_B}\n"
    before = os.stat(tmp_path / "known_hosts" / "labpc").st_mtime_ns
    hk.admit(tmp_path, "labpc", 2222, "n1111111", (KEY_B,), now=NOW + 2)  # unchanged: no write
    assert os.stat(tmp_path / "known_hosts" / "labpc").st_mtime_ns == before
    hk.admit(tmp_path, "labpc", 22, "n1111111", (KEY_B,), now=NOW + 2)  # another port: rewritten
    assert _kh(tmp_path) == f"labpc {KEY_B}\n"


def test_known_hosts_from_before_pins_is_adopted_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "known_hosts").mkdir()
    (tmp_path / "known_hosts" / "labpc").write_text(f"labpc {KEY_A}\n[labpc]:2222 {KEY_A}\n")
    (pin,) = hk.list_pins(tmp_path)
    assert (pin.node_id, pin.host_keys) == ("", (KEY_A,))
    with pytest.raises(hk.TrustError, match="host keys changed"):
        hk.admit(tmp_path, "labpc", 22, "n0a0b0c", (KEY_B,), now=NOW)
    d = hk.admit(tmp_path, "labpc", 22, "n0a0b0c", (KEY_A,), now=NOW)
    assert d.verdict is PinVerdict.SAME
    assert hk.load_pin(tmp_path, "labpc") == Pin("labpc", "n0a0b0c", (KEY_A,), pin.since)


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[]", b'{"name": "other", "node_id": "n1", "host_keys": [], "since": 1}',
     b'{"name": "labpc", "node_id": "n1", "host_keys": ["junk"], "since": 1}',
     b"x" * (hk.MAX_PIN_FILE + 1)],
)  # fmt: skip
def test_a_damaged_pin_refuses_rather_than_guesses(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "pins").mkdir()
    (tmp_path / "pins" / "labpc").write_bytes(content)
    with pytest.raises(hk.TrustError, match="trust reset labpc"):
        hk.admit(tmp_path, "labpc", 22, "n1", (KEY_A,), now=NOW)
    assert not (tmp_path / "known_hosts" / "labpc").exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden"])
def test_bad_names_never_become_paths(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError):
        hk.admit(tmp_path, name, 22, "n1", (KEY_A,), now=NOW)
    with pytest.raises(ValueError):
        hk.reset_pin(tmp_path, name)
