"""``nextword loadtest`` against a real server (the tiny bundle), and its library API against stand-ins."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nextword.cli import build_parser
from nextword.clients.loadtest import (
    LoadReport,
    LoadSpec,
    LoadTestError,
    is_loopback_target,
    load_words,
    run_load,
    run_load_processes,
)
from nextword.clients.loadtest.cli import LoadTestOptions
from nextword.clients.loadtest.cli import main as loadtest_main
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc
from tests.conftest import serve_process

ROOT = Path(__file__).resolve().parent.parent
LOAD_ARGS = ("--streams", "8", "--duration", "2", "--json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_bundle: Path) -> Iterator[tuple[str, int]]:
    """One server for the module: (gRPC HOST:PORT, /metrics port). The later --metrics-port wins."""
    metrics_port = _free_port()
    with serve_process(tiny_bundle, "--metrics-port", str(metrics_port)) as target:
        yield target, metrics_port


def _loadtest(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    """Run ``nextword loadtest ARGV --json`` in this process: exit code, the JSON object, stderr."""
    args = build_parser("loadtest").parse_args(["loadtest", *argv, "--json"])
    code = loadtest_main(args)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else {}), err


def _batch_sizes(metrics_port: int) -> tuple[float, float]:
    """(graph calls, graph calls that served one request) from the server's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    (family,) = (f for f in text_string_to_metric_families(text) if f.name == "nextword_batch_size")
    count = next(s.value for s in family.samples if s.name == "nextword_batch_size_count")
    singles = next(s.value for s in family.samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0")
    return count, singles


def test_the_command_prints_one_json_report(server: tuple[str, int]) -> None:
    target, metrics_port = server
    calls_before, singles_before = _batch_sizes(metrics_port)
    proc = subprocess.run(
        [sys.executable, "-m", "nextword.cli", "loadtest", "--target", target, *LOAD_ARGS],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # exactly one JSON document: anything else on stdout fails here
    for key in ("words_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms", "words", "duration_s"):
        assert isinstance(report[key], (int, float)), key
    assert report["words_per_s"] > 0 and report["words"] > 0
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert report["streams"] == 8 and report["errors"] == {} and report["target"] == target
    assert report["rate"] is None and report["context_words"] == 0
    assert 2.0 <= report["duration_s"] < 5.0

    # Eight streams typing at once: the server's batcher served several of them per graph call.
    calls, singles = _batch_sizes(metrics_port)
    assert calls - calls_before > 0
    assert (calls - calls_before) - (singles - singles_before) > 0, "no batch of more than one request"


def test_words_stops_the_run_after_that_many_words(
    server: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, _ = _loadtest(capsys, "--target", server[0], "--streams", "8", "--words", "50")
    assert code == 0
    assert report["words"] >= 50 and report["errors"] == {}


def test_rate_is_open_loop_at_the_rate_asked(
    server: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, _ = _loadtest(
        capsys, "--target", server[0], "--streams", "4", "--rate", "20", "--duration", "1.5"
    )
    assert code == 0 and report["rate"] == 20 and report["errors"] == {}
    # 4 streams x 20 words/s x 1.5 s: every word due before the deadline is sent, and answered.
    assert report["words"] == 120
    assert report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]


def _forty_words(server: tuple[str, int]) -> tuple[str, ...]:
    """A short run: 4 streams, 40 words in all."""
    return ("--target", server[0], "--streams", "4", "--words", "40")


def test_context_words_are_sent_in_one_prefill_request(
    server: tuple[str, int], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog sat by the door . " * 20, encoding="utf-8")
    code, report, _ = _loadtest(
        capsys,
        *_forty_words(server),
        "--context-words",
        "60",
        "--text",
        str(text),
    )
    assert code == 0 and report["errors"] == {}
    assert report["context_words"] == 60 and report["words"] >= 40
    assert report["prefill_p50_ms"] > 0


def test_procs_merge_their_histograms(server: tuple[str, int], capsys: pytest.CaptureFixture[str]) -> None:
    code, report, _ = _loadtest(
        capsys, "--target", server[0], "--streams", "4", "--words", "40", "--procs", "2"
    )
    assert code == 0 and report["errors"] == {}
    assert report["procs"] == 2 and report["streams"] == 4 and report["words"] >= 40
    assert report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:1", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("10.0.0.1:50051", False),
        ("[2001:db8::1]:50051", False),
        ("example.com:50051", False),
        ("0.0.0.0:50051", False),
    ],
)
def test_loopback_targets(target: str, loopback: bool) -> None:
    assert is_loopback_target(target) is loopback


def test_a_remote_target_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, report, err = _loadtest(capsys, "--target", "192.0.2.1:50051", "--duration", "1")
    assert code == 2 and report == {}
    assert "not a loopback address" in err and "--allow-remote" in err


def test_duration_and_words_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    code, report, err = _loadtest(capsys, "--duration", "1", "--words", "10")
    assert code == 2 and report == {}
    assert err.count("\n") == 1 and "--duration and --words" in err


def test_help_describes_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser("loadtest").parse_args(["loadtest", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    for f in dataclasses.fields(LoadTestOptions):
        assert f.metadata["help"], f.name
        assert "--" + f.name.replace("_", "-") in out, f.name
        assert f.metadata["help"].replace("%(default)s", str(f.default)) in out, f.name
    for shown in ("(default: 8)", "(default: 0)", "(default: 1)", "(default: 3)"):  # --streams, ...
        assert shown in out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"streams": 0}, "streams must be at least 1"),
        ({"duration": 0}, "duration must be positive"),
        ({"words": 0}, "words must be at least 1"),
        ({"rate": -1.0}, "rate must be positive"),
        ({"context_words": -1}, "context words and k must not be negative"),
        ({"k": -1}, "context words and k must not be negative"),
        ({"text": ()}, "the load test text has no words"),
        ({"target": "192.0.2.1:50051"}, "not a loopback address"),
    ],
)
def test_a_spec_is_checked_when_made(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(LoadTestError, match=message):
        LoadSpec(**{"target": "127.0.0.1:50051", "streams": 4, **kwargs})


def test_a_spec_takes_words_not_a_string() -> None:
    spec = LoadSpec("192.0.2.1:50051", streams=1, allow_remote=True, text=load_words("a b c"))
    assert spec.text == ("a", "b", "c") and spec.time_limit == 10.0
    assert LoadSpec("127.0.0.1:1", streams=1, words=5).time_limit is None
    with pytest.raises(TypeError):
        LoadSpec("127.0.0.1:1", streams=1, text="a b c")  # type: ignore[arg-type]


def test_no_more_processes_than_words(server: tuple[str, int]) -> None:
    # Four processes for three words would leave one with none: three run, one word each.
    spec = LoadSpec(server[0], streams=4, words=3, text=load_words("the cat sat on the mat ."))
    report = run_load_processes(spec, procs=4)
    assert report.procs == 3 and report.streams == 4 and report.errors == {}
    assert report.words >= 3


def test_an_unreachable_server_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    code, report, err = _loadtest(capsys, "--target", f"127.0.0.1:{_free_port()}", "--duration", "1")
    assert code == 1 and report == {}
    assert err.count("\n") == 1 and "cannot reach" in err


# ---------------------------------------------------------------------------- the API, any server


class _FlakyEcho(pb_grpc.NextWordServicer):
    """One empty reply per request; every second stream fails at its third request."""

    def __init__(self) -> None:
        self.streams = 0

    async def Session(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        self.streams += 1
        flaky = self.streams % 2 == 0
        seq = 0
        async for _ in request_iterator:
            seq += 1
            if flaky and seq == 3:
                await context.abort(grpc.StatusCode.INTERNAL, "flaky stream")
            await context.write(pb.SessionReply(seq=seq))


async def test_run_load_counts_failed_streams_and_keeps_going() -> None:
    server = grpc.aio.server()
    pb_grpc.add_NextWordServicer_to_server(_FlakyEcho(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        spec = LoadSpec(f"127.0.0.1:{port}", streams=4, duration=0.5, text=load_words("one two three four"))
        report = await run_load(spec)
    finally:
        await server.stop(0)
    assert isinstance(report, LoadReport)
    assert report.errors == {"INTERNAL": 2} and report.failed_streams == 2
    assert report.error_details["INTERNAL"] == "flaky stream"
    assert report.words > 20  # the two healthy streams ran on to the end
    assert report.histogram.get_total_count() == report.words
    assert report.to_json_dict()["words_per_s"] > 0


def test_the_strip_is_asked_for_once_on_each_stream_first_request() -> None:
    from nextword.clients.loadtest.engine import Share, _Load, _Stream

    spec = LoadSpec(target="127.0.0.1:1", streams=1, strip="keystrokes", no_repeat=True)
    load = _Load(spec, Share(0, 1), ("the", "cat"))
    first, later = load._request(_Stream(0, 0), 1, True), load._request(_Stream(0, 0), 1, False)
    assert (
        first.HasField("strip") and first.strip.policy == pb.Strip.POLICY_KEYSTROKES and first.strip.no_repeat
    )
    assert not later.HasField("strip")  # the session keeps it
    plain = _Load(LoadSpec(target="127.0.0.1:1", streams=1), Share(0, 1), ("the",))
    assert not plain._request(_Stream(0, 0), 1, True).HasField("strip")  # the server's default


def test_a_run_with_a_keystrokes_strip_is_answered(
    server: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, _ = _loadtest(capsys, *_forty_words(server), "--strip", "keystrokes", "--no-repeat")
    assert code == 0 and report["errors"] == {} and report["words"] >= 40
