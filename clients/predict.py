"""``nextword predict``: one-shot suggestions from a running server.

A text that ends with a space (or punctuation) asks for the next word; one that
ends inside a word asks for that word's completions as well.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import grpc

from nextword.options import from_args, option, positional, switch

from .channel import CredentialsError
from .client import Prediction
from .connection import ConnectionOptions


@dataclass(frozen=True)
class PredictOptions:
    text: str = positional(
        "the text typed so far: end it with a space for next words, or mid-word for completions"
    )
    k: int = option(3, "suggestions asked for")
    json: bool = switch("print one JSON object")
    timeout: float = option(10.0, "seconds to wait for the answer")


def format_prob(p: float) -> str:
    """A probability as a percentage a person can read: 12.3%, 0.41%, 0.0052% — never a bare 0.0%."""
    percent = p * 100
    if percent >= 10:
        return f"{percent:.1f}%"
    return f"{percent:.2g}%" if percent >= 1e-4 else "<0.0001%"


def rpc_error_message(exc: grpc.RpcError, target: str) -> str:
    """One line for a failed call; an unreachable server is named as such, not as a stack trace."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        # A plaintext client talking to a TLS server sees only a closed socket: say what to try.
        hint = "; if it serves TLS, add --tls or --tls-ca" if "Socket closed" in (details or "") else ""
        return f"error: cannot reach a nextword server at {target} ({details}{hint})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"error: {target} did not answer in time (DEADLINE_EXCEEDED: {details})"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"error: {target} refused the credentials (UNAUTHENTICATED: {details})"
    name = code.name if code is not None else "UNKNOWN"
    return f"error: {name}: {details}"


def format_table(pred: Prediction) -> str:
    lines = ["next word        prob"]
    lines += [f"{i:>2}. {s.word:<12} {format_prob(s.prob):>7}" for i, s in enumerate(pred.suggestions, 1)]
    if pred.partial:
        lines += ["", f"completing {pred.partial!r}"]
        lines += [f"{i:>2}. {s.word:<12} {format_prob(s.prob):>7}" for i, s in enumerate(pred.completions, 1)]
        if not pred.completions:
            lines.append("    (no vocabulary word starts with it)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    opts = from_args(PredictOptions, args)
    conn = from_args(ConnectionOptions, args)
    try:
        with conn.client(timeout=opts.timeout) as client:
            pred = client.predict(opts.text, k=opts.k)
    except CredentialsError as exc:
        print(f"nextword predict: error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(rpc_error_message(exc, conn.target), file=sys.stderr)
        return 1
    if opts.json:
        print(json.dumps(pred.to_json_dict(), ensure_ascii=False))
    else:
        print(format_table(pred))
    return 0
