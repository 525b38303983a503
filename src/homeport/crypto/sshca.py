"""The server's SSH user certificate authority (keyless SSH on stock sshd).

Why certificates: with a CA key trusted by sshd (``TrustedUserCAKeys`` or a
``cert-authority`` line in ``authorized_keys``), nobody manages per-user
``authorized_keys`` any more. The coordinator already decides who may reach
which node; here it also decides *as which local account*, from the policy's
``ssh`` rules, and says so in a short-lived certificate that a stock sshd
checks by itself.

This module is pure: key generation, signing and the decision, no files (the
server's data directory holds the key; :mod:`homeport.server.sshca` reads and
writes it) and no clock (``now`` is passed in).

What a certificate says (decided here, documented in docs/policy.md "Keyless SSH"):

* principals: exactly the local accounts the ``ssh`` rules let this source log
  in as on this destination *now* (``check`` rules only with a fresh approval).
  ``autogroup:nonroot`` is expanded against the requested account only, and
  never to ``root``: a wildcard is not something sshd can check, so it is
  resolved to the one name asked for.
* validity: ``DEFAULT_VALIDITY`` (5 min) from ``now - CLOCK_SKEW`` (a host whose
  clock is a little behind still accepts it); never more than ``MAX_VALIDITY``.
  Short validity is what limits a stolen certificate: there is no revocation.
* key id: ``homeport:<node>:<account>:<rule>:<serial>``, which sshd logs on every
  login ("Accepted publickey ... ID homeport:laptop:alice:ssh[0]:…"), so the
  host's own log says which node and which rule let someone in.
* extensions: ``permit-pty`` only. No agent, X11 or port forwarding and no
  ``~/.ssh/rc``: the policy's ``ssh`` rules have no field that asks for them,
  and a certificate must not grant more than the policy says. No critical
  options (``source-address`` would name the agent's loopback relay end, not
  the real client).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    SSHCertificateBuilder,
    SSHCertificateType,
)

from homeport.policy.acl import NONROOT, CompiledPolicy, SshVerdict, Subject, check_ssh, ssh_access
from homeport.wire import hostkey
from homeport.wire.errors import WireError

#: File names of the CA key pair in the server's data directory (private 0600).
CA_KEY_FILE = "ssh_ca"
CA_PUB_FILE = "ssh_ca.pub"
#: How long a certificate is valid by default (seconds): one ``ssh`` login's worth.
DEFAULT_VALIDITY = 300.0
#: The longest validity the CA signs, whatever a caller asks (a named limit).
MAX_VALIDITY = 3600.0
#: A certificate starts this far in the past: hosts whose clocks lag still accept it.
CLOCK_SKEW = 60.0
#: Most principals in one certificate (a policy naming more accounts is cut, sorted).
MAX_PRINCIPALS = 32
#: Longest key id (sshd logs it; names and rule paths are short).
MAX_KEY_ID = 200
#: The only extension a certificate carries (see the module docstring).
EXTENSIONS: tuple[str, ...] = ("permit-pty",)
#: User key types the CA signs (what ``cryptography`` can load; no FIDO keys yet).
USER_KEY_TYPES = frozenset({hostkey.ED25519, hostkey.RSA, *hostkey.ECDSA_CURVES})
#: Smallest RSA user key signed.
MIN_RSA_BITS = 2048
#: A local account name sshd can be asked to log in as (POSIX-ish, no ``@`` or ``:``).
ACCOUNT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")

#: Refusal codes (stable: tests, logs, the client's message).
NO_CA = "no-ssh-ca"
BAD_REQUEST = "bad-request"
DENIED = "policy"
CHECK_REQUIRED = "check-required"


class SshCaError(Exception):
    """The CA key could not be loaded or a certificate not be made."""


def valid_account(name: str) -> bool:
    """True if ``name`` is a local account name we put in a certificate."""
    return bool(ACCOUNT_RE.match(name))


def user_key_untrusted(line: str) -> str:
    """Check an SSH public key line from the network; return it as ``TYPE BASE64``.

    As strict as host keys (:func:`homeport.wire.hostkey.parse_host_key_untrusted`:
    canonical base64, a well-formed blob of the named type), limited to the
    types the CA signs, and RSA keys of at least :data:`MIN_RSA_BITS`.

    Raises:
        WireError: anything else.
    """
    key = hostkey.parse_host_key_untrusted(line)
    if key.key_type not in USER_KEY_TYPES:
        raise WireError(f"the CA does not sign {key.key_type} keys")
    text = key.line()
    try:
        loaded = serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError, NotImplementedError):
        raise WireError("not a public key the CA can sign") from None
    if isinstance(loaded, rsa.RSAPublicKey) and loaded.key_size < MIN_RSA_BITS:
        raise WireError(f"RSA keys shorter than {MIN_RSA_BITS} bits are not signed")
    return text


@dataclass(frozen=True, slots=True)
class CertPlan:
    """What to sign: the principals, the deciding rule and why (a granted request)."""

    principals: tuple[str, ...]
    rule: str
    verdict: SshVerdict
    reason: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why no certificate: a stable code, one sentence naming the rule, the rule."""

    code: str
    reason: str
    rule: str
    check_period: float = 0.0


def _fresh(approved_at: float | None, period: float, now: float) -> bool:
    return approved_at is not None and now - approved_at < period


def plan_certificate(
    policy: CompiledPolicy | None,
    src: Subject,
    dst: Subject,
    account: str,
    *,
    approved_at: float | None,
    now: float,
) -> CertPlan | Refusal:
    """Decide a certificate for ``src`` to log in to ``dst`` as ``account``.

    ``approved_at``: when ``src`` last completed a login check (``homeport
    login``), None if never; a ``check`` rule needs it younger than its
    ``checkPeriod``. The principals are every account the rules allow *now*
    (the requested one first decides; others ride along only if allowed the
    same way), ``autogroup:nonroot`` resolved to the requested account only.
    """
    if not valid_account(account):
        return Refusal(BAD_REQUEST, f"{account[:40]!r} is not a local account name", "")
    first = check_ssh(policy, src, dst, account)
    if first.verdict is SshVerdict.DENY:
        return Refusal(first.code, first.reason, first.rule)
    if first.verdict is SshVerdict.CHECK and not _fresh(approved_at, first.check_period, now):
        return Refusal(
            CHECK_REQUIRED,
            f"{first.rule} needs a login check every {_period(first.check_period)}: run "
            "'homeport login' (an admin or another approved device of yours approves it)",
            first.rule,
            first.check_period,
        )
    grant = ssh_access(policy, src, dst)
    names = [account]
    for u in (*grant.accept_users, *grant.check_users):
        if u == NONROOT or u in names or not valid_account(u):
            continue
        d = check_ssh(policy, src, dst, u)
        if d.verdict is SshVerdict.ACCEPT or (
            d.verdict is SshVerdict.CHECK and _fresh(approved_at, d.check_period, now)
        ):
            names.append(u)
    principals = (account, *sorted(names[1:]))[:MAX_PRINCIPALS]
    return CertPlan(principals, first.rule, first.verdict, first.reason)


def _period(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def key_id(node: str, account: str, rule: str, serial: int) -> str:
    """The certificate's key id, logged by sshd on every login with it."""
    return f"homeport:{node}:{account}:{rule}:{serial:016x}"[:MAX_KEY_ID]


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """A signed certificate line (``...-cert-v01@openssh.com BASE64 key-id``) and its terms."""

    line: str
    principals: tuple[str, ...]
    key_id: str
    serial: int
    valid_after: int
    valid_before: int


class SshCa:
    """An Ed25519 SSH CA key that signs short-lived user certificates."""

    def __init__(self, private_openssh: bytes) -> None:
        try:
            key = serialization.load_ssh_private_key(private_openssh, password=None)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise SshCaError(f"the SSH CA key is not an OpenSSH private key: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise SshCaError("the SSH CA key must be Ed25519")
        self._key = key
        self.public_line = (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )

    @staticmethod
    def generate() -> bytes:
        """A new CA private key in OpenSSH format (the caller stores it 0600)."""
        return ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )

    def sign_user(
        self,
        public_key_line: str,
        principals: tuple[str, ...],
        *,
        key_id: str,
        serial: int,
        now: float,
        validity: float = DEFAULT_VALIDITY,
    ) -> IssuedCert:
        """Sign a user certificate for ``public_key_line`` (checked by :func:`user_key_untrusted`).

        Raises:
            SshCaError: no principals, or a key the CA cannot sign.
        """
        if not principals or not all(valid_account(p) for p in principals):
            raise SshCaError("a certificate needs valid principals")
        try:
            pub = serialization.load_ssh_public_key(public_key_line.encode())
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise SshCaError(f"cannot sign this key: {exc}") from None
        if not isinstance(
            pub, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
        ):
            raise SshCaError("cannot sign this key type")
        after = int(now - CLOCK_SKEW)
        before = int(now + min(max(validity, 1.0), MAX_VALIDITY))
        builder = (
            SSHCertificateBuilder()
            .public_key(pub)
            .serial(serial & 0xFFFFFFFFFFFFFFFF)
            .type(SSHCertificateType.USER)
            .key_id(key_id.encode())
            .valid_principals([p.encode() for p in principals])
            .valid_after(after)
            .valid_before(before)
        )
        for ext in EXTENSIONS:
            builder = builder.add_extension(ext.encode(), b"")
        cert = builder.sign(self._key)
        line = cert.public_bytes().decode()
        return IssuedCert(line, principals, key_id, serial, after, before)
