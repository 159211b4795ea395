"""The client library, ``nextword predict`` and the autocomplete completer, against a real server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from nextword.cli import main as cli_main
from nextword.clients.autocomplete import NextWordCompleter
from nextword.clients.client import (
    AsyncNextWordClient,
    NextWordClient,
    NextWordError,
    Prediction,
    SyncSession,
)
from nextword.ranking import strip_message
from nextword.server.config import ServerConfig
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc
from tests.servers import in_thread

ROOT = Path(__file__).resolve().parent.parent
MAX_K = 20


@pytest.fixture(scope="module")
def target(tiny_bundle: Path) -> Iterator[str]:
    """A real server on a free port, on its own event loop in a background thread.

    Its own loop, because the blocking clients below would otherwise stall the
    loop that has to answer them.
    """
    config = ServerConfig(model=tiny_bundle, port=0, metrics_port=0, device="cpu", max_k=MAX_K)
    with in_thread(config) as target:
        yield target


@pytest.fixture(scope="module")
def prefix(tiny_bundle: Path) -> str:
    """Two letters that start a frequent vocabulary word, so completions exist whatever the bundle."""
    words = (tiny_bundle / "vocab.txt").read_text(encoding="utf-8").split("\n")
    return next(w[:2] for w in words if len(w) >= 3 and w.isalpha() and w.isascii())


@pytest.fixture()
def client(target: str) -> Iterator[NextWordClient]:
    with NextWordClient(target, timeout=10) as c:
        yield c


def _check_probs(pred: Prediction, k: int) -> None:
    probs = [s.prob for s in pred.suggestions]
    assert len(probs) == k
    assert all(0 < p <= 1 for p in probs)
    assert probs == sorted(probs, reverse=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nextword.cli", *argv], capture_output=True, text=True, timeout=30, cwd=ROOT
    )


# ---------------------------------------------------------------------------- sync client


def test_predict_and_model_info(client: NextWordClient, prefix: str) -> None:
    info = client.model_info()
    assert info.max_k == MAX_K and info.vocab_size > 3
    assert info.manifest["name"] == info.name

    pred = client.predict("the ", k=4)
    _check_probs(pred, 4)
    assert pred.partial == "" and pred.completions == ()
    assert pred.context_tokens == 1

    typing = client.predict(f"The cat sat on {prefix.upper()}", k=3)
    assert typing.partial == prefix and typing.context_tokens == 4
    assert typing.completions and all(s.word.startswith(prefix) for s in typing.completions)
    assert typing.to_json_dict()["partial"] == prefix
    assert "completions" not in pred.to_json_dict()


def test_rpc_errors_are_not_swallowed(client: NextWordClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.predict("the", k=MAX_K + 1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(MAX_K) in (err.value.details() or "")


def test_session_sends_increments(client: NextWordClient) -> None:
    with client.session(k=5) as s:
        assert s.session_id is None
        s.send("the cat sat")
        assert s.session_id
        pred = s.send(" on the ")
        assert s.seq == 2
    _check_probs(pred, 5)
    whole = client.predict("the cat sat on the ", k=5)
    assert pred.words == whole.words
    assert pred.context_tokens == whole.context_tokens == 5
    assert pred.suggestions[0].prob == pytest.approx(whole.suggestions[0].prob, rel=1e-4)


def test_session_strip_is_kept_by_the_session_and_its_rebuilds(client: NextWordClient) -> None:
    with client.session(k=3, strip=pb.Strip(no_repeat=True)) as s:
        shown = set(s.send("the ").words)
        for letters in ("c", "a"):  # typed past: not offered again in this word
            now = {c.word for c in s.send(letters).completions}
            assert now and not now & shown
            shown |= now
        # A session rebuilt from its text (its server lost it) is opened with the same strip.
        rebuilt = s._rebuild_requests("t", False, 0, limit=100)
        assert rebuilt[0].HasField("strip") and rebuilt[0].strip.no_repeat
        assert all(not r.HasField("strip") for r in rebuilt[1:])


def test_session_reset_and_k(client: NextWordClient) -> None:
    with client.session() as s:
        s.send("a long context of many words ")
        pred = s.send("the ", reset=True, k=2)
        assert pred.context_tokens == 1 and len(pred.suggestions) == 2
        assert len(s.send("").suggestions) == 2  # k sticks to the session
    assert pred.words == client.predict("the ", k=2).words


def test_session_resume_after_close(client: NextWordClient, prefix: str) -> None:
    first = client.session()
    before = first.send(f"the cat sat on {prefix}")
    session_id = first.session_id
    first.close()
    with pytest.raises(NextWordError) as err:
        first.send("x")
    assert err.value.code() == grpc.StatusCode.CANCELLED

    with client.session(session_id=session_id) as again:
        resumed = again.send("")
        assert again.session_id == session_id and again.seq == 2
    assert resumed.context_tokens == before.context_tokens
    assert resumed.partial == prefix and resumed.words == before.words


def test_resume_unknown_session_is_not_found(client: NextWordClient) -> None:
    s = client.session(session_id="no-such-session")
    with pytest.raises(grpc.RpcError) as err:
        s.send("hello ")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert s.closed
    s.close()


def test_sync_session_is_thread_safe(client: NextWordClient) -> None:
    # Concurrent sends must each get their own reply (the lock pairs request and reply). Every
    # request is distinct, a reset with i complete words and a partial word of its own, so a
    # reply crossed with another thread's names the wrong partial or context length.
    session: SyncSession = client.session()
    crossed: list[tuple[str, int, str, int]] = []
    answered = 0

    def worker(i: int) -> None:
        nonlocal answered
        for j in range(5):
            partial = "q" + chr(ord("a") + i) + chr(ord("a") + j)
            pred = session.send("the " * i + partial, reset=True)
            answered += 1
            if (pred.partial, pred.context_tokens) != (partial, i):
                crossed.append((partial, i, pred.partial, pred.context_tokens))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    session.close()
    assert answered == 20 and session.seq == 20
    assert crossed == []


# ---------------------------------------------------------------------------- async client


async def test_async_client(target: str, client: NextWordClient, prefix: str) -> None:
    async with AsyncNextWordClient(target, timeout=10) as aclient:
        info = await aclient.model_info()
        assert info == client.model_info()
        pred = await aclient.predict(f"once upon a {prefix}", k=3)
        sync = client.predict(f"once upon a {prefix}", k=3)
        assert (pred.words, pred.partial, pred.context_tokens) == (sync.words, prefix, 3)

        async with aclient.session(k=3) as s:
            await s.send("once upon")
            streamed = await s.send(f" a {prefix}")
            session_id = s.session_id
        assert streamed.words == pred.words and streamed.partial == prefix

        async with aclient.session(session_id=session_id) as again:
            assert (await again.send("me ")).context_tokens == 4

        with pytest.raises(grpc.RpcError) as err:
            await aclient.predict("x", k=MAX_K + 1)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        bad = aclient.session(session_id="no-such-session")
        with pytest.raises(grpc.RpcError) as err:
            await bad.send("x")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        await bad.close()


class _HungServicer(pb_grpc.NextWordServicer):
    """Reads requests and never answers: the client's timeouts must end the wait."""

    def Session(
        self, request_iterator: Iterator[pb.SessionRequest], context: Any
    ) -> Iterator[pb.SessionReply]:
        for _ in request_iterator:
            pass
        yield from ()

    def Predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictReply:
        done = threading.Event()
        context.add_callback(done.set)  # returns as soon as the client gives up
        done.wait(10)
        return pb.PredictReply()


@pytest.fixture(scope="module")
def hung_target() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_NextWordServicer_to_server(_HungServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_timeouts_bound_each_reply(hung_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    with NextWordClient(hung_target, timeout=0.3) as c:
        s = c.session()
        with pytest.raises(NextWordError) as err:
            s.send("hello ")
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and s.closed
        with pytest.raises(grpc.RpcError) as rpc_err:
            c.predict("hello")
        assert rpc_err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    assert cli_main(["predict", "hello", "--target", hung_target, "--timeout", "0.3"]) == 1
    err_line = capsys.readouterr().err.strip()
    assert hung_target in err_line and "DEADLINE_EXCEEDED" in err_line


async def test_async_session_timeout(hung_target: str) -> None:
    async with AsyncNextWordClient(hung_target, timeout=0.3) as c, c.session() as s:
        with pytest.raises(NextWordError) as err:
            await s.send("hello ")
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# ---------------------------------------------------------------------------- nextword predict


def test_predict_json_subprocess(target: str, prefix: str) -> None:
    proc = _run_cli("predict", f"Once upon a {prefix.capitalize()}", "--k", "3", "--target", target, "--json")
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)  # exactly one JSON object
    assert set(out) == {"suggestions", "completions", "partial"}
    assert len(out["suggestions"]) >= 3
    assert all(0 < s["prob"] <= 1 and set(s) == {"word", "prob"} for s in out["suggestions"])
    assert out["partial"] == prefix
    assert out["completions"] and all(c["word"].startswith(prefix) for c in out["completions"])

    proc = _run_cli("predict", "once upon a ", "--target", target, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "completions" not in out and out["partial"] == ""
    assert len(out["suggestions"]) == 3


def test_predict_unreachable_target() -> None:
    dead = f"127.0.0.1:{_free_port()}"
    proc = _run_cli("predict", "hello", "--target", dead, "--timeout", "5")
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and dead in lines[0] and lines[0].startswith("error:")
    assert "Traceback" not in proc.stderr


def test_predict_table_and_errors(target: str, prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["predict", f"the cat sat on {prefix}", "--target", target]) == 0
    out = capsys.readouterr().out
    assert f"completing {prefix!r}" in out and "%" in out

    assert cli_main(["predict", "the", "--target", target, "--k", str(MAX_K + 1)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: INVALID_ARGUMENT: ") and "\n" not in err


# ---------------------------------------------------------------------------- autocomplete


def test_completer_streams_only_new_text(
    client: NextWordClient, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, bool]] = []
    real_send = SyncSession.send

    def spy(self: SyncSession, text: str = "", *, reset: bool = False, k: int = 0) -> Prediction:
        sent.append((text, reset))
        return real_send(self, text, reset=reset, k=k)

    monkeypatch.setattr(SyncSession, "send", spy)
    completer = NextWordCompleter(client, k=3)
    event = CompleteEvent(text_inserted=True)

    def complete(text: str) -> list[Any]:
        return list(completer.get_completions(Document(text), event))

    typed = f"The cat sat on {prefix}"
    for i in range(1, len(typed) + 1):  # one request per keystroke
        items = complete(typed[:i])
    assert sent[0] == ("T", True) and all(t == (c, False) for t, c in zip(sent[1:], typed[1:], strict=True))
    session_id = completer._session.session_id if completer._session else None

    # Completions replace the partial word, keeping the user's capital letter.
    assert items and all(c.start_position == -2 and c.text.startswith(prefix) for c in items)
    assert [c.display_meta_text.endswith("%") for c in items] == [True] * len(items)
    expected = client.predict(typed, k=3)
    assert [c.text for c in items] == [s.word for s in expected.completions]
    edited = f"The cat sat on {prefix.capitalize()}"
    capital = complete(edited)  # backspace twice, retype capitalised: a reset with the full text
    assert sent[-1] == (edited, True)
    assert capital and all(c.text.startswith(prefix.capitalize()) for c in capital)

    # After a space: next-word suggestions, inserted at the cursor.
    words = complete(edited + " ")
    assert sent[-1] == (" ", False)
    assert [c.text for c in words] == client.predict(f"the cat sat on {prefix} ", k=3).words
    assert all(c.start_position == 0 for c in words)
    # After punctuation the suggestion brings its own space.
    assert all(c.text.startswith(" ") for c in complete(edited + " ."))

    n = len(sent)
    complete(edited + " .")  # nothing new typed (Tab, cursor move): no round-trip
    assert len(sent) == n
    assert completer._session is not None and completer._session.session_id == session_id
    assert "next:" in completer.toolbar()
    completer.close()


def test_completer_passes_its_strip_to_the_session(client: NextWordClient) -> None:
    completer = NextWordCompleter(client, k=3, strip=strip_message("probability", no_repeat=True))
    shown = set((completer.predict("the ") or Prediction(())).words)
    for typed in ("the c", "the ca"):  # typed past: not offered again in this word
        pred = completer.predict(typed)
        now = {c.word for c in pred.completions} if pred else set()
        assert now and not now & shown
        shown |= now
    completer.close()


def test_completer_survives_server_errors(target: str) -> None:
    with NextWordClient(target, timeout=10) as c:
        completer = NextWordCompleter(c, k=MAX_K + 1)  # the server rejects this k
        assert list(completer.get_completions(Document("the "), CompleteEvent())) == []
        assert completer.toolbar().startswith("error: INVALID_ARGUMENT")
        completer.k = 3  # the next keystroke opens a fresh session and works again
        assert len(list(completer.get_completions(Document("the cat "), CompleteEvent()))) == 3
        assert completer.last_error is None
        completer.close()


# ---------------------------------------------------------------------------- deployment files


def test_deploy_configs_parse_and_reference_metrics() -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    default = {name for name, svc in compose["services"].items() if "profiles" not in svc}
    assert default == {"server", "gateway", "prometheus", "grafana"}  # profiles: tests/test_deploy.py
    assert compose["services"]["server"]["build"]["dockerfile"] == "docker/Dockerfile"
    prom = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    job, gateway = prom["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["server:9100"] and job["scrape_interval"] == "5s"
    assert gateway["static_configs"][0]["targets"] == ["gateway:8081"]  # the gateway's own /metrics
    for f in (ROOT / "deploy/grafana/provisioning").rglob("*.yml"):
        assert yaml.safe_load(f.read_text())["apiVersion"] == 1

    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/nextword.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "nextword_request_duration_seconds_bucket",
        "nextword_onnx_compute_seconds_bucket",
        "nextword_batch_size",
        "nextword_active_sessions",
        "nextword_words_total",
        "nextword_errors_total",
        "nextword_model_info",
    ):
        assert metric in exprs

    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile and "pip install --no-deps . " in dockerfile
    assert "[train]" not in dockerfile and "[dev]" not in dockerfile  # the extras are what bring torch
    assert 'ENTRYPOINT ["nextword", "serve", "--host", "0.0.0.0"]' in dockerfile
