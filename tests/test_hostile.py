"""Hostile input (``benchmarks/hostile``): a real server on the tiny bundle meets every goal.

The module's server run is the acceptance test for exposing the server: a few hundred
hostile requests of every kind, then the same goals as ``python -m benchmarks.hostile``.
The tests before it check the harness itself: that what it sends is what it says.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.hostile import wire
from benchmarks.hostile.attacks import SESSION, WEIGHTS, Attack, Resume, encode, examples, kinds, shares
from benchmarks.hostile.cli import Options, run
from benchmarks.hostile.report import RSS_GROWTH, Report, render
from benchmarks.hostile.runner import SessionIds, resolve
from benchmarks.hostile.server import scan_log
from nextword.v1 import nextword_pb2 as pb

REQUESTS = 300


# --------------------------------------------------------------------------- the harness itself


def test_hand_written_messages_are_what_protobuf_writes() -> None:
    text, k, model = "h\u00e9\U0001f600 ", 7, "demo"
    expected = pb.PredictRequest(text=text, k=k, model=model).SerializeToString()
    assert encode(pb.PredictRequest, text=text, k=k, model=model) == expected
    # A negative k is ten bytes of two's complement; a uint32 field keeps the low 32 bits.
    assert pb.PredictRequest.FromString(encode(pb.PredictRequest, k=-1)).k == 2**32 - 1
    assert not wire.parses(pb.PredictRequest, wire.len_field(1, b"\xed\xa0\x80"))  # a lone surrogate
    assert not wire.parses(pb.PredictRequest, wire.len_field(1, b"ab", claimed=3))  # a lying length
    assert not wire.parses(pb.PredictRequest, wire.varint_field(2, 2**70))  # an eleven-byte varint


def test_the_same_seed_draws_the_same_requests() -> None:
    strategy = kinds()["session.text"]
    assert examples(strategy, 20, seed=3) == examples(strategy, 20, seed=3)
    assert examples(strategy, 20, seed=3) != examples(strategy, 20, seed=4)


def test_every_kind_gets_its_share() -> None:
    for total in (1, 17, 300, 10_000):
        counts = shares(total)
        assert counts.keys() == WEIGHTS.keys() and min(counts.values()) >= 1
        assert sum(counts.values()) == max(total, len(WEIGHTS))


def test_corrupt_requests_are_mostly_refused_by_protobuf_itself() -> None:
    # Else predict.wire would test nothing but the validation of valid messages.
    drawn = examples(kinds()["predict.wire"], 200, seed=0)
    corrupt = [a for a in drawn if not wire.parses(pb.PredictRequest, a.messages[0])]
    assert len(corrupt) >= 0.6 * len(drawn)


def test_resumed_and_padded_messages() -> None:
    ids = SessionIds()
    ids.add(pb.SessionReply(session_id="abc").SerializeToString())
    turn = encode(pb.SessionRequest, text="the ")
    taken = resolve(Attack("session.resume", SESSION, (turn,), resume=(5, Resume.SAME)), ids)
    assert pb.SessionRequest.FromString(taken[0]) == pb.SessionRequest(session_id="abc", text="the ")
    later = resolve(Attack("session.resume", SESSION, (turn, turn), resume=(0, Resume.LATER)), ids)
    assert [pb.SessionRequest.FromString(m).session_id for m in later] == ["", "abc", ""]
    padded = resolve(Attack("oversize", SESSION, (turn,), pad=100), ids)
    assert len(padded[0]) > 100 and pb.SessionRequest.FromString(padded[0]).text == "the "


def test_log_scan_counts_tracebacks_and_errors() -> None:
    log = (
        "2026-01-01 00:00:00,000 INFO nextword.server: serving\n"
        "2026-01-01 00:00:01,000 ERROR grpc._cython.cygrpc: Unexpected [DecodeError]\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n'
        "google.protobuf.message.DecodeError: Wire format was corrupt\n"
        "2026-01-01 00:00:02,000 WARNING nextword.server: refused\n"
    )
    scan = scan_log(log)
    assert (scan.tracebacks, scan.errors, scan.warnings) == (1, 1, 1)
    assert (1, "raised google.protobuf.message.DecodeError: Wire format was corrupt") in scan.top


# --------------------------------------------------------------------------- the server under attack


@pytest.fixture(scope="module")
def report(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Report:
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    # A server that hangs fails in seconds, not at pytest's timeout.
    return run(Options(bundle=tiny_bundle, requests=REQUESTS, timeout=10, budget=60, log=log))


def test_every_request_of_every_kind_is_answered(report: Report) -> None:
    assert report.sent == report.planned == REQUESTS, render(report)
    assert report.by_kind.keys() == WEIGHTS.keys()
    assert "CLIENT_ERROR" not in report.codes, render(report)


def test_no_unknown_or_internal_status(report: Report) -> None:
    # A refusal names its reason (INVALID_ARGUMENT, NOT_FOUND, ...); UNKNOWN is an exception
    # that escaped a handler or a deserializer, INTERNAL one in the server's core.
    assert report.codes.get("UNKNOWN", 0) == 0, render(report)
    assert report.codes.get("INTERNAL", 0) == 0, render(report)


def test_no_traceback_in_the_server_log(report: Report) -> None:
    assert report.log.tracebacks == 0, render(report)


def test_still_serving_the_same_answers(report: Report) -> None:
    assert report.health == "SERVING", render(report)
    assert report.references.identical, render(report)
    assert report.exit_status == 0, render(report)  # and it still stops cleanly


def test_memory_stays_bounded(report: Report) -> None:
    assert report.rss_after <= RSS_GROWTH * report.rss_before, render(report)
