"""How a client reaches a server: plaintext, TLS, mutual TLS, and a bearer token on every call.

``Credentials`` says how; ``sync_channel`` and ``aio_channel`` open a channel
that applies it to every call on it (unary calls and Session streams alike)::

    creds = Credentials.from_files(ca=Path("ca.pem"), token=os.environ["NEXTWORD_TOKEN"])
    channel = aio_channel("nextword.example:443", creds)

The token travels as gRPC call credentials (``authorization: Bearer TOKEN``),
which gRPC sends only over a protected connection: TLS, or one that never
leaves this machine (local credentials on a loopback address). A token is thus
never sent in clear over a network, whatever the target.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio


class CredentialsError(ValueError):
    """Credentials that cannot be used; the message says what to fix."""


def is_loopback_target(target: str) -> bool:
    """Whether HOST:PORT (or [V6]:PORT, or a bare host) names this machine: 127.0.0.0/8, ::1, localhost.

    Host names other than ``localhost`` are not resolved: a name is refused even
    if it happens to point here, which errs on the safe side.
    """
    host = target
    for scheme in ("dns:///", "ipv4:", "ipv6:"):
        host = host.removeprefix(scheme)
    if host.startswith("["):  # [::1]:50051
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:  # 127.0.0.1:50051 (more than one colon: a bare IPv6 address)
        host = host.rsplit(":", 1)[0]
    host = host.strip().lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Credentials:
    """TLS settings and a bearer token; the default is plaintext with no token.

    ``tls``: verify the server with ``ca`` (PEM), or the system's CAs when
    ``ca`` is None; implied by ``ca``, ``cert`` and ``key``. ``cert``/``key``:
    a client certificate and its key (PEM), for a server that requires one.
    The key and the token are left out of ``repr`` (and so of logs).
    """

    tls: bool = False
    ca: bytes | None = field(default=None, repr=False)
    cert: bytes | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise CredentialsError("a client certificate needs its key, and a key its certificate")
        if self.ca is not None or self.cert is not None:
            object.__setattr__(self, "tls", True)
        if self.token is not None:
            token = self.token.strip()
            # Metadata values are printable ASCII; a space or newline would also change the header.
            if not token or not all("!" <= ch <= "~" for ch in token):
                raise CredentialsError("the bearer token must be printable ASCII with no spaces")
            object.__setattr__(self, "token", token)

    @classmethod
    def from_files(
        cls,
        *,
        tls: bool = False,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        token: str | None = None,
    ) -> Credentials:
        """Credentials from PEM files; raises CredentialsError naming a file that cannot be read."""
        return cls(tls, _read(ca), _read(cert), _read(key), token)

    def channel_credentials(self, target: str) -> grpc.ChannelCredentials | None:
        """What ``grpc.secure_channel`` needs for ``target``; None: a plaintext channel."""
        if self.tls:
            base = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        elif self.token is None:
            return None
        elif target.startswith("unix:"):
            base = grpc.local_channel_credentials(grpc.LocalConnectionType.UDS)
        elif is_loopback_target(target):
            base = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
        else:
            raise CredentialsError(
                f"a bearer token is sent only over TLS or to this machine, and {target} is neither: "
                "connect with TLS (--tls-ca, or --tls for a certificate the system trusts)"
            )
        if self.token is None:
            return base
        return grpc.composite_channel_credentials(base, grpc.access_token_call_credentials(self.token))


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read {path} ({exc.strerror or exc})") from exc


def sync_channel(target: str, credentials: Credentials | None = None) -> grpc.Channel:
    """A blocking channel to ``target`` that applies ``credentials`` to every call."""
    creds = credentials.channel_credentials(target) if credentials else None
    return grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)


def aio_channel(
    target: str, credentials: Credentials | None = None, *, own_connection: bool = False
) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` that applies ``credentials`` to every call (create it in its loop).

    ``own_connection``: a connection of its own, not shared with other channels to the same target
    (gRPC shares them by default), e.g. to reach several of a server's workers.
    """
    creds = credentials.channel_credentials(target) if credentials else None
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, creds, options=options)
