"""Who is calling: TLS and mutual TLS credentials, bearer tokens, and the principal of each call.

A call's *principal* owns the sessions it opens. It is, in order of preference:

* the principal a bearer token maps to, when ``--tokens-file`` is set (metadata
  ``authorization: Bearer TOKEN``; the file holds only SHA-256 digests of tokens);
* the name in the client's certificate, when ``--tls-client-ca`` requires one;
* ``ANONYMOUS`` when neither is configured (sessions are then guarded by their
  unguessable ids alone).

Nothing here ever writes a token, a key or a presented credential to a log, a
metric or an error message.
"""

from __future__ import annotations

import contextvars
import hashlib
import ipaddress
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .config import ANONYMOUS, ServerConfig

log = logging.getLogger("nextword.server")

# The principal of the call being served: set by the guard (guard.py) before any servicer code runs
# for a call from the network; in-process callers of the servicer (benchmarks) are anonymous.
PRINCIPAL: contextvars.ContextVar[str] = contextvars.ContextVar("nextword_principal", default=ANONYMOUS)

DIGEST = re.compile(r"[0-9a-f]{64}")
# Principals appear in logs and in the tokens file: printable, no spaces, bounded.
PRINCIPAL_NAME = re.compile(r"[A-Za-z0-9._@:+=/-]{1,128}")
RELOAD_INTERVAL_S = 1.0  # the tokens file is stat'ed at most this often
QUOTE_CHARS = 16
MetadataValue = str | bytes
AuthContext = Mapping[str, Iterable[bytes]]  # grpc's auth_context(): property name -> values

# Manifest keys that hold local paths, command lines or settings of the machine that made the
# bundle (training and export commands, data and calibration paths): hidden from GetModelInfo.
PRIVATE_MANIFEST_KEYS = frozenset(
    {"argv", "calibration", "command", "data", "out", "path", "reproduce", "resume"}
)


class SecurityError(Exception):
    """A security setting cannot be used; the message names the flag and what to fix."""


class Unauthenticated(Exception):
    """The call has no acceptable credential; the message says what is expected (never what was sent)."""


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """A client-supplied string for an error message: at most ``limit`` characters of it, quoted."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def valid_principal(name: str) -> bool:
    return PRINCIPAL_NAME.fullmatch(name) is not None


def token_digest(token: str) -> str:
    """What the tokens file holds for ``token``: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def public_manifest(manifest_json: str) -> str:
    """The manifest without local paths and command lines (see PRIVATE_MANIFEST_KEYS), as JSON."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in PRIVATE_MANIFEST_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return json.dumps(strip(json.loads(manifest_json)), indent=2) + "\n"


def is_loopback_host(host: str) -> bool:
    """Whether a listen address reaches only this machine (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost: it may resolve anywhere


def exposure_warning(config: ServerConfig, port: int) -> str | None:
    """The one startup warning for a server others can reach without protection, if it is one."""
    if is_loopback_host(config.host):
        return None
    where = f"{config.host}:{port}"
    if config.tls_cert is None and config.tokens_file is None:
        return (
            f"serving plaintext with no authentication on {where}, which other machines can reach: "
            "anyone there can use it and read what is typed; give --tls-cert/--tls-key and "
            "--tokens-file (or --tls-client-ca), or --host 127.0.0.1"
        )
    if config.tls_cert is None:
        return (
            f"bearer tokens travel unencrypted on {where}: anyone on the path can read and reuse "
            "them; give --tls-cert/--tls-key"
        )
    return None


# ---------------------------------------------------------------------------- TLS


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"{flag}: cannot read {path} ({exc.strerror or exc})") from exc


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the port (None: plaintext); checked now, so a bad file fails at startup."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    cert, key = _read(config.tls_cert, "--tls-cert"), _read(config.tls_key, "--tls-key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The same checks gRPC makes at the first handshake, made now with a message to act on.
        context.load_cert_chain(config.tls_cert, config.tls_key, password=b"")
    except ssl.SSLError as exc:
        raise SecurityError(
            f"--tls-cert {config.tls_cert} and --tls-key {config.tls_key} are not a PEM certificate "
            f"chain and its unencrypted private key ({exc.reason or exc})"
        ) from exc
    client_ca = None
    if config.tls_client_ca is not None:
        client_ca = _read(config.tls_client_ca, "--tls-client-ca")
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise SecurityError(
                f"--tls-client-ca {config.tls_client_ca} holds no PEM CA certificate ({exc.reason or exc})"
            ) from exc
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


# ---------------------------------------------------------------------------- bearer tokens


def parse_tokens(text: str) -> tuple[dict[str, str], list[str]]:
    """Digest -> principal from the tokens file's text, and a description of each line left out."""
    table: dict[str, str] = {}
    problems = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not (DIGEST.fullmatch(parts[0].lower()) and valid_principal(parts[1])):
            problems.append(f"line {number}: expected 'SHA256-HEX PRINCIPAL' (see nextword token)")
            continue
        table[parts[0].lower()] = parts[1]
    return table, problems


class TokenTable:
    """The tokens file, re-read when it changes so tokens are added and revoked without a restart.

    A request costs a dictionary look-up; the file is stat'ed at most once per
    ``RELOAD_INTERVAL_S``. A file that cannot be read any more accepts no token
    (revocation must not depend on the file staying readable).
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._table: dict[str, str] = {}
        self._stamp: tuple[int, int, int] | None = None  # what the table was read from
        self._checked = clock()
        try:
            problems = self._load()
        except (OSError, UnicodeDecodeError) as exc:
            raise SecurityError(f"--tokens-file: cannot read {path} ({exc})") from exc
        if problems:  # at startup the operator is there to fix it
            raise SecurityError(f"--tokens-file {path}: {problems[0]}")

    def __len__(self) -> int:
        return len(self._table)

    def principal(self, token: str) -> str | None:
        """The principal ``token`` belongs to, or None."""
        now = self._clock()
        if now - self._checked >= RELOAD_INTERVAL_S:
            self._checked = now
            self._reload_if_changed()
        # Looked up by digest: what is compared is a hash the caller cannot steer, not the token.
        return self._table.get(token_digest(token))

    def _reload_if_changed(self) -> None:
        try:
            if _stamp(os.stat(self.path)) == self._stamp:
                return
            problems = self._load()
        except (OSError, UnicodeDecodeError) as exc:
            if self._stamp is not None:  # say it once, not at every check
                log.warning("tokens file %s cannot be read (%s): refusing every token", self.path, exc)
            self._table, self._stamp = {}, None
            return
        for problem in problems:
            log.warning("tokens file %s: %s; that line is ignored", self.path, problem)
        log.info("tokens file %s re-read: %d tokens", self.path, len(self._table))

    def _load(self) -> list[str]:
        stamp = _stamp(os.stat(self.path))  # before reading: a change while reading is seen next time
        self._table, problems = parse_tokens(self.path.read_text(encoding="utf-8"))
        self._stamp = stamp
        return problems


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_mtime_ns, st.st_size, st.st_ino


# ---------------------------------------------------------------------------- principals


@dataclass(frozen=True)
class Authenticator:
    """Finds the principal of a call from its metadata and TLS peer, as configured."""

    tokens: TokenTable | None = None
    client_certificates: bool = False

    @classmethod
    def from_config(cls, config: ServerConfig) -> Authenticator:
        tokens = TokenTable(config.tokens_file) if config.tokens_file is not None else None
        return cls(tokens, client_certificates=config.tls_client_ca is not None)

    def principal(
        self, metadata: Iterable[tuple[str, MetadataValue]], auth: Callable[[], AuthContext]
    ) -> str:
        """The call's principal; raises Unauthenticated saying what credential is expected.

        ``auth`` gives the TLS peer's properties (``context.auth_context``), asked only for mTLS.
        """
        if self.tokens is not None:
            principal = self.tokens.principal(_bearer(metadata))
            if principal is None:
                raise Unauthenticated(
                    "the bearer token is not valid on this server (unknown or revoked); "
                    "ask the server's operator for one (nextword token)"
                )
            return principal
        if self.client_certificates:
            return _certificate_name(auth())
        return ANONYMOUS


def _bearer(metadata: Iterable[tuple[str, MetadataValue]]) -> str:
    value = next((v for k, v in metadata if k == "authorization"), None)
    if value is None:
        raise Unauthenticated(
            "this server needs a bearer token: send the metadata 'authorization: Bearer TOKEN' "
            "(nextword clients: --token-file, or the NEXTWORD_TOKEN environment variable)"
        )
    scheme, _, token = str(value).strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the 'authorization' metadata must be 'Bearer TOKEN'")
    return token.strip()


def _certificate_name(auth: AuthContext) -> str:
    # gRPC has verified the chain against --tls-client-ca before the call reaches us.
    names = list(auth.get("x509_common_name", ())) or list(auth.get("x509_subject_alternative_name", ()))
    if not names:
        raise Unauthenticated(
            "this server needs a client certificate that names its holder "
            "(a common name or subject alternative name), signed by the CA it trusts"
        )
    return names[0].decode("utf-8", "replace")
