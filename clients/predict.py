"""``nextword predict``: one-shot suggestions from a running server."""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from .client import NextWordClient, Prediction


def rpc_error_message(exc: grpc.RpcError, target: str) -> str:
    """One line for a failed call; an unreachable server is named as such, not as a stack trace."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"error: cannot reach a nextword server at {target} ({details})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"error: {target} did not answer in time (DEADLINE_EXCEEDED: {details})"
    name = code.name if code is not None else "UNKNOWN"
    return f"error: {name}: {details}"


def format_table(pred: Prediction) -> str:
    lines = ["next word        prob"]
    lines += [f"{i:>2}. {s.word:<12} {s.prob:6.1%}" for i, s in enumerate(pred.suggestions, 1)]
    if pred.partial:
        lines += ["", f"completing {pred.partial!r}"]
        lines += [f"{i:>2}. {s.word:<12} {s.prob:6.1%}" for i, s in enumerate(pred.completions, 1)]
        if not pred.completions:
            lines.append("    (no vocabulary word starts with it)")
    return "\n".join(lines)


def predict(args: argparse.Namespace) -> int:
    try:
        with NextWordClient(args.target, timeout=args.timeout) as client:
            pred = client.predict(args.text, k=args.k)
    except grpc.RpcError as exc:
        print(rpc_error_message(exc, args.target), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(pred.to_json_dict(), ensure_ascii=False))
    else:
        print(format_table(pred))
    return 0
