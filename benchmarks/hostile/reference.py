"""Reference answers, asked before and after the attacks: the server must still give the same ones.

Asked on a fresh channel one at a time, so each runs alone (batch 1) both times and
must come back bit for bit the same: a difference means an attack left something
behind (a state slot reused while still held, a cache poisoned, a tokenizer table grown).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.hostile.attacks import NEXTWORD_SERVICE
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

K = 5
PREDICT_TEXTS = (
    "",
    "it is a truth universally ",
    "it is a truth univ",
    "Emma Woodhouse, handsome, clever, and rich, ",
    "the ",
)
# (text, reset) turns of one Session stream: words, a partial word completed later, a reset.
CONVERSATION = (
    ("it is a ", False),
    ("truth univ", False),
    ("ersally acknowledged, ", False),
    ("that", False),
    ("the ", True),
    ("emma ", False),
)

Answer = tuple[tuple[tuple[str, float], ...], tuple[tuple[str, float], ...], str, int]


def _flat(prediction: pb.Prediction) -> Answer:
    return (
        tuple((s.word, s.prob) for s in prediction.suggestions),
        tuple((s.word, s.prob) for s in prediction.completions),
        prediction.partial,
        prediction.context_tokens,
    )


async def answers(address: str, timeout: float = 30) -> list[Answer]:
    """The Predict answers, then the conversation's; raises if the server does not give them."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.NextWordStub(channel)
        found = []
        for text in PREDICT_TEXTS:
            reply = await stub.Predict(pb.PredictRequest(text=text, k=K), timeout=timeout)
            found.append(_flat(reply.prediction))
        call = stub.Session(timeout=timeout)
        for text, reset in CONVERSATION:
            await call.write(pb.SessionRequest(text=text, reset=reset, k=K))
            found.append(_flat((await call.read()).prediction))
        await call.done_writing()
        await call.wait_for_connection()
        if (code := await call.code()) != grpc.StatusCode.OK:
            raise RuntimeError(f"the reference conversation ended with {code.name}: {await call.details()}")
    return found


@dataclass(frozen=True)
class Comparison:
    identical: bool
    detail: str  # what differs, for the report


def compare(before: list[Answer], after: list[Answer] | None, error: str = "") -> Comparison:
    if after is None:
        return Comparison(False, f"no answers after the attacks: {error}")
    differ = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if a != b]
    if not differ:
        return Comparison(True, f"{len(before)} answers identical (words, probabilities, partial, context)")
    probs = [
        abs(pb_ - pa)
        for i in differ
        for (wb, pb_), (wa, pa) in zip(before[i][0], after[i][0], strict=False)
        if wb == wa
    ]
    worst = f", largest probability change {max(probs):.3g}" if probs else ""
    return Comparison(False, f"answers {differ} of {len(before)} differ{worst}")


async def health(address: str, timeout: float = 10) -> str:
    """The NextWord service's health status name, or why it could not be asked."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=NEXTWORD_SERVICE), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return f"no answer ({exc.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
