"""``nextword loadtest``: its options, and ``main``, which runs them and prints the report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from nextword.options import from_args, option, switch
from nextword.ranking import POLICIES

from ..channel import CredentialsError
from ..connection import ConnectionOptions
from .errors import LoadTestError
from .processes import run_load_processes
from .report import LoadReport, format_table
from .spec import LoadSpec
from .text import load_words


@dataclass(frozen=True)
class LoadTestOptions:
    """The options of ``nextword loadtest``."""

    streams: int = option(8, "concurrent sessions (one stream each)")
    duration: float | None = option(None, "seconds to run (default 10; not with --words)")
    words: int | None = option(None, "stop after this many words in all (not with --duration)")
    rate: float | None = option(None, "words/s per stream, open loop (default: closed loop)")
    context_words: int = option(0, "words sent in one request before measuring")
    text: Path | None = option(None, "text to type (default: the Gutenberg test split, if present)")
    k: int = option(3, "suggestions asked for")
    procs: int = option(1, "client processes the streams are spread over")
    connections: int = option(
        1, "HTTP/2 connections per process the streams are spread over (a server's workers get connections)"
    )
    strip: str | None = option(
        None,
        "how each session fills its strip, sent on its first request (default: the server's)",
        choices=POLICIES,
    )
    no_repeat: bool = switch("each session asks not to be offered again a word it typed past")
    json: bool = switch("print one JSON object")
    allow_remote: bool = switch("allow a --target that is not loopback")

    def spec(self, connection: ConnectionOptions) -> LoadSpec:
        """The load test these options ask for, with the default text (``--text`` is read later)."""
        if self.duration is not None and self.words is not None:
            raise LoadTestError("--duration and --words cannot be used together")
        try:
            credentials = connection.credentials()
        except CredentialsError as exc:
            raise LoadTestError(str(exc)) from exc
        return LoadSpec(
            target=connection.target,
            credentials=credentials,
            streams=self.streams,
            duration=self.duration,
            words=self.words,
            rate=self.rate,
            context_words=self.context_words,
            k=self.k,
            allow_remote=self.allow_remote,
            connections=self.connections,
            strip=self.strip,
            no_repeat=self.no_repeat,
        )


def main(args: argparse.Namespace) -> int:
    """``nextword loadtest``: 0 when every request was answered, 1 when any failed or nothing could be
    measured, 2 for a refused target or options that cannot run, 130 when interrupted.
    """
    opts = from_args(LoadTestOptions, args)
    spec = _checked_spec(opts, from_args(ConnectionOptions, args))
    if spec is None:
        return 2

    from tqdm import tqdm  # only the command shows progress; the library API takes a callback

    bar = tqdm(
        total=spec.words,
        unit="word",
        desc="loadtest",
        file=sys.stderr,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    try:
        if opts.text is not None:
            spec = dataclasses.replace(spec, text=load_words(opts.text))
        report = run_load_processes(spec, opts.procs, bar.update)
    except LoadTestError as exc:
        bar.close()
        print(f"nextword loadtest: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("nextword loadtest: interrupted", file=sys.stderr)
        return 130
    bar.close()
    return _print_report(report, as_json=opts.json)


def _checked_spec(opts: LoadTestOptions, connection: ConnectionOptions) -> LoadSpec | None:
    """The spec ``opts`` ask for; None, after a one-line error, for options that cannot run."""
    try:
        spec = opts.spec(connection)
        if opts.procs < 1:
            raise LoadTestError("procs must be at least 1")
        if opts.text is not None and not opts.text.is_file():
            raise LoadTestError(f"no text file {opts.text}")
    except LoadTestError as exc:
        print(f"nextword loadtest: error: {exc}", file=sys.stderr)
        return None
    return spec


def _print_report(report: LoadReport, *, as_json: bool) -> int:
    """Print ``report`` on stdout; the exit code: 1 when any request failed (stderr says how)."""
    print(json.dumps(report.to_json_dict()) if as_json else format_table(report))
    if not report.errors:
        return 0
    # A run whose numbers hide failures must not pass a script or CI step that runs it.
    by_code = ", ".join(f"{code} {n}" for code, n in sorted(report.errors.items()))
    answered = "no word was answered" if report.words == 0 else f"{report.words} words were answered"
    print(
        f"nextword loadtest: error: failed requests: {report.failed_requests} ({by_code}) "
        f"in {report.failed_streams} of {report.streams} streams; {answered}",
        file=sys.stderr,
    )
    return 1
