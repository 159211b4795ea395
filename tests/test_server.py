"""The gRPC server, end to end: a real server on a loopback port, real gRPC calls, real onnxruntime."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from prometheus_client.parser import text_string_to_metric_families

from nextword.bundle import BATCH, StateTensor, load_bundle
from nextword.ranking import CACHE_WEIGHT, FOLLOW_WEIGHT
from nextword.runtime import OnnxLM
from nextword.server.app import RunningServer, start_server
from nextword.server.batcher import Batcher
from nextword.server.config import ANY_FREE_PORT, ServerConfig
from nextword.server.metrics import Metrics
from nextword.server.state import INITIAL, StatePool
from nextword.tokenizer import is_word
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

# One event loop for the module's servers, channels and tests: grpc.aio objects belong to one loop.
pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parent.parent
MAX_K = 10
MAX_TEXT = 200
TOL = 1e-4


def _config(bundle: Path, **overrides: Any) -> ServerConfig:
    base = ServerConfig(
        model=bundle,
        port=0,
        metrics_port=ANY_FREE_PORT,
        device="cpu",
        threads=1,
        max_k=MAX_K,
        max_text_chars=MAX_TEXT,
    )
    return replace(base, **overrides)


@asynccontextmanager
async def serving(
    bundle: Path, **overrides: Any
) -> AsyncIterator[tuple[RunningServer, pb_grpc.NextWordStub]]:
    """A server of its own (for tests that need other limits) and a stub on it."""
    running = await start_server(_config(bundle, **overrides))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, pb_grpc.NextWordStub(channel)
    finally:
        await running.stop(None)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def running(tiny_bundle: Path) -> AsyncIterator[RunningServer]:
    server = await start_server(_config(tiny_bundle))
    yield server
    await server.stop(None)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def channel(running: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        yield ch


@pytest.fixture()
def stub(channel: grpc.aio.Channel) -> pb_grpc.NextWordStub:
    return pb_grpc.NextWordStub(channel)


class Chat:
    """One ``Session`` stream: each ``say`` sends a request and returns its reply."""

    def __init__(self, stub: pb_grpc.NextWordStub) -> None:
        self.call = stub.Session()
        self.session_id = ""

    async def say(self, text: str = "", **fields: Any) -> pb.SessionReply:
        await self.call.write(pb.SessionRequest(text=text, **fields))
        reply = await self.call.read()
        assert isinstance(reply, pb.SessionReply), reply
        self.session_id = reply.session_id
        return reply

    async def close(self) -> None:
        await self.call.done_writing()
        assert await self.call.code() == grpc.StatusCode.OK


async def type_words(
    stub: pb_grpc.NextWordStub, pieces: Sequence[str], **fields: Any
) -> list[pb.SessionReply]:
    chat = Chat(stub)
    replies = [await chat.say(piece, **fields) for piece in pieces]
    await chat.close()
    return replies


def assert_same(a: pb.Prediction, b: pb.Prediction) -> None:
    """Same words in the same order, probabilities within TOL, same partial and context length."""
    for got, want in ((a.suggestions, b.suggestions), (a.completions, b.completions)):
        assert [s.word for s in got] == [s.word for s in want]
        np.testing.assert_allclose([s.prob for s in got], [s.prob for s in want], atol=TOL)
    assert (a.partial, a.context_tokens) == (b.partial, b.context_tokens)


def sample(running: RunningServer, name: str, **labels: str) -> float:
    """The samples ``name`` whose labels include ``labels``, summed (over models and versions too)."""
    return _summed(running.metrics.registry, name, **labels)


def _summed(registry: Any, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


async def expect_error(call: Any, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value.details()
    for fragment in fragments:
        assert fragment in (err.value.details() or "")


# ---------------------------------------------------------------------------- sessions


async def test_stream_answers_every_request(stub: pb_grpc.NextWordStub) -> None:
    chat = Chat(stub)
    first = await chat.say("The ")
    assert len(first.session_id) == 32 and first.seq == 1
    assert first.prediction.context_tokens == 1 and first.prediction.partial == ""
    assert not first.prediction.completions

    second = await chat.say("cat sat on the ma", k=5)
    assert second.session_id == first.session_id and second.seq == 2
    pred = second.prediction
    assert pred.context_tokens == 5 and pred.partial == "ma"
    assert len(pred.suggestions) == 5
    assert pred.completions and all(s.word.startswith("ma") for s in pred.completions)
    for s in [*pred.suggestions, *pred.completions]:
        assert is_word(s.word) and 0 < s.prob <= 1
    probs = [s.prob for s in pred.suggestions]
    assert probs == sorted(probs, reverse=True)

    third = await chat.say("t ")  # completes "mat": it is fed once, whole
    assert third.prediction.context_tokens == 6 and third.prediction.partial == ""
    assert third.prediction.suggestions and len(third.prediction.suggestions) == 5  # k=5 was kept
    await chat.close()


async def test_word_by_word_equals_unary(stub: pb_grpc.NextWordStub) -> None:
    pieces = ["the ", "cat ", "sat ", "on", " the ", "m", "a"]  # "on" and "ma" arrive across requests
    replies = await type_words(stub, pieces, k=4)
    for n, reply in enumerate(replies, 1):
        whole = await stub.Predict(pb.PredictRequest(text="".join(pieces[:n]), k=4))
        assert_same(reply.prediction, whole.prediction)


async def test_empty_context_starts_after_eos(stub: pb_grpc.NextWordStub, tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    lm = OnnxLM(bundle, device="cpu")
    after_eos, state = lm.step(np.array([[bundle.vocab.eos_id]]), lm.zero_state(1))
    after_the, _ = lm.step(np.array([[bundle.vocab.id("the")]]), state)

    for text, log_probs in (("", after_eos[0]), ("the ", after_the[0])):
        ids = [i for i in np.argsort(-log_probs) if is_word(bundle.vocab.words[i])][:3]
        reply = await stub.Predict(pb.PredictRequest(text=text))
        assert [s.word for s in reply.prediction.suggestions] == [bundle.vocab.words[i] for i in ids]
        np.testing.assert_allclose(
            [s.prob for s in reply.prediction.suggestions], np.exp(log_probs[ids]), atol=TOL
        )
    (first,) = await type_words(stub, [""])
    assert_same(first.prediction, (await stub.Predict(pb.PredictRequest(text=""))).prediction)


async def test_prefill_is_one_step_and_equals_word_by_word(
    stub: pb_grpc.NextWordStub, running: RunningServer
) -> None:
    words = ["the ", "dog ", "sat ", "on ", "the ", "cat "]
    by_word = await type_words(stub, words)
    steps = sample(running, "nextword_onnx_compute_seconds_count", graph="step")
    (prefill,) = await type_words(stub, ["".join(words)])
    assert sample(running, "nextword_onnx_compute_seconds_count", graph="step") == steps + 1
    assert_same(prefill.prediction, by_word[-1].prediction)
    assert prefill.prediction.context_tokens == len(words)


async def test_resume_after_the_stream_drops(stub: pb_grpc.NextWordStub) -> None:
    chat = Chat(stub)
    await chat.say("the cat ")
    chat.call.cancel()  # the connection "drops"; the session stays for --session-ttl

    resumed = Chat(stub)
    reply = await resumed.say("sat on ", session_id=chat.session_id)
    assert reply.session_id == chat.session_id and reply.seq == 2
    whole = await stub.Predict(pb.PredictRequest(text="the cat sat on "))
    assert_same(reply.prediction, whole.prediction)
    await resumed.close()


async def test_resume_takes_over_an_attached_session(stub: pb_grpc.NextWordStub) -> None:
    old = Chat(stub)
    await old.say("the ")
    new = Chat(stub)
    reply = await new.say("dog ", session_id=old.session_id)
    assert reply.prediction.context_tokens == 2
    await expect_error(old.call.read(), grpc.StatusCode.ABORTED, "session resumed by another stream")
    assert (await new.say("sat ")).prediction.context_tokens == 3
    await new.close()


async def test_reset_restarts_the_context(stub: pb_grpc.NextWordStub) -> None:
    chat = Chat(stub)
    await chat.say("the cat sat on the ma")
    reply = await chat.say("the ", reset=True)
    assert reply.seq == 2 and reply.prediction.partial == ""
    assert_same(reply.prediction, (await stub.Predict(pb.PredictRequest(text="the "))).prediction)
    await chat.close()


# ---------------------------------------------------------------------------- bad input


async def _witness_ok(stub: pb_grpc.NextWordStub, witness: Chat, text: str) -> None:
    """The other session lost nothing: its next reply is what a fresh run of its whole text gives."""
    reply = await witness.say(" ")
    assert_same(reply.prediction, (await stub.Predict(pb.PredictRequest(text=text + " "))).prediction)


BAD_SESSION_REQUESTS = [
    # (requests of one stream, status, fragments the message must contain)
    ([{"text": "x" * (MAX_TEXT + 1)}], grpc.StatusCode.INVALID_ARGUMENT, [str(MAX_TEXT), "--max-text-chars"]),
    ([{"text": "the", "k": MAX_K + 1}], grpc.StatusCode.INVALID_ARGUMENT, [str(MAX_K), "--max-k"]),
    ([{"text": "the", "model": "no-such-model"}], grpc.StatusCode.NOT_FOUND, ["no-such-model"]),
    ([{"session_id": "0" * 32}], grpc.StatusCode.NOT_FOUND, ["--session-ttl"]),
    ([{"text": "the "}, {"session_id": "0" * 32}], grpc.StatusCode.INVALID_ARGUMENT, ["first request"]),
    ([{"text": "a" * 90}, {"text": "a" * 20}], grpc.StatusCode.INVALID_ARGUMENT, ["--max-word-chars"]),
    ([{"text": "x" * 70_000}], grpc.StatusCode.RESOURCE_EXHAUSTED, []),  # over the 64 KiB message limit
]


@pytest.mark.parametrize(("requests", "code", "fragments"), BAD_SESSION_REQUESTS)
async def test_bad_session_request(
    stub: pb_grpc.NextWordStub,
    running: RunningServer,
    requests: list[dict[str, Any]],
    code: grpc.StatusCode,
    fragments: list[str],
) -> None:
    witness = Chat(stub)
    await witness.say("the dog")
    errors = sample(running, "nextword_errors_total", method="Session", code=code.name)

    chat = Chat(stub)
    for fields in requests[:-1]:
        await chat.say(**fields)
    await chat.call.write(pb.SessionRequest(**requests[-1]))
    await expect_error(chat.call.read(), code, *fragments)

    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:  # gRPC refuses oversized messages before we see them
        assert sample(running, "nextword_errors_total", method="Session", code=code.name) == errors + 1
    await _witness_ok(stub, witness, "the dog")
    await witness.close()


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"text": "y" * (MAX_TEXT + 1)}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"text": "the", "k": MAX_K + 1}, grpc.StatusCode.INVALID_ARGUMENT),
        ({"text": "the", "model": "other"}, grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_bad_predict_request(
    stub: pb_grpc.NextWordStub, running: RunningServer, fields: dict[str, Any], code: grpc.StatusCode
) -> None:
    errors = sample(running, "nextword_errors_total", method="Predict", code=code.name)
    await expect_error(stub.Predict(pb.PredictRequest(**fields)), code)
    assert sample(running, "nextword_errors_total", method="Predict", code=code.name) == errors + 1
    assert (await stub.Predict(pb.PredictRequest(text="the cat "))).prediction.context_tokens == 2


async def test_model_named_by_its_manifest_name(stub: pb_grpc.NextWordStub) -> None:
    info = await stub.GetModelInfo(pb.ModelInfoRequest())
    reply = await stub.Predict(pb.PredictRequest(text="the ", model=info.name, k=MAX_K))
    assert len(reply.prediction.suggestions) == MAX_K
    assert info.max_k == MAX_K and info.max_text_chars == MAX_TEXT
    assert info.provider == "CPUExecutionProvider"
    assert json.loads(info.manifest_json)["name"] == info.name
    assert info.vocab_size == json.loads(info.manifest_json)["vocab_size"]


# ---------------------------------------------------------------------------- the session table


async def test_lru_eviction_and_table_full(tiny_bundle: Path) -> None:
    async with serving(tiny_bundle, max_sessions=2) as (running, stub):
        ids = []
        for _ in range(3):  # each stream drops its session; the third evicts the first
            chat = Chat(stub)
            ids.append((await chat.say("the ")).session_id)
            await chat.close()
        await expect_error(Chat(stub).say(session_id=ids[0]), grpc.StatusCode.NOT_FOUND)
        assert sample(running, "nextword_active_sessions") == 2

        holders = [Chat(stub) for _ in range(2)]
        for holder, session_id in zip(holders, ids[1:], strict=True):
            await holder.say(session_id=session_id)
        # Both sessions are attached to live streams: none may be evicted.
        await expect_error(Chat(stub).say("the "), grpc.StatusCode.RESOURCE_EXHAUSTED, "--max-sessions")
        assert (await holders[0].say("cat ")).prediction.context_tokens == 2
        for holder in holders:
            await holder.close()


async def test_idle_sessions_expire_after_ttl(tiny_bundle: Path) -> None:
    async with serving(tiny_bundle, session_ttl=0.3) as (running, stub):
        kept = Chat(stub)
        await kept.say("the ")
        dropped = Chat(stub)
        await dropped.say("the ")
        await dropped.close()
        await asyncio.sleep(0.6)  # past the TTL, and past a sweep (every TTL/2)
        assert sample(running, "nextword_active_sessions") == 1  # swept: nobody had to ask
        await expect_error(Chat(stub).say(session_id=dropped.session_id), grpc.StatusCode.NOT_FOUND)
        # A session attached to a live stream is never expired, however idle.
        assert (await kept.say("cat ")).prediction.context_tokens == 2
        await kept.close()


# ---------------------------------------------------------------------------- batching


async def test_concurrent_sessions_answer_as_if_alone(stub: pb_grpc.NextWordStub) -> None:
    texts = [
        "the cat sat on the mat ",
        "a dog ran ",
        "the mat , the cat . ",
        "on the dog ",
        "cat cat cat ",
        "the ",
        "mat on a cat sat ",
        "dog . the ",
    ]
    pieces = [[word + " " for word in text.split()] for text in texts]
    alone = [await type_words(stub, words) for words in pieces]
    together = await asyncio.gather(*(type_words(stub, words) for words in pieces))
    for a, t in zip(alone, together, strict=True):
        for x, y in zip(a, t, strict=True):
            assert_same(x.prediction, y.prediction)


async def test_batcher_groups_and_scatters(tiny_bundle: Path) -> None:
    lm = OnnxLM(load_bundle(tiny_bundle), device="cpu", threads=1)
    metrics = Metrics()
    _, base = lm.step(np.array([[1]]), lm.zero_state(1))
    pool = StatePool(lm.state_spec, base, capacity=4)  # small: the batch below makes it grow
    batcher = Batcher(lm, pool, metrics, max_batch=4, max_delay=0.001)
    batcher.start()
    try:
        rng = np.random.default_rng(0)
        calls = [rng.integers(3, lm.vocab_size, size=int(n)).tolist() for n in (1, 2, 1, 1, 2, 3, 1, 1, 1)]
        slots = [pool.alloc() for _ in calls]
        stepped, headed = await asyncio.gather(  # all queued before the batcher runs: they batch
            asyncio.gather(
                *(
                    batcher.advance(t, INITIAL, s, whole_distribution=True)
                    for t, s in zip(calls, slots, strict=True)
                )
            ),
            asyncio.gather(*(batcher.peek(INITIAL, whole_distribution=False) for _ in range(3))),
        )
        for tokens, slot, answer in zip(calls, slots, stepped, strict=True):
            want_lp, want_state = lm.step(np.array([tokens]), base)
            assert (
                answer.log_probs is not None and answer.top_values is not None and answer.top_ids is not None
            )
            np.testing.assert_allclose(answer.log_probs, want_lp[0], atol=1e-5)
            np.testing.assert_allclose(
                answer.top_values, np.sort(want_lp[0][answer.top_ids])[::-1], atol=1e-5
            )
            for got, want in zip(pool.read(slot), want_state, strict=True):
                assert got.shape == want.shape
                np.testing.assert_allclose(got, want, atol=1e-5)
        for answer in headed:  # only the in-graph top-k crossed out of onnxruntime
            assert answer.log_probs is None and answer.top_values is not None
            np.testing.assert_allclose(np.exp(answer.top_values).sum() <= 1, True)
    finally:
        await batcher.close()
    calls_made = _summed(metrics.registry, "nextword_batch_size_count")
    served = _summed(metrics.registry, "nextword_batch_size_sum")
    # Several requests at once: a request of several tokens runs a token a call, beside the others.
    assert served == sum(len(t) for t in calls) + 3 and 0 < calls_made < served
    assert _summed(metrics.registry, "nextword_words_total") == sum(len(t) for t in calls)
    assert _summed(metrics.registry, "nextword_queue_wait_seconds_count") == served


async def test_state_pool_grows_and_reuses_slots(tiny_bundle: Path) -> None:
    lm = OnnxLM(load_bundle(tiny_bundle), device="cpu", threads=1)
    initial = [np.full(s.shape, 0.5, dtype=np.float32) for s in lm.zero_state(1)]
    pool = StatePool(lm.state_spec, initial, capacity=2)
    slots = [pool.alloc() for _ in range(5)]
    assert len(set(slots)) == 5 and INITIAL not in slots and pool.capacity >= 6
    batch = [np.arange(np.prod(s.shape), dtype=np.float32).reshape(s.shape) for s in lm.zero_state(5)]
    pool.scatter(slots, batch)
    pool.alloc()  # another growth must keep what was written
    for i, slot in enumerate(slots):
        for got, full in zip(pool.read(slot), batch, strict=True):
            np.testing.assert_array_equal(got, np.take(full, [i], axis=1))
    for got, want in zip(pool.gather([INITIAL, slots[2]]), initial, strict=True):
        np.testing.assert_array_equal(np.take(got, [0], axis=1), want)
    pool.free(slots[0])
    assert pool.alloc() == slots[0]
    # An idle session costs its state's bytes and nothing more in the pool.
    assert pool.slot_bytes == sum(int(np.prod(s.shape)) * 4 for s in lm.zero_state(1))


async def test_rows_of_a_batch_as_bytes_equal_each_row_on_its_own_whatever_the_batch_axis() -> None:
    spec = [
        StateTensor("h", "h_in", "h_out", [2, BATCH, 3]),
        StateTensor("x", "x_in", "x_out", [4, 2, BATCH]),  # the batch axis last: order matters here
        StateTensor("y", "y_in", "y_out", [BATCH, 5]),
    ]
    initial = [np.zeros(s.concrete_shape(1), dtype=np.float32) for s in spec]
    pool = StatePool(spec, initial, capacity=4)
    rng = np.random.default_rng(0)
    batch = [rng.standard_normal(s.concrete_shape(6)).astype(np.float32) for s in spec]
    rows = [5, 0, 3]
    got = pool.rows_bytes(batch, rows)
    each = [
        b"".join(np.take(value, r, axis=t.batch_axis).tobytes() for value, t in zip(batch, spec, strict=True))
        for r in rows
    ]
    assert got == each and pool.rows_bytes(batch, []) == []
    slot = pool.alloc()
    pool.load(slot, got[0])  # what the store keeps loads back into the row it came from
    for value, want, tensor in zip(pool.read(slot), batch, spec, strict=True):
        np.testing.assert_array_equal(value, np.take(want, [5], axis=tensor.batch_axis))


async def test_one_row_moves_as_a_batch_row_does_whatever_the_batch_axis() -> None:
    """A lone step's gather and scatter (one row, basic indexing) read and write the same elements
    as a batch's (np.take and fancy indexing); a negative slot is a row nobody keeps."""
    spec = [
        StateTensor("h", "h_in", "h_out", [2, BATCH, 3]),
        StateTensor("x", "x_in", "x_out", [4, 2, BATCH]),
        StateTensor("y", "y_in", "y_out", [BATCH, 5]),
    ]
    initial = [np.zeros(s.concrete_shape(1), dtype=np.float32) for s in spec]
    rng = np.random.default_rng(1)
    batch = [rng.standard_normal(s.concrete_shape(3)).astype(np.float32) for s in spec]
    one, many = StatePool(spec, initial, capacity=8), StatePool(spec, initial, capacity=8)
    slots = [one.alloc() for _ in range(3)]
    assert [many.alloc() for _ in range(3)] == slots
    many.scatter([slots[0], -1, slots[2]], batch)
    for b, slot in enumerate(slots):
        row = [np.take(value, [b], axis=t.batch_axis) for value, t in zip(batch, spec, strict=True)]
        one.scatter([-1 if b == 1 else slot], row)
    for slot in slots:
        for mine, theirs in zip(one.read(slot), many.read(slot), strict=True):
            np.testing.assert_array_equal(mine, theirs)
    assert not any(v.any() for v in one.read(slots[1]))  # the row nobody keeps was not written
    together = many.gather([slots[2], slots[0]])
    for b, slot in enumerate((slots[2], slots[0])):
        for a, t, whole in zip(one.gather([slot]), spec, together, strict=True):
            np.testing.assert_array_equal(a, np.take(whole, [b], axis=t.batch_axis))


async def test_state_paired_by_name_not_position(tiny_bundle: Path, tmp_path: Path) -> None:
    """A manifest listing the state tensors in another order serves exactly the same answers."""
    flipped = shutil.copytree(tiny_bundle, tmp_path / "flipped")
    manifest = json.loads((flipped / "manifest.json").read_text())
    manifest["state"] = manifest["state"][::-1]  # c before h: neither graph order nor name order
    manifest["step"]["inputs"] = [manifest["step"]["inputs"][0], *(s["input"] for s in manifest["state"])]
    outputs = manifest["step"]["outputs"]
    manifest["step"]["outputs"] = [outputs[0], *(s["output"] for s in manifest["state"]), *outputs[3:]]
    (flipped / "manifest.json").write_text(json.dumps(manifest))
    texts = ["the cat sat on the ", "a dog ran past my house, and ", "the old king spoke to "]
    answers = []
    for bundle in (tiny_bundle, flipped):
        async with serving(bundle) as (_, stub):
            pieces = [[w + " " for w in text.split()] for text in texts]
            answers.append(await asyncio.gather(*(type_words(stub, words) for words in pieces)))
    for a, b in zip(*answers, strict=True):
        for x, y in zip(a, b, strict=True):
            assert_same(x.prediction, y.prediction)


# ---------------------------------------------------------------------------- operations


async def test_health_is_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "nextword.v1.NextWord"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("version", ["v1alpha", "v1"])
async def test_reflection_lists_and_describes_the_services(channel: grpc.aio.Channel, version: str) -> None:
    """Both reflection services answer (grpcurl and newer tools ask for v1 first). v1's messages are
    v1alpha's bytes under another name, so v1alpha's classes read and write both here."""
    info: Any = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    call = info()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in (await call.read()).list_services_response.service}
    # KServe's service too, though its messages live in a descriptor pool of their own.
    for symbol in (
        "nextword.v1.NextWord",
        f"grpc.reflection.{version}.ServerReflection",
        "inference.GRPCInferenceService",
        "inference.ModelInferRequest",
    ):
        await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
        files = (await call.read()).file_descriptor_response.file_descriptor_proto
        packages = {descriptor_pb2.FileDescriptorProto.FromString(f).package for f in files}
        assert symbol.rsplit(".", 1)[0] in packages, (symbol, packages)
    await call.done_writing()
    assert {
        "nextword.v1.NextWord",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
        "inference.GRPCInferenceService",
    } <= names


async def _scrape(port: int) -> dict[str, Any]:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    return {family.name: family for family in text_string_to_metric_families(await asyncio.to_thread(fetch))}


def _predict_count(families: dict[str, Any]) -> float:
    return sum(
        s.value
        for s in families["nextword_request_duration_seconds"].samples
        if s.name.endswith("_count") and s.labels["method"] == "Predict"
    )


async def test_metrics_over_http(stub: pb_grpc.NextWordStub, running: RunningServer) -> None:
    assert running.metrics_port > 0
    before = await _scrape(running.metrics_port)
    for text in ("the ", "the cat ", "the cat sat "):
        await stub.Predict(pb.PredictRequest(text=text))
    after = await _scrape(running.metrics_port)
    assert _predict_count(after) == _predict_count(before) + 3
    (info,) = after["nextword_model_info"].samples
    assert info.labels["provider"] == "CPUExecutionProvider" and info.labels["cell"]
    for name in (
        "nextword_onnx_compute_seconds",
        "nextword_batch_size",
        "nextword_active_sessions",
        "nextword_words",
        "nextword_errors",
    ):
        assert name in after
    assert sum(s.value for s in after["nextword_words"].samples) > 0


# ---------------------------------------------------------------------------- the command


async def _serve_subprocess(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nextword.cli",
        "serve",
        "--device",
        "cpu",
        "--metrics-port",
        "0",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.slow
async def test_sigterm_drains_open_streams_and_exits_0(tiny_bundle: Path) -> None:
    proc = await _serve_subprocess("--model", str(tiny_bundle), "--port", "0", "--grace", "8")
    assert proc.stderr is not None
    log, ready = "", re.compile(r"nextword serving \S+ \([^)]*\) on [\d.]+:(\d+), metrics on :0")
    while (match := ready.search(log)) is None:
        line = await asyncio.wait_for(proc.stderr.readline(), timeout=30)
        assert line, f"server exited before serving:\n{log}"
        log += line.decode()

    async with grpc.aio.insecure_channel(f"127.0.0.1:{match.group(1)}") as channel:
        chat = Chat(pb_grpc.NextWordStub(channel))
        await chat.say("the ")
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # Draining: the idle stream is ended at once, telling its client to resume the session ...
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await chat.call.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "resume this session" in (ended.value.details() or "")
        # ... and the server exits at once, well within the grace period (tests/test_restart.py: more).
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    assert time.monotonic() - start < 5
    assert b"Traceback" not in await proc.stderr.read()


async def test_a_corrupt_bundle_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["vocab.txt"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))

    proc = await _serve_subprocess("--model", str(bundle), "--port", "0")
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 2
    message = stderr.decode()
    assert "vocab.txt" in message and "sha256" in message and "Traceback" not in message


async def test_a_word_the_model_lacks_is_completed_once_the_user_typed_it(
    stub: pb_grpc.NextWordStub, tiny_bundle: Path
) -> None:
    """A name or a new word reads as <unk> to the model; typed once, it is a completion from then on,
    with its share of the model's <unk> probability, after a resume and in a one-shot Predict too."""
    vocab = load_bundle(tiny_bundle).vocab
    assert vocab.id("zyzzyva") == vocab.unk_id  # the premise: the model cannot name it
    before = await stub.Predict(pb.PredictRequest(text="the zy", k=5))
    assert "zyzzyva" not in [s.word for s in before.prediction.completions]

    chat = Chat(stub)
    await chat.say("the zyzzyva sat on the mat . the ")
    reply = await chat.say("zy", k=5)
    (offered,) = [s for s in reply.prediction.completions if s.word == "zyzzyva"]
    assert 0 < offered.prob < 1
    chat.call.cancel()

    resumed = Chat(stub)  # the session keeps its words across streams
    again = await resumed.say("", session_id=chat.session_id, k=5)
    assert_same(again.prediction, reply.prediction)
    once_more = await resumed.say("zz", k=5)
    assert once_more.prediction.completions[0].word == "zyzzyva"  # nothing else starts with "zyzz"
    await resumed.close()

    whole = await stub.Predict(pb.PredictRequest(text="the zyzzyva sat on the mat . the zy", k=5))
    assert_same(whole.prediction, reply.prediction)


async def test_the_keystroke_strip_puts_a_word_typed_in_full_last(stub: pb_grpc.NextWordStub) -> None:
    by_probability = await stub.Predict(pb.PredictRequest(text="the cat sat on a", k=10))
    words = [s.word for s in by_probability.prediction.completions]
    assert words[0] == "a" and len(words) >= 3  # typed in full: taking it saves nothing
    keys = pb.Strip(policy=pb.Strip.POLICY_KEYSTROKES)
    by_keys = await stub.Predict(pb.PredictRequest(text="the cat sat on a", k=10, strip=keys))
    assert [s.word for s in by_keys.prediction.completions] == [*words[1:], "a"]
    chat = Chat(stub)  # a session keeps the strip it was given
    await chat.say("the cat sat on ", strip=keys)
    assert_same((await chat.say("a", k=10)).prediction, by_keys.prediction)
    await chat.close()


async def test_no_repeat_leaves_out_what_the_user_typed_past(
    stub: pb_grpc.NextWordStub,
) -> None:
    chat = Chat(stub)
    first = await chat.say("the ", k=3, strip=pb.Strip(no_repeat=True))
    shown = {s.word for s in first.prediction.suggestions}
    for letters in ("c", "a"):  # the user types on: what was shown is not shown again in this word
        reply = await chat.say(letters)
        now = {s.word for s in reply.prediction.completions}
        assert now and not now & shown, (letters, now, shown)
        shown |= now
    peek = await chat.say("")  # nothing typed: the same strip again
    assert {s.word for s in peek.prediction.completions} == now
    after = await chat.say("t ")  # a new word: everything may be offered again
    plain = await stub.Predict(pb.PredictRequest(text="the cat ", k=3))
    assert_same(after.prediction, plain.prediction)
    await chat.close()


async def test_a_learning_session_raises_the_words_its_user_repeats(stub: pb_grpc.NextWordStub) -> None:
    """Strip.learn mixes caches of the session's own words and word pairs into the distribution:
    a word this text repeats rises, by exactly (1 - λ - μ) p + λ c(w)/N + μ c(v w)/c(v ·) with v
    the latest word; Predict with the same text answers the same, and the cache outlives a
    resume on a new stream and a reset."""
    text = "the table sat on the table . the table . the t"  # completions: the whole distribution
    learn = pb.Strip(learn=True)
    plain = await stub.Predict(pb.PredictRequest(text=text, k=10))
    learned = await stub.Predict(pb.PredictRequest(text=text, k=10, strip=learn))
    before = {s.word: s.prob for s in plain.prediction.completions}
    after = {s.word: s.prob for s in learned.prediction.completions}
    lam, mu = CACHE_WEIGHT, FOLLOW_WEIGHT
    counts = {"the": 4, "table": 3}  # of the N = 9 words typed that the strip could offer
    follows = {"table": 1.0}  # what followed the latest word, "the", before: "table" all 3 times
    for w, c in counts.items():
        want = (1 - lam - mu) * before[w] + lam * c / 9 + mu * follows.get(w, 0.0)
        assert after[w] == pytest.approx(want, rel=1e-4), w
    others = [w for w in after if w not in counts and w in before]
    assert others and all(after[w] == pytest.approx((1 - lam - mu) * before[w], rel=1e-4) for w in others)
    chat = Chat(stub)
    for piece in ("the table sat on ", "the table . the table . ", "the t"):
        reply = await chat.say(piece, k=10, strip=learn)
    assert_same(reply.prediction, learned.prediction)
    chat.call.cancel()
    resumed = Chat(stub)
    again = await resumed.say("", session_id=chat.session_id, k=10)
    assert_same(again.prediction, learned.prediction)
    cleared = await resumed.say("the t", reset=True)  # the context goes, the user's words stay
    alone = await stub.Predict(pb.PredictRequest(text="the t", k=10, strip=learn))
    table = {s.word: s.prob for s in cleared.prediction.completions}["table"]
    assert table > {s.word: s.prob for s in alone.prediction.completions}.get("table", 0.0)
    await resumed.close()


async def test_a_burst_of_new_streams_is_answered_in_full(tiny_bundle: Path) -> None:
    """More streams at once than gRPC core keeps waiting by default (1,000) for the event loop to
    take them up: every one is answered (core used to cancel the rest: INTERNAL at the client)."""
    async with serving(tiny_bundle) as (running, _):
        # 4 connections of 400 streams: well inside the per-connection limit (1,000)
        own = [("grpc.use_local_subchannel_pool", 1)]  # four connections, not one shared
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=own) for _ in range(4)]
        try:
            for ch in channels:  # connected (HTTP/2 settings exchanged) before the burst
                await ch.channel_ready()
            calls = [pb_grpc.NextWordStub(channels[i % 4]).Session() for i in range(1600)]

            async def first_reply(call: Any) -> grpc.StatusCode:
                await call.write(pb.SessionRequest(text="the "))
                reply = await call.read()
                await call.done_writing()
                assert isinstance(reply, pb.SessionReply)
                return await call.code()

            codes = await asyncio.gather(*map(first_reply, calls), return_exceptions=True)
        finally:
            for ch in channels:
                await ch.close(None)
    failed = [c for c in codes if c != grpc.StatusCode.OK]
    assert not failed, f"{len(failed)} of {len(codes)} streams failed, e.g. {failed[0]!r}"


async def test_warm_up_runs_every_small_batch_size_and_a_ladder_above() -> None:
    from nextword.server.repository import warm_sizes

    assert warm_sizes(64) == list(range(1, 65))  # the CPU default: every size a batch can have
    big = warm_sizes(4096)  # a GPU's: every size to 128, then 25% apart (not 4,096 calls at startup)
    assert big[:128] == list(range(1, 129)) and big[-1] == 4096 and len(big) < 150
    assert all(b / a <= 1.25 for a, b in itertools.pairwise(big[127:]))
