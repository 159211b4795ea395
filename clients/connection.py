"""The options every client command shares: where the server is, TLS, and the bearer token.

``nextword predict``, ``complete`` and ``loadtest`` declare these with their own
options (``COMMANDS`` in ``nextword/cli.py``) and build their clients here, so
all three connect the same way. The token is read from ``--token-file`` or the
``NEXTWORD_TOKEN`` environment variable, never from the command line (where
``ps`` and shell history would show it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nextword.options import option, switch

from .channel import Credentials, CredentialsError
from .client import DEFAULT_TARGET, AsyncNextWordClient, NextWordClient

TOKEN_ENV = "NEXTWORD_TOKEN"


@dataclass(frozen=True)
class ConnectionOptions:
    target: str = option(DEFAULT_TARGET, "server HOST:PORT")
    tls: bool = switch("connect with TLS, trusting the system's CAs (implied by --tls-ca)")
    tls_ca: Path | None = option(None, "PEM CA certificates to verify the server with: connect with TLS")
    tls_cert: Path | None = option(
        None, "PEM client certificate, for a server that requires one (mutual TLS; with --tls-key)"
    )
    tls_key: Path | None = option(None, "PEM private key of --tls-cert")
    token_file: Path | None = option(
        None, f"file holding the bearer token to send (default: the {TOKEN_ENV} environment variable)"
    )

    def token(self) -> str | None:
        """The bearer token: the file's content, else $NEXTWORD_TOKEN, else None."""
        if self.token_file is None:
            return os.environ.get(TOKEN_ENV) or None
        token = (_read(self.token_file, "--token-file") or b"").decode("utf-8", "replace").strip()
        if not token:
            raise CredentialsError(f"--token-file {self.token_file} is empty")
        return token

    def credentials(self) -> Credentials:
        """The TLS files read and the token found; raises CredentialsError naming the flag to fix."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CredentialsError("--tls-cert and --tls-key go together")
        creds = Credentials(
            self.tls,
            _read(self.tls_ca, "--tls-ca"),
            _read(self.tls_cert, "--tls-cert"),
            _read(self.tls_key, "--tls-key"),
            self.token(),
        )
        creds.channel_credentials(self.target)  # a token that may not go to the target fails now
        return creds

    def client(self, *, timeout: float | None) -> NextWordClient:
        return NextWordClient(self.target, timeout=timeout, credentials=self.credentials())

    def async_client(self, *, timeout: float | None) -> AsyncNextWordClient:
        return AsyncNextWordClient(self.target, timeout=timeout, credentials=self.credentials())


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{flag}: cannot read {path} ({exc.strerror or exc})") from exc
