"""The hostile requests: their kinds, what each sends, and drawing them with hypothesis.

An ``Attack`` is one RPC: the method, the raw bytes of each message (written by
``wire``, so they may be anything a stranger can put on the wire) and how the
stream ends. Examples are drawn by hypothesis's own engine with a fixed seed and
no example database, so a seed names the same requests on every run.
"""

from __future__ import annotations

import enum
import string
from dataclasses import dataclass

from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from benchmarks.hostile import strategies as s
from benchmarks.hostile import wire
from nextword.v1 import nextword_pb2 as pb

Pb = (
    pb.PredictRequest
    | pb.SessionRequest
    | health_pb2.HealthCheckRequest
    | reflection_pb2.ServerReflectionRequest
)


def _path(file: object, service: str, method: str) -> str:
    full = file.DESCRIPTOR.services_by_name[service].full_name  # type: ignore[attr-defined]
    return f"/{full}/{method}"


PREDICT = _path(pb, "NextWord", "Predict")
SESSION = _path(pb, "NextWord", "Session")
INFO = _path(pb, "NextWord", "GetModelInfo")
HEALTH_CHECK = _path(health_pb2, "Health", "Check")
HEALTH_LIST = _path(health_pb2, "Health", "List")
HEALTH_WATCH = _path(health_pb2, "Health", "Watch")
REFLECTION = _path(reflection_pb2, "ServerReflection", "ServerReflectionInfo")
BIDI = frozenset({SESSION, REFLECTION})  # client and server stream
SERVER_STREAM = frozenset({HEALTH_WATCH})
NEXTWORD_SERVICE = pb.DESCRIPTOR.services_by_name["NextWord"].full_name
MIB = 1 << 20
MAX_MESSAGE_BYTES = 64 * 1024  # the server's receive limit: oversized requests straddle it


class Close(enum.Enum):
    """How a stream ends (unary calls ignore it)."""

    TURNS = "turns"  # write a message, read its reply, repeat; half-close; read to the end
    PIPELINE = "pipeline"  # write every message, half-close, read to the end
    CANCEL_WRITTEN = "cancel-written"  # write ``at`` messages, cancel without reading a reply
    CANCEL_READ = "cancel-read"  # write every message, read ``at`` replies, cancel
    EMPTY = "empty"  # half-close at once: a stream without a message
    SILENT = "silent"  # send nothing, never half-close; cancel after ``at`` milliseconds


class Resume(enum.Enum):
    """How a session id seen in another stream's replies is reused (resolved when sent)."""

    SAME = "same"  # take the session over: the stream holding it is told ABORTED
    MANGLED = "mangled"  # the id with its case swapped and a character added: a guess
    LATER = "later"  # the id on the second message of a stream, where it is not allowed


@dataclass(frozen=True)
class Attack:
    kind: str
    method: str
    messages: tuple[bytes, ...] = (b"",)
    close: Close = Close.PIPELINE
    at: int = 0
    resume: tuple[int, Resume] | None = None  # which id seen so far (modulo their number), and how
    pad: int = 0  # bytes of an unknown field appended to each message when sent: oversized requests
    gzip: bool = False  # compressed by the client: a small message that inflates past the limit


def encode(message: type[Message], **fields: str | int | bool) -> bytes:
    """Fields in the wire format, defaults left out; ints may be negative or past 64 bits."""
    out = b""
    for name, value in fields.items():
        number = wire.number(message, name)
        if isinstance(value, str):
            out += wire.len_field(number, value.encode("utf-8")) if value else b""
        elif value:
            out += wire.varint_field(number, int(value))
    return out


def _session_turn(text: str, reset: bool, k: int) -> bytes:
    return encode(pb.SessionRequest, text=text, reset=reset, k=k)


def _turns(texts: st.SearchStrategy[str], min_size: int, max_size: int) -> st.SearchStrategy[list[bytes]]:
    turn = st.builds(_session_turn, texts, st.booleans(), s.small_k())
    return st.lists(turn, min_size=min_size, max_size=max_size)


ZERO: st.SearchStrategy[int] = st.just(0)
NO_RESUME: st.SearchStrategy[tuple[int, Resume] | None] = st.none()


def _predict(text: str = "", k: int = 0, model: str = "") -> bytes:
    return encode(pb.PredictRequest, text=text, k=k, model=model)


def _unary(kind: str, method: str, message: st.SearchStrategy[bytes]) -> st.SearchStrategy[Attack]:
    return st.builds(Attack, st.just(kind), st.just(method), message.map(lambda data: (data,)))


def _stream(
    kind: str,
    messages: st.SearchStrategy[tuple[bytes, ...]],
    closes: tuple[Close, ...],
    at: st.SearchStrategy[int] = ZERO,
    resume: st.SearchStrategy[tuple[int, Resume] | None] = NO_RESUME,
    method: str = SESSION,
) -> st.SearchStrategy[Attack]:
    return st.builds(
        Attack, st.just(kind), st.just(method), messages, st.sampled_from(closes), at=at, resume=resume
    )


def _predict_kinds() -> dict[str, st.SearchStrategy[Attack]]:
    words = st.sampled_from(s.WORDS)
    valid = st.builds(_predict, s.texts(), s.small_k())
    text, model = (wire.number(pb.PredictRequest, name) for name in ("text", "model"))
    return {
        "predict.text": _unary("predict.text", PREDICT, valid),
        "predict.k": _unary("predict.k", PREDICT, st.builds(_predict, words, s.extreme_k())),
        "predict.model": _unary("predict.model", PREDICT, st.builds(_predict, words, model=s.names())),
        "predict.wire": _unary("predict.wire", PREDICT, s.corrupt(valid, (text, model))),
    }


def _joined(*parts: st.SearchStrategy[list[bytes]]) -> st.SearchStrategy[tuple[bytes, ...]]:
    return st.tuples(*parts).map(lambda lists: tuple(m for messages in lists for m in messages))


def _session_kinds() -> dict[str, st.SearchStrategy[Attack]]:
    turns = _turns(s.short_texts(), 1, 6).map(tuple)
    reset = st.builds(_session_turn, st.sampled_from(s.WORDS + s.TRICKY), st.just(True), s.small_k())
    one = _turns(s.short_texts(), 1, 1)
    forged_id = st.builds(
        lambda sid, text: [encode(pb.SessionRequest, session_id=sid, text=text)], s.names(), s.short_texts()
    )
    bad_model = st.builds(lambda model: [encode(pb.SessionRequest, text="the ", model=model)], s.names())
    string_fields = tuple(wire.number(pb.SessionRequest, n) for n in ("session_id", "text", "model"))
    bad = s.corrupt(one.map(lambda m: m[0]), string_fields).map(lambda data: [data])
    some = _turns(s.short_texts(), 0, 3)
    ids = st.tuples(st.integers(0, 2**16), st.sampled_from(Resume))
    return {
        "session.text": _stream("session.text", turns, (Close.TURNS, Close.PIPELINE)),
        "session.cut": _stream(
            "session.cut", turns, (Close.CANCEL_WRITTEN, Close.CANCEL_READ), at=st.integers(0, 6)
        ),
        "session.reset": _stream(
            "session.reset",
            st.lists(reset, min_size=10, max_size=40).map(tuple),
            (Close.TURNS, Close.PIPELINE),
        ),
        "session.forged": _stream(
            "session.forged",
            st.one_of(_joined(forged_id, some), _joined(one, bad_model, some)),
            (Close.TURNS, Close.PIPELINE),
        ),
        "session.resume": _stream(
            "session.resume", turns, (Close.TURNS, Close.PIPELINE, Close.CANCEL_READ), st.integers(0, 4), ids
        ),
        "session.wire": _stream("session.wire", _joined(some, bad, some), (Close.TURNS, Close.PIPELINE)),
        "session.empty": _stream(
            "session.empty", st.just(()), (Close.EMPTY, Close.SILENT), st.integers(0, 250)
        ),
    }


def _oversize(method: str, message: bytes) -> st.SearchStrategy[Attack]:
    """Padded to either side of the receive limit; compressed, a small message that inflates past it."""
    pad = st.integers(MAX_MESSAGE_BYTES - 64, 2 * MIB)
    return st.builds(
        Attack, st.just("oversize"), st.just(method), st.just((message,)), pad=pad, gzip=st.booleans()
    )


def _service_kinds() -> dict[str, st.SearchStrategy[Attack]]:
    """GetModelInfo, health, reflection, methods that do not exist, and oversized messages."""
    check = health_pb2.HealthCheckRequest
    services = st.one_of(st.sampled_from(("", NEXTWORD_SERVICE, "grpc.health.v1.Health")), s.names())
    valid_check = services.map(lambda name: encode(check, service=name))
    health = st.one_of(
        _unary("health", HEALTH_CHECK, st.one_of(valid_check, s.corrupt(valid_check, (1,)))),
        _unary("health", HEALTH_LIST, st.one_of(st.just(b""), s.corrupt(st.just(b""), (1,)))),
        _stream(
            "health",
            valid_check.map(lambda m: (m,)),
            (Close.CANCEL_READ,),
            st.integers(0, 1),  # Watch sends the status once, then only when it changes
            method=HEALTH_WATCH,
        ),
    )
    reflect = reflection_pb2.ServerReflectionRequest
    asks = st.one_of(
        st.just(encode(reflect, list_services="*")),
        st.builds(lambda name: encode(reflect, file_containing_symbol=name), s.names()),
        st.builds(lambda name: encode(reflect, file_by_filename=name), s.names()),
    )
    reflect_fields = tuple(wire.number(reflect, n) for n in ("host", "file_by_filename", "list_services"))
    reflection = st.lists(st.one_of(asks, s.corrupt(asks, reflect_fields)), min_size=1, max_size=3).map(tuple)
    nowhere = st.one_of(
        st.sampled_from((f"/{NEXTWORD_SERVICE}/Nope", "/nextword.v2.NextWord/Predict", "/", "//")),
        st.text(string.ascii_letters + string.digits + "/._-", max_size=40).map("/".__add__),
    )
    return {
        "info": _unary("info", INFO, st.one_of(st.just(b""), s.corrupt(st.just(b""), (1,)))),
        "health": health,
        "reflection": _stream("reflection", reflection, (Close.PIPELINE, Close.TURNS), method=REFLECTION),
        "unknown": st.builds(Attack, st.just("unknown"), nowhere, st.binary(max_size=32).map(lambda b: (b,))),
        "oversize": st.one_of(
            _oversize(PREDICT, _predict("the ")), _oversize(SESSION, _session_turn("the ", False, 0))
        ),
    }


# Share of the requests each kind gets (every kind gets at least one).
WEIGHTS = {
    "predict.text": 14,
    "predict.k": 5,
    "predict.model": 4,
    "predict.wire": 12,
    "session.text": 12,
    "session.cut": 6,
    "session.reset": 3,
    "session.forged": 6,
    "session.resume": 6,
    "session.wire": 10,
    "session.empty": 3,
    "info": 4,
    "health": 6,
    "reflection": 3,
    "unknown": 2,
    "oversize": 3,
}


# What each kind sends, for the report.
ABOUT = {
    "predict.text": "Predict with odd, control, format, private-use, unassigned or long text",
    "predict.k": "Predict with k past max_k, past 32 and 64 bits, negative",
    "predict.model": "Predict naming models that are not served (up to 120 kB names)",
    "predict.wire": "Predict as noise, invalid UTF-8, truncated, lying lengths, bit flips, deep groups",
    "session.text": "Session turns of odd text, resets, k (turn by turn or pipelined)",
    "session.cut": "Session cancelled after some writes or some replies",
    "session.reset": "Session of 10 to 40 resets",
    "session.forged": "Session resuming ids never issued (up to 120 kB), or naming unknown models",
    "session.resume": "Session taking over another stream's id, a mangled one, or setting it late",
    "session.wire": "Session with a corrupt message among valid ones",
    "session.empty": "Session that sends nothing: closed at once, or silent until cancelled",
    "info": "GetModelInfo with noise and corrupt bytes",
    "health": "health Check (odd service names, corrupt bytes), List, Watch",
    "reflection": "reflection streams: odd symbols and file names, corrupt bytes",
    "unknown": "methods and services that do not exist",
    "oversize": "Predict and Session either side of the 64 KiB limit, and gzip inflating past it",
}


def kinds() -> dict[str, st.SearchStrategy[Attack]]:
    found = {**_predict_kinds(), **_session_kinds(), **_service_kinds()}
    assert found.keys() == WEIGHTS.keys() == ABOUT.keys(), "every kind needs a weight and a line"
    return found


def shares(total: int) -> dict[str, int]:
    """One request of each kind, the rest split by ``WEIGHTS`` (largest remainders first)."""
    rest = max(0, total - len(WEIGHTS))
    whole = sum(WEIGHTS.values())
    exact = {kind: rest * w / whole for kind, w in WEIGHTS.items()}
    counts = {kind: 1 + int(x) for kind, x in exact.items()}
    left = len(WEIGHTS) + rest - sum(counts.values())
    for kind in sorted(exact, key=lambda kind: int(exact[kind]) - exact[kind])[:left]:
        counts[kind] += 1
    return counts


def examples(strategy: st.SearchStrategy[Attack], count: int, seed: int) -> list[Attack]:
    """``count`` examples of ``strategy``, the same ones for the same seed (hypothesis's engine)."""
    found: list[Attack] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,  # nothing remembered between runs: the seed alone decides
        phases=[Phase.generate],
        deadline=None,
        verbosity=Verbosity.quiet,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(attack: Attack) -> None:
        found.append(attack)

    collect()
    # A small strategy (a finite choice) may run out of new examples: repeat the ones found.
    return [found[i % len(found)] for i in range(count)]


def draw(total: int, seed: int) -> list[Attack]:
    """``total`` attacks of every kind, interleaved so that each kind is spread over the whole run."""
    strategies = kinds()
    keyed = []
    for index, (kind, count) in enumerate(shares(total).items()):
        for j, attack in enumerate(examples(strategies[kind], count, seed * 1009 + index)):
            keyed.append(((j + 0.5) / count, index, attack))
    keyed.sort(key=lambda item: item[:2])
    return [attack for *_, attack in keyed]
