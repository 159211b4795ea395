"""Reference servers for the serving benchmark (``python -m benchmarks.serving``).

Both implement ``nextword.v1.NextWord.Session`` (one reply per request), so the
same load generator drives them and nextword alike:

* ``echo``: answers every request with a canned reply the size of nextword's
  (3 suggestions of real words, the session id, ``seq``; completions too when
  the text ends mid-word, as nextword's do). No model, no tokenizer: what is left
  is the cost of grpc.aio itself, the floor any Python gRPC server pays.
* ``naive``: a correct but careless implementation. Each session keeps its whole
  text; every request re-tokenizes all of it and runs it through the step graph
  from the zero state in one onnxruntime call (no batching, no kept state), on
  the event loop. Its replies equal nextword's; its cost grows with the context.

    python benchmarks/floors.py echo --port 0 [--processes N]
    python benchmarks/floors.py naive --model models/demo --port 0 --threads 1

Each prints ``floor listening on 127.0.0.1:PORT`` to stderr once it serves, and
stops on SIGTERM/SIGINT. ``--processes N`` runs the echo server as N processes
sharing the port (SO_REUSEPORT), the way ``nextword serve --workers N`` does: so
each of their event loops gets the same share of a load as a worker's.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np

from nextword.bundle import load_bundle
from nextword.runtime import OnnxLM
from nextword.tokenizer import is_word, split_partial
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

LISTENING = "floor listening on"
DEFAULT_K = 3

# What nextword answers after "it is a truth universally acknowledged, that a " (demo model):
# real words and float32 probabilities, so the encoded reply has nextword's size.
_SUGGESTIONS = (("man", 0.0412), ("little", 0.0207), ("good", 0.0153))
_COMPLETIONS = (("single", 0.0031), ("small", 0.0024), ("sudden", 0.0011))


def canned_reply(session_id: str, *, partial: bool) -> pb.SessionReply:
    """The echo server's reply: nextword's shape, with completions when a word is being typed."""
    prediction = pb.Prediction(
        suggestions=[pb.Suggestion(word=w, prob=p) for w, p in _SUGGESTIONS],
        context_tokens=12,
    )
    if partial:
        prediction.completions.extend(pb.Suggestion(word=w, prob=p) for w, p in _COMPLETIONS)
        prediction.partial = "s"
    return pb.SessionReply(session_id=session_id, prediction=prediction, seq=1)


def _ends_mid_word(text: str) -> bool:
    # Cheap stand-in for the tokenizer's partial-word rule: enough to size the reply like nextword's.
    return bool(text) and text[-1].isalnum()


class EchoServicer(pb_grpc.NextWordServicer):
    """Canned replies: the cost of the RPC alone."""

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext
    ) -> None:
        session_id = secrets.token_hex(16)  # nextword's ids are 32 hex digits too
        # Built once per stream: a reply per request would measure protobuf construction, not the RPC.
        whole, partial = canned_reply(session_id, partial=False), canned_reply(session_id, partial=True)
        seq = 0
        async for request in request_iterator:
            seq += 1
            reply = partial if _ends_mid_word(request.text) else whole
            reply.seq = seq
            await context.write(reply)


class NaiveServicer(pb_grpc.NextWordServicer):
    """Full text per session, the whole context through the model on every request."""

    def __init__(self, model: Path, *, threads: int = 0) -> None:
        self._bundle = load_bundle(model)
        self._lm = OnnxLM(self._bundle, device="cpu", threads=threads)
        words = self._bundle.vocab.words
        self._words = words
        # Its own ranking over the full distribution (the server's Ranker follows the server's
        # internals): offerable words only, completions as the contiguous run of words with the prefix.
        self._offerable = np.array([i for i, w in enumerate(words) if is_word(w)], dtype=np.int64)
        by_word = sorted(self._offerable.tolist(), key=lambda i: words[i])
        self._sorted_words = [words[i] for i in by_word]
        self._sorted_ids = np.array(by_word, dtype=np.int64)
        self._start = self._lm.start_state()  # where every context starts, as nextword's do
        # Session id -> everything typed since the last reset; never expired (a benchmark stand-in).
        self._texts: dict[str, str] = {}
        self._k: dict[str, int] = {}

    def predict(self, text: str, k: int) -> pb.Prediction:
        """The prediction for a whole context: one step call over ``<eos>`` + all its words."""
        tokens, partial = split_partial(text)
        # On the event loop, blocking it: this is the careless baseline, not a tuned one.
        if tokens:
            ids = np.array([self._bundle.vocab.encode(tokens)], dtype=np.int64)
            log_probs, _ = self._lm.step(ids, self._start)
        else:
            log_probs = self._lm.head(self._start)
        row = log_probs[0]
        completions = []
        if partial:
            lo = bisect.bisect_left(self._sorted_words, partial)
            hi = bisect.bisect_left(self._sorted_words, partial + "\U0010ffff", lo)
            completions = self._top(row, self._sorted_ids[lo:hi], k)
        return pb.Prediction(
            suggestions=self._top(row, self._offerable, k),
            completions=completions,
            partial=partial,
            context_tokens=len(tokens),
        )

    def _top(self, log_probs: np.ndarray, ids: np.ndarray, k: int) -> list[pb.Suggestion]:
        scores = log_probs[ids]
        best = np.argsort(-scores, kind="stable")[:k]  # a full sort: careless, and exact on ties
        return [pb.Suggestion(word=self._words[ids[i]], prob=float(np.exp(scores[i]))) for i in best]

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext
    ) -> None:
        session_id = ""
        seq = 0
        async for request in request_iterator:
            if not session_id:
                session_id = request.session_id or secrets.token_hex(16)
                if request.session_id and session_id not in self._texts:
                    await context.abort(grpc.StatusCode.NOT_FOUND, f"session {session_id!r} is unknown")
                self._texts.setdefault(session_id, "")
                self._k.setdefault(session_id, DEFAULT_K)
            if request.reset:
                self._texts[session_id] = ""
            if request.k:
                self._k[session_id] = request.k
            self._texts[session_id] += request.text
            seq += 1
            prediction = self.predict(self._texts[session_id], self._k[session_id])
            await context.write(pb.SessionReply(session_id=session_id, prediction=prediction, seq=seq))

    async def Predict(self, request: pb.PredictRequest, context: grpc.aio.ServicerContext) -> pb.PredictReply:
        return pb.PredictReply(prediction=self.predict(request.text, request.k or DEFAULT_K))


async def start(
    servicer: pb_grpc.NextWordServicer, host: str, port: int, *, reuse_port: bool = False
) -> tuple[grpc.aio.Server, int]:
    """Serve ``servicer`` on ``host:port`` (0: a free port); returns the server and its port."""
    # No SO_REUSEPORT unless asked, as nextword: a second benchmark server must not share a port with
    # the first; the processes of one echo server do (their first one picks the port).
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port))])
    pb_grpc.add_NextWordServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


async def _serve(args: argparse.Namespace) -> int:
    servicer: pb_grpc.NextWordServicer
    if args.kind == "echo":
        servicer = EchoServicer()
    else:
        if args.model is None:
            print("floors.py naive: --model BUNDLE is required", file=sys.stderr)
            return 2
        servicer = NaiveServicer(args.model, threads=args.threads)
    reuse = args.processes > 1 or args.reuse_port
    server, port = await start(servicer, args.host, args.port, reuse_port=reuse)
    others = [] if args.reuse_port else [_another(args, port) for _ in range(args.processes - 1)]
    print(f"{LISTENING} {args.host}:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for other in others:
        other.terminate()
    await server.stop(0)
    for other in others:
        other.wait()
    return 0


def _another(args: argparse.Namespace, port: int) -> subprocess.Popen[str]:
    """One more process of the echo server on ``port``, once it serves."""
    cmd = [sys.executable, "-m", "benchmarks.floors", args.kind, "--host", args.host, "--port", str(port)]
    other = subprocess.Popen([*cmd, "--reuse-port"], stderr=subprocess.PIPE, text=True)
    assert other.stderr is not None
    line = other.stderr.readline()
    if LISTENING not in line:
        other.kill()
        raise SystemExit(f"another echo process did not start: {line}")
    return other


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["echo", "naive"])
    parser.add_argument("--model", type=Path, help="bundle directory (naive)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (naive)")
    parser.add_argument(
        "--processes", type=int, default=1, help="echo: processes sharing the port (SO_REUSEPORT)"
    )
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # one of the N
    args = parser.parse_args(argv)
    if args.processes < 1 or (args.processes > 1 and args.kind != "echo"):
        parser.error("--processes: a number of at least 1, for the echo server only")
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
