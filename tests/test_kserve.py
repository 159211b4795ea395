"""The KServe v2 protocol, driven by Triton's own client (tritonclient) against a real server."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from nextword.bundle import load_bundle
from nextword.clients.client import NextWordClient
from nextword.server.stats import NS, Duration, ModelStats, Totals
from tests.conftest import serve_process

PIECES = [
    "it was the best ",
    "of times, it ",
    "was the worst of ",
    "ti",
    "mes, it was ",
    "the age ",
    "of wis",
    "dom, ",
    "it was ",
    "the age of ",
]


@pytest.fixture(scope="module")
def target(tiny_bundle: Path) -> Iterator[str]:
    with serve_process(tiny_bundle) as address:
        yield address


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> str:
    return load_bundle(tiny_bundle).manifest.name


@pytest.fixture
def client(target: str) -> Iterator[Any]:
    c = triton.InferenceServerClient(target)
    yield c
    c.close()


def _text(piece: str) -> list[Any]:
    tensor = triton.InferInput("TEXT", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([piece.encode()], dtype=object))
    return [tensor]


def _words(result: Any, name: str = "WORDS") -> list[str]:
    return [w.decode() for w in result.as_numpy(name)]


def test_health_and_metadata(client: Any, model: str) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(model) and client.is_model_ready(model, "1")
    assert not client.is_model_ready("some-other-model")
    meta = client.get_model_metadata(model)
    assert meta.name == model and list(meta.versions) == ["1"]
    assert [(t.name, t.datatype) for t in meta.inputs] == [("TEXT", "BYTES")]
    assert [t.name for t in meta.outputs] == ["WORDS", "PROBS", "COMPLETIONS", "COMPLETION_PROBS", "PARTIAL"]
    assert "sequence" in client.get_server_metadata().extensions
    # Triton's model configuration, as perf_analyzer reads it: a sequence model, no batch axis.
    config = client.get_model_config(model).config
    assert config.name == model and config.max_batch_size == 0 and config.HasField("sequence_batching")
    assert [(i.name, list(i.dims)) for i in config.input] == [("TEXT", [1])]


@pytest.mark.parametrize("sequence_id", [42, "typist-7"])
def test_a_sequence_answers_as_a_nextword_session(
    client: Any, model: str, target: str, sequence_id: Any
) -> None:
    got = []
    for i, piece in enumerate(PIECES):
        result = client.infer(
            model,
            _text(piece),
            sequence_id=sequence_id,
            sequence_start=i == 0,
            sequence_end=i == len(PIECES) - 1,
            parameters={"k": 3},
        )
        got.append((_words(result), result.as_numpy("PROBS").tolist(), _words(result, "COMPLETIONS")))
    with NextWordClient(target) as nw, nw.session(k=3) as session:
        expected = []
        for piece in PIECES:
            p = session.send(piece)
            expected.append(
                (
                    [s.word for s in p.suggestions],
                    [s.prob for s in p.suggestions],
                    [s.word for s in p.completions],
                )
            )
    for (words, probs, completions), (e_words, e_probs, e_completions) in zip(got, expected, strict=True):
        assert (words, completions) == (e_words, e_completions)
        np.testing.assert_allclose(probs, e_probs, rtol=1e-6)
    # The sequence ended: a request without sequence_start is refused, and says what to send.
    with pytest.raises(InferenceServerException, match="sequence_start"):
        client.infer(model, _text("more "), sequence_id=sequence_id)


def test_a_sequence_may_begin_with_no_text(client: Any, model: str, target: str) -> None:
    """An empty first request (a sequence opened before anything is typed) answers what a new
    session knows, and the sequence goes on from there."""
    pieces = ["", *PIECES[:3]]
    got = [
        _words(client.infer(model, _text(p), sequence_id=99, sequence_start=i == 0, parameters={"k": 3}))
        for i, p in enumerate(pieces)
    ]
    with NextWordClient(target) as nw, nw.session(k=3) as session:
        assert got == [session.send(p).words for p in pieces]


def test_no_sequence_is_a_predict(client: Any, model: str, target: str) -> None:
    result = client.infer(model, _text("it was the best of ti"), parameters={"k": 3})
    with NextWordClient(target) as nw:
        expected = nw.predict("it was the best of ti", 3)
    assert _words(result) == expected.words
    assert _words(result, "PARTIAL") == ["ti"]
    assert _words(result, "COMPLETIONS") == [s.word for s in expected.completions]


def test_streamed_sequences_keep_apart(client: Any, model: str) -> None:
    """Two sequences interleaved on one ModelStreamInfer stream: the requests run side by side and
    the answers may come in any order, but each sequence's are those it gets alone."""
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    texts = {1: PIECES[:4], 2: PIECES[4:8]}
    try:
        for i in range(4):
            for sequence, pieces in texts.items():
                client.async_stream_infer(
                    model,
                    _text(pieces[i]),
                    request_id=f"{sequence}-{i}",
                    sequence_id=sequence,
                    sequence_start=i == 0,
                )
        replies = [answers.get(timeout=20) for _ in range(8)]
    finally:
        client.stop_stream()
    assert all(error is None for _, error in replies), replies
    by_id = {r.get_response().id: _words(r) for r, _ in replies}
    for sequence, pieces in texts.items():
        alone = [
            _words(client.infer(model, _text(p), sequence_id=sequence + 10, sequence_start=j == 0))
            for j, p in enumerate(pieces)
        ]
        assert [by_id[f"{sequence}-{i}"] for i in range(4)] == alone


def test_bad_requests_get_a_status_and_a_message(client: Any, model: str) -> None:
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no-such-model", _text("a "))
    assert unknown.value.status() == "StatusCode.NOT_FOUND" and model in unknown.value.message()
    wrong = triton.InferInput("IMAGE", [1], "FP32")
    wrong.set_data_from_numpy(np.zeros(1, dtype=np.float32))
    with pytest.raises(InferenceServerException, match="TEXT") as bad:
        client.infer(model, [wrong])
    assert bad.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="max-text-chars"):
        client.infer(model, _text("x" * 10_000))


def test_a_refused_streamed_request_gets_an_error_message_and_the_stream_goes_on(
    client: Any, model: str
) -> None:
    """A request the server refuses (here: text over --max-text-chars) is answered with its own
    error on the stream; the sequences beside it, and later requests, are served as before."""
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(
            model, _text(PIECES[0]), request_id="a0", sequence_id=31, sequence_start=True
        )
        client.async_stream_infer(
            model, _text("x" * 10_000), request_id="b0", sequence_id=32, sequence_start=True
        )
        first = [answers.get(timeout=20) for _ in range(2)]
        client.async_stream_infer(model, _text(PIECES[1]), request_id="a1", sequence_id=31)
        later = answers.get(timeout=20)
    finally:
        client.stop_stream()
    errors = [error for _, error in first if error is not None]
    assert len(errors) == 1 and "max-text-chars" in errors[0].message(), first
    result, error = later
    assert error is None and result.get_response().id == "a1"
    alone = [
        _words(client.infer(model, _text(p), sequence_id=33, sequence_start=j == 0))
        for j, p in enumerate(PIECES[:2])
    ]
    assert _words(result) == alone[1]


def test_model_statistics_count_what_the_model_did(client: Any, model: str) -> None:
    """Triton's statistics extension: requests answered and refused, with their time; every step's
    queue wait and call; model calls by batch size (one client: batches of one)."""

    def stats() -> dict[str, Any]:
        (row,) = client.get_inference_statistics(model, as_json=True)["model_stats"]
        assert (row["name"], row["version"]) == (model, "1")
        return row

    def count(row: dict[str, Any], *path: str) -> int:
        found: Any = row
        for key in path:
            found = found.get(key, {})
        return int(found or 0)  # proto3 JSON leaves zeros out

    before, start_ms = stats(), time.time_ns() // 1_000_000
    for piece in PIECES[:3]:
        client.infer(model, _text(piece))
    with pytest.raises(InferenceServerException, match="--max-word-chars"):
        client.infer(model, _text("x" * 150))  # a word too long to carry: refused
    after = stats()

    def grew(*path: str) -> int:
        return count(after, *path) - count(before, *path)

    assert grew("inference_count") == grew("inference_stats", "success", "count") == 3
    assert grew("inference_stats", "fail", "count") == 1
    steps = grew("inference_stats", "compute_infer", "count")
    assert steps >= 3 and grew("inference_stats", "queue", "count") == steps
    assert grew("execution_count") == steps  # one request at a time: a call each
    assert grew("inference_stats", "success", "ns") > 0
    assert count(after, "last_inference") >= start_ms
    ones = next(b for b in after["batch_stats"] if int(b["batch_size"]) == 1)
    assert int(ones["compute_infer"]["count"]) >= steps
    everything = client.get_inference_statistics(as_json=True)["model_stats"]
    assert [r["name"] for r in everything] == [model]
    with pytest.raises(InferenceServerException, match="not served"):
        client.get_inference_statistics("some-other-model")


def test_statistics_rows_of_every_process_add_up(tmp_path: Path) -> None:
    """Each worker counts in a file of its own; whichever is asked sums those of its version, and a
    row still being made (or another version's) is not counted."""
    model = ("tiny model *" + "x" * 300, "1")  # a name no file could be called
    one = ModelStats(4, tmp_path, model)
    (ones,) = tmp_path.iterdir()
    two, other = ModelStats(4, tmp_path, model), ModelStats(4, tmp_path, (model[0], "2"))
    one.answered(0.5)
    one.waited(0.25)
    one.called(2, 0.1)
    two.answered(1.0)
    two.failed(0.75)
    two.called(2, 0.2)
    two.called(4, 0.3)
    other.answered(9.0)
    ones.with_name(ones.name.replace(".stats", "-0.stats")).write_bytes(b"")  # a file still being made
    for totals in (one.totals(), two.totals()):
        assert totals.success == Duration(2, 1_500_000_000) and totals.fail == Duration(1, 750_000_000)
        assert totals.queue == Duration(1, 250_000_000) and totals.executions == 3
        assert totals.compute == Duration(8, 1_800_000_000)  # each step charged its whole call
        assert totals.batches == {2: Duration(2, 300_000_000), 4: Duration(1, 300_000_000)}
    assert other.totals().success == Duration(1, 9 * NS) and not other.totals().batches
    two.close()  # unloaded there: what it counted leaves the totals
    left = one.totals()
    assert left.success == Duration(1, NS // 2) and left.batches == {2: Duration(1, 100_000_000)}
    assert ModelStats(4).totals() == Totals()  # no folder: this process's counts alone


def test_statistics_count_every_worker(tiny_bundle: Path, model: str) -> None:
    """With --workers 2, each connection is one worker's (the kernel spreads them), and whichever
    worker answers ModelStatistics counts what all did: 16 inferences on 16 connections are 16."""
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection each, not one shared by all 16
    with serve_process(tiny_bundle, "--workers", "2") as address:
        clients = [triton.InferenceServerClient(address, channel_args=own) for _ in range(16)]
        try:
            for c in clients:
                c.infer(model, _text("it was the "))
            counts = {
                int(c.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_count"])
                for c in clients
            }
        finally:
            for c in clients:
                c.close()
    assert counts == {16}
