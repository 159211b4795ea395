"""``nextword token``: make a bearer token for a principal and add its digest to a tokens file.

The token is printed once, on stdout, and never stored: the file keeps only its
SHA-256, so reading the file (or a backup of it) gives no one a usable token.
A server started with ``--tokens-file`` picks the new line up within a second;
deleting the line revokes the token as quickly.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from nextword.options import from_args, positional, required

from .security import PRINCIPAL_NAME, token_digest, valid_principal

TOKEN_PREFIX = "nwt_"  # lets secret scanners and people recognise a leaked nextword token
TOKEN_BYTES = 32


@dataclass(frozen=True)
class TokenOptions:
    principal: str = positional(
        "who the token identifies (letters, digits and ._@:+=/-); sessions belong to it"
    )
    tokens_file: Path = required("tokens file to append the digest to (the server's --tokens-file)")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def append_token(path: Path, principal: str) -> str:
    """A fresh token for ``principal``; its digest is appended to ``path`` (created 0600 if missing)."""
    if not valid_principal(principal):
        raise ValueError(f"principal must match {PRINCIPAL_NAME.pattern}")
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        # A file whose last line has no newline would have our line glued to it.
        starts_clean = fh.tell() == 0 or _ends_with_newline(path)
        fh.write(("" if starts_clean else "\n") + f"{token_digest(token)} {principal}\n")
    return token


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def main(args: argparse.Namespace) -> int:
    """Print the new token on stdout (alone, for scripts); say what was done on stderr."""
    opts = from_args(TokenOptions, args)
    try:
        token = append_token(opts.tokens_file, opts.principal)
    except ValueError as exc:
        print(f"nextword token: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"nextword token: error: cannot write {opts.tokens_file} ({exc.strerror})", file=sys.stderr)
        return 2
    print(token)
    print(
        f"added a token for {opts.principal} to {opts.tokens_file}; it is shown only now, so store it "
        "(a running server accepts it within a second; delete its line to revoke it)",
        file=sys.stderr,
    )
    return 0
