"""Cost in model tokens: limits after normalisation, a way forward for every session, the in-flight
budget, chunked prefills that equal unchunked ones, and typed words that never wait for a paste.

Real servers on loopback ports and real gRPC; the batcher tests drive a real Batcher on onnxruntime.
"""

from __future__ import annotations

import asyncio
import functools
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from nextword.bundle import load_bundle
from nextword.runtime import OnnxLM
from nextword.server.admission import (
    GUESS,
    PIECE_CHARS,
    Admission,
    Overloaded,
    TooManyTokens,
    estimate_tokens,
    measure,
)
from nextword.server.app import RunningServer, start_server
from nextword.server.batcher import DISCARD, MODEL_THREAD, Batcher, ModelThread
from nextword.server.config import ANY_FREE_PORT, ServerConfig
from nextword.server.metrics import Metrics
from nextword.server.state import INITIAL, StatePool
from nextword.tokenizer import UNK, split_partial
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc
from tests.test_server import Chat, assert_same, expect_error, sample

# Servers, channels and batchers are made and closed inside each test, on its own event loop.

ROOT = Path(__file__).resolve().parent.parent
FDFA = "\ufdfa"  # NFKC: "صلى الله عليه وسلم", four words; repeated, three more each (the ends join)
SQUARE = "\u3316"  # NFKC: "キロメートル", one six-letter word


@asynccontextmanager
async def serving(
    bundle: Path, **overrides: Any
) -> AsyncIterator[tuple[RunningServer, pb_grpc.NextWordStub]]:
    config = ServerConfig(
        model=bundle, port=0, metrics_port=ANY_FREE_PORT, device="cpu", threads=1, **overrides
    )
    running = await start_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, pb_grpc.NextWordStub(channel)
    finally:
        await running.stop(None)


def refused(running: RunningServer, reason: str) -> float:
    return sample(running, "nextword_refused_total", reason=reason)


# ---------------------------------------------------------------------------- measuring a request

PROSE = (
    "It was 1815, and Emma didn't care: the twenty-one guests (all of them!) waited... "
    "Mr. Knightley's \u201cquiet\u201d reply; caf\u00e9 na\u0131\u0308ve r\u00e9sum\u00e9 -- o'clock. "
)
MEASURED_TEXTS = [
    ("", PROSE * 12),  # many pieces, cut before spaces
    ("hel", "lo " + PROSE * 3),  # an unfinished word carried in
    ("", FDFA * 60 + " end"),
    ("", "e\u0301" * 300 + " x"),  # combining accents across piece ends
    ("", "a" * 700 + "'" + "b" * 5 + " c"),  # one long word across pieces
    ("", "ab-" * 200 + "cd ,"),
    ("", "," * 900 + "tail"),
    ("", SQUARE * 100),
]


@pytest.mark.parametrize(
    ("pending", "text"),
    MEASURED_TEXTS,
    ids=["prose", "pending", "fdfa", "combining", "long-word", "hyphens", "commas", "square"],
)
async def test_measure_tokenizes_like_the_tokenizer(pending: str, text: str) -> None:
    tokens, partial = split_partial(pending + text)
    whole = await measure(pending, text, max_tokens=10**6, max_word_chars=10**6)
    assert (whole.tokens, whole.partial) == (tokens, partial)

    # With a word limit, a word cut short is <unk>, and boundaries stay exact.
    limit = 50
    capped = await measure(pending, text, max_tokens=10**6, max_word_chars=limit)
    assert [UNK if len(t) > limit else t for t in capped.tokens] == [
        UNK if len(t) > limit else t for t in tokens
    ]
    assert capped.partial == partial if len(partial) <= limit else len(capped.partial) > limit


async def test_measure_stops_early_past_the_token_limit() -> None:
    with pytest.raises(TooManyTokens):
        await measure("", FDFA * 22, max_tokens=64, max_word_chars=100)  # 22 characters, 66 tokens
    assert len((await measure("", FDFA * 21, max_tokens=64, max_word_chars=100)).tokens) == 63


# ---------------------------------------------------------------------------- limits and ways forward


async def test_the_token_limit_counts_after_normalisation(tiny_bundle: Path) -> None:
    async with serving(tiny_bundle, max_request_tokens=64) as (running, stub):
        ok = await stub.Predict(pb.PredictRequest(text=FDFA * 21))  # 21 characters, 63 tokens
        assert ok.prediction.context_tokens == 63
        await expect_error(
            stub.Predict(pb.PredictRequest(text=FDFA * 22)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "more than 64 tokens",
            "--max-request-tokens",
            "several requests",
        )
        chat = Chat(stub)
        await chat.say("the ")
        await chat.call.write(pb.SessionRequest(text="," * 65))
        await expect_error(chat.call.read(), grpc.StatusCode.INVALID_ARGUMENT, "--max-request-tokens")
        assert refused(running, "request_tokens") == 2
        # As the message says: in several requests, on the session it kept.
        resumed = Chat(stub)
        await resumed.say("," * 40, session_id=chat.session_id)
        assert (await resumed.say("," * 25)).prediction.context_tokens == 1 + 65
        await resumed.close()


async def _refused_word(stub: pb_grpc.NextWordStub, first: str, second: str) -> str:
    """A session holding ``first`` unfinished, whose ``second`` is refused; returns its id."""
    chat = Chat(stub)
    assert (await chat.say(first)).prediction.partial == first
    await chat.call.write(pb.SessionRequest(text=second))
    await expect_error(
        chat.call.read(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "longer than 20 characters",
        "--max-word-chars",
        "end it with a space or a punctuation mark",
        "or send reset",
        f"session_id {chat.session_id}",
    )
    return chat.session_id


async def test_an_overlong_word_is_refused_and_every_way_forward_works(tiny_bundle: Path) -> None:
    async with serving(tiny_bundle, max_word_chars=20) as (running, stub):
        word = "a" * 15
        unknown = (await stub.Predict(pb.PredictRequest(text="qqqq the "))).prediction
        for way, check in [
            (pb.SessionRequest(text=""), (word, 0)),  # nothing lost: the word is still there
            (pb.SessionRequest(text=" "), ("", 1)),
            (pb.SessionRequest(text="."), ("", 2)),
            (pb.SessionRequest(text="the", reset=True), ("the", 0)),
            (pb.SessionRequest(text="a" * 10 + " the "), ("", 2)),  # a 25-letter word: one <unk>
        ]:
            session_id = await _refused_word(stub, word, "a" * 10)
            resumed = Chat(stub)
            await resumed.call.write(pb.SessionRequest(session_id=session_id))
            await resumed.call.read()
            reply = await resumed.say(way.text, reset=way.reset)
            assert (reply.prediction.partial, reply.prediction.context_tokens) == check, way
            await resumed.close()
        assert_same(reply.prediction, unknown)
        assert refused(running, "word_chars") == 5
        # Counted after normalisation: four characters sent, a 24-letter word.
        await _refused_word(stub, "", SQUARE * 4)


# ---------------------------------------------------------------------------- the in-flight budget


def _pushback_ms(error: grpc.aio.AioRpcError) -> int:
    metadata: Any = error.trailing_metadata() or ()
    return int(dict(metadata)["grpc-retry-pushback-ms"])


async def _busy(call: Any, *fragments: str) -> int:
    """The call is refused at once (not queued) with RESOURCE_EXHAUSTED; returns its retry advice."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(call, timeout=30)  # queued behind a budget nobody frees, it would time out
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    for fragment in ("--max-inflight-tokens 64", "retry in about", *fragments):
        assert fragment in (err.value.details() or "")
    return _pushback_ms(err.value)


async def test_past_the_budget_requests_are_refused_at_once_and_others_go_on(tiny_bundle: Path) -> None:
    async with serving(
        tiny_bundle, max_inflight_tokens=64, max_request_tokens=48, prefill_chunk_tokens=4
    ) as (
        running,
        stub,
    ):
        held = running.servicer.admission.admit(60)  # as if long requests were running
        paste = "a " * 30  # 30 tokens in one piece (tokenized, then refused): long ones may use 56 of 64
        assert await _busy(stub.Predict(pb.PredictRequest(text=paste)), "this request needs 30") > 0
        # A long text is refused before it is tokenized: tokenized, it would be over --max-request-tokens.
        await _busy(stub.Predict(pb.PredictRequest(text="," * (PIECE_CHARS + 1))), "needs about 48")
        # Short requests use the eighth kept for them: typing goes on.
        assert (await stub.Predict(pb.PredictRequest(text="the cat "))).prediction.context_tokens == 2
        chat = Chat(stub)
        assert (await chat.say("the ")).prediction.context_tokens == 1
        full = running.servicer.admission.admit(4)
        await _busy(stub.Predict(pb.PredictRequest(text="the ")), "this request needs 1")
        assert sample(running, "nextword_inflight_tokens") == 64
        held.close()
        full.close()
        assert (await stub.Predict(pb.PredictRequest(text=paste))).prediction.context_tokens == 30
        assert (await chat.say("cat ")).prediction.context_tokens == 2
        await chat.close()
        assert refused(running, "inflight") == 3
        assert sample(running, "nextword_inflight_tokens") == 0


def test_retry_advice_spreads_the_refused_over_the_time_the_budget_takes() -> None:
    now = [0.0]
    admission = Admission(
        Metrics(), budget=8000, short_tokens=16, max_request_tokens=2000, clock=lambda: now[0]
    )
    assert GUESS / 2 <= admission.retry_after(2000, 7000) <= GUESS * 1.5  # nothing ran yet
    held, typed = admission.admit(7000), admission.admit(16)  # typing may use the last eighth
    held.release(500)
    now[0] = 0.1
    held.release(1000)  # 10,000 tokens a second; 5,516 in flight
    advice = []
    for _ in range(12):
        with pytest.raises(Overloaded) as err:
            admission.admit(2000)
        advice.append(err.value.retry_after)
    # The first may come back once 516 tokens have run, the next 0.2 s later, ... while that fits in
    # the time the whole budget takes (0.8 s); the rest at random times before it, not all at once.
    np.testing.assert_allclose(advice[:3], [0.0516, 0.2516, 0.4516], atol=1e-6)
    later = advice[3:]
    assert all(0.0516 <= a <= 0.8 for a in later) and len(set(later)) == len(later)
    held.close()
    typed.close()
    assert admission.inflight == 0 and admission.throughput.rate() is None  # idle: measured afresh


def test_a_long_text_holds_an_estimate_until_its_real_cost_is_known() -> None:
    assert estimate_tokens("The cat, (they say) sat; on the mat!") == len(
        split_partial("The cat, (they say) sat; on the mat! ")[0]
    )
    admission = Admission(Metrics(), budget=800, short_tokens=16, max_request_tokens=500)
    assert admission.hold("a" * PIECE_CHARS) is None  # one piece: tokenized at once, then admitted
    other = admission.admit(300)
    text = admission.hold("a, " * 100)  # estimated: 200 tokens
    assert text is not None and admission.inflight == 500
    text.resize(400)  # more than estimated (U+FDFA would do that): 400 fit in the 700 long ones may use
    assert admission.inflight == 700
    with pytest.raises(Overloaded, match="this request needs 450"):
        text.resize(450)
    text.resize(50)
    assert admission.inflight == 350
    with pytest.raises(Overloaded, match="this request needs about 500"):
        admission.hold("a, " * 600)
    text.close()
    other.close()
    assert admission.inflight == 0


# ---------------------------------------------------------------------------- chunked prefills


CHUNKED_TEXTS = ["the ", "the cat sat on the ma", "the dog . " * 7, "a , b ; c " * 12 + "emm", "her " * 70]


async def test_chunked_answers_equal_unchunked(tiny_bundle: Path) -> None:
    async with (
        serving(tiny_bundle, prefill_chunk_tokens=4, prefill_call_tokens=8) as (_, chunked),
        serving(tiny_bundle, prefill_chunk_tokens=2048, prefill_call_tokens=2048) as (_, whole),
    ):
        # All at once on the chunked server: chunks of different requests share calls.
        got = await asyncio.gather(*(chunked.Predict(pb.PredictRequest(text=t, k=5)) for t in CHUNKED_TEXTS))
        for text, reply in zip(CHUNKED_TEXTS, got, strict=True):
            assert_same(reply.prediction, (await whole.Predict(pb.PredictRequest(text=text, k=5))).prediction)
        pieces = ["the cat ", "sat on the mat . " * 5, "and ", "the dog " * 9 + "wa", "lked "]
        chats = [Chat(chunked), Chat(whole)]
        for piece in pieces:
            a, b = [await chat.say(piece, k=4) for chat in chats]
            assert_same(a.prediction, b.prediction)
        for chat in chats:
            await chat.close()


@pytest.fixture(scope="module")
def lm(tiny_bundle: Path) -> OnnxLM:
    return OnnxLM(load_bundle(tiny_bundle), device="cpu", threads=1)


def _batcher(lm: OnnxLM, *, chunk: int, call: int) -> tuple[Batcher, StatePool, Metrics]:
    metrics = Metrics()
    pool = StatePool(lm.state_spec, lm.start_state(), capacity=4)
    return (
        Batcher(lm, pool, metrics, max_batch=8, max_delay=0, chunk_tokens=chunk, prefill_call_tokens=call),
        pool,
        metrics,
    )


def _same_as_one_step(lm: OnnxLM, tokens: list[int], log_probs: Any, state: list[np.ndarray] | None) -> None:
    want_lp, want_state = lm.step(np.array([tokens]), lm.start_state())
    np.testing.assert_allclose(log_probs, want_lp[0], atol=1e-5)
    for got, want in zip(state if state is not None else want_state, want_state, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


async def test_a_typed_word_runs_before_the_rest_of_a_paste(lm: OnnxLM) -> None:
    batcher, pool, _ = _batcher(lm, chunk=4, call=4)
    batcher.start()
    try:
        paste = np.random.default_rng(0).integers(3, lm.vocab_size, size=40).tolist()  # ten chunks
        done: list[int] = []
        first = asyncio.Event()

        def progress(tokens: int) -> None:
            done.append(tokens)
            first.set()

        slot = pool.alloc()
        long = asyncio.ensure_future(
            batcher.advance(paste, INITIAL, slot, whole_distribution=True, progress=progress)
        )
        await first.wait()  # the paste is under way
        await batcher.advance([5], INITIAL, DISCARD, whole_distribution=False)
        # The word waited for at most the chunk running when it came, not for the paste.
        assert len(done) <= 2 and not long.done()
        scores = await long
        assert done == [4] * 10
        _same_as_one_step(lm, paste, scores.log_probs, pool.read(slot))
    finally:
        await batcher.close()


async def test_prefill_calls_are_bounded_and_private_slots_freed(lm: OnnxLM) -> None:
    batcher, pool, metrics = _batcher(lm, chunk=4, call=8)
    batcher.start()
    try:
        rng = np.random.default_rng(1)
        pastes = [rng.integers(3, lm.vocab_size, size=n).tolist() for n in (20, 19, 17, 24, 5, 21)]
        in_use = pool.in_use
        answers = await asyncio.gather(
            *(batcher.advance(p, INITIAL, DISCARD, whole_distribution=True) for p in pastes)
        )
        for paste, scores in zip(pastes, answers, strict=True):
            _same_as_one_step(lm, paste, scores.log_probs, None)
        assert pool.in_use == in_use  # the slots the chunks ran through are free again
    finally:
        await batcher.close()
    registry = metrics.registry
    model = {"model": "", "version": ""}  # a batcher made outside a repository
    calls = registry.get_sample_value("nextword_batch_size_count", model)
    assert calls
    assert (
        registry.get_sample_value("nextword_batch_size_bucket", {"le": "2.0", **model}) == calls
    )  # 8 tokens a call
    assert registry.get_sample_value("nextword_words_total", model) == sum(len(p) for p in pastes)


async def test_the_model_thread_runs_calls_in_order_off_the_loop_and_returns_their_errors() -> None:
    model = ModelThread(name="test-model")
    loop_thread = threading.get_ident()
    ran: list[tuple[int, int]] = []

    native: list[int] = []

    def call(i: int) -> int:
        ran.append((i, threading.get_ident()))
        native.append(threading.get_native_id())
        if i == 3:
            raise ValueError("the graph failed")
        return i * i

    futures = [model.run(functools.partial(call, i)) for i in range(6)]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert [r if not isinstance(r, ValueError) else "error" for r in results] == [0, 1, 4, "error", 16, 25]
    assert [i for i, _ in ran] == list(range(6))
    assert {t for _, t in ran} != {loop_thread} and len({t for _, t in ran}) == 1
    comm = Path(f"/proc/self/task/{native[0]}/comm")
    if comm.exists():  # Linux: top -H and ps -L show what the thread does
        assert comm.read_text().strip() == MODEL_THREAD
    late = model.run(functools.partial(call, 7))
    model.close()  # the calls made before close still run
    assert await late == 49


async def test_a_session_types_while_a_paste_runs(tiny_bundle: Path) -> None:
    async with serving(tiny_bundle, max_text_chars=4096, prefill_chunk_tokens=4, prefill_call_tokens=4) as (
        running,
        stub,
    ):
        paste = asyncio.ensure_future(stub.Predict(pb.PredictRequest(text="the cat " * 500)))  # 250 calls
        while not running.servicer.admission.inflight and not paste.done():
            await asyncio.sleep(0.001)
        chat = Chat(stub)
        for n, word in enumerate(["the ", "dog ", "sat "], 1):
            assert (await chat.say(word)).prediction.context_tokens == n
        assert not paste.done()
        await chat.close()
        assert (await paste).prediction.context_tokens == 1000


# ---------------------------------------------------------------------------- settings, benchmark


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"max_request_tokens": 0}, "--max-request-tokens"),
        ({"max_word_chars": 0}, "--max-word-chars"),
        ({"prefill_chunk_tokens": 32, "prefill_call_tokens": 16}, "--prefill-call-tokens"),
        ({"max_inflight_tokens": 100, "max_request_tokens": 200}, "--max-inflight-tokens"),
    ],
)
def test_cost_settings_are_checked_at_startup(overrides: dict[str, int], flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        ServerConfig(**overrides)  # type: ignore[arg-type]


def test_flood_benchmark_quick(tiny_bundle: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.flood", "--quick", "--json", "--model", str(tiny_bundle)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["idle"]["n"] > 0 and result["flood"]["n"] > 0 and result["pastes_per_s"] > 0
    assert result["p99_ratio"] > 0 and result["rss_mb"]["after"] > 0
    assert result["other_errors"] == {}
