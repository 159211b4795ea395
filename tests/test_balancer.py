"""The gRPC balancer (deploy/nginx/nextword.conf, run as it is deployed) in front of real replicas,
and a real Redis restarted on its port.

What a session stream sees when its replica dies behind nginx is recorded here, because a client
decides from it whether to reconnect:

* SIGKILL, the stream had a reply already: nginx resets the client's stream (RST_STREAM with
  INTERNAL_ERROR), and grpc reports INTERNAL "Stream removed (RST_STREAM (Received RST_STREAM with
  error code 2))", not UNAVAILABLE: a client that reconnects only on UNAVAILABLE gives up here;
* SIGKILL, the stream had no reply yet: nginx answers it with HTTP 502, which the config's
  error_page makes UNAVAILABLE "nextword balancer: no replica answered the call ...";
* SIGTERM: the replica's own UNAVAILABLE "the server is shutting down: reconnect and resume ..."
  passes through nginx unchanged, and sessions resume on the other replica.

The same holds with upstream keepalive off, with grpc_next_upstream off, and with a config that has
nothing but listen, upstream and grpc_pass: nginx resets a stream whose upstream connection broke
after the reply headers went out, whatever the settings; only the no-reply-yet case depends on them
(HTTP 502, reported as UNAVAILABLE "Received http2 header with status: 502" without the error_page).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis

from nextword.clients.client import NextWordClient, Prediction, Reconnect, SyncSession
from tests.services import (
    NGINX_CONF,
    NginxProcess,
    ensure_installed,
    free_port,
    nginx_grpc,
    redis_server,
    render_nginx_conf,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4
GRACE_S = 2  # the replicas' --grace: a SIGTERMed one is gone within it
READY_TIMEOUT_S = 60.0
TEXTS = ["it is a truth universally ", "once upon a ti", "the old man and the ", "she said that "]
RESET = re.compile(r"RST_STREAM")
BALANCER_UNAVAILABLE = "nextword balancer: no replica answered the call"
DRAINED = "the server is shutting down: reconnect and resume this session by its id"
NO_RETRY = Reconnect(attempts=0)


# --------------------------------------------------------------------------- replicas


@dataclass
class Replica:
    """A ``nextword serve`` process (the demo model) on 127.0.0.1:``port``."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        """Return once the port accepts and a Predict is answered; raise with the log if it exits."""
        wait_for_port(self.port, self.process, f"nextword serve --port {self.port}", self.log)
        deadline = time.monotonic() + READY_TIMEOUT_S
        with NextWordClient(self.target, timeout=5) as client:
            while True:
                try:
                    client.predict("the ")
                    return
                except grpc.RpcError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{self.target} does not answer:\n{self.log.read_text()}"
                        ) from None
                    time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=GRACE_S + 10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def replicas(tmp_dir: Path, n: int) -> Iterator[list[Replica]]:
    """``n`` replicas started together on free ports, each answering a Predict; stopped at exit."""
    started: list[Replica] = []
    try:
        for i in range(n):
            port = free_port()
            log = tmp_dir / f"replica-{i}.log"
            command = [sys.executable, "-m", "nextword", "serve", "--port", str(port), "--metrics-port", "0"]
            command += ["--log-level", "warning", "--threads", "1", "--grace", str(GRACE_S)]
            with log.open("wb") as out:
                process = subprocess.Popen(
                    command,
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            started.append(Replica(port, process, log))
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.stop()


@dataclass
class Cluster:
    replicas: list[Replica]
    balancer: NginxProcess

    def sessions_per_replica(self) -> Counter[str]:
        """How many Session calls nginx has logged (ended) per replica address."""
        lines = self.balancer.access_log.read_text().splitlines()
        return Counter(m.group(1) for line in lines if "/Session " in line and (m := _UPSTREAM.search(line)))


_UPSTREAM = re.compile(r"upstream=(\S+?)(?:,|\s)")


@contextlib.contextmanager
def cluster(tmp_dir: Path) -> Iterator[Cluster]:
    with replicas(tmp_dir, 2) as pair, nginx_grpc(tmp_dir, [r.target for r in pair]) as balancer:
        yield Cluster(pair, balancer)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two replicas behind nginx, for the tests that leave them running."""
    with cluster(tmp_path_factory.mktemp("balancer")) as running:
        yield running


def _assert_same(got: Prediction, want: Prediction, where: str) -> None:
    assert (got.partial, got.context_tokens) == (want.partial, want.context_tokens), where
    for g, w in ((got.suggestions, want.suggestions), (got.completions, want.completions)):
        assert [s.word for s in g] == [s.word for s in w], where
        assert [s.prob for s in g] == pytest.approx([s.prob for s in w], abs=TOL), where


def _outcome(session: SyncSession, text: str) -> str:
    """``OK`` if ``session`` answers ``text``, else its error as ``CODE: details``."""
    try:
        session.send(text)
        return "OK"
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {exc.details()}"


def _report(what: str, sessions: list[SyncSession], text: str, *, reconnects: bool = False) -> Counter[str]:
    """Send ``text`` on each of ``sessions``; print and count the outcomes (with each session's
    reconnects if ``reconnects``)."""
    outcomes = [_outcome(session, text) for session in sessions]
    if reconnects:
        outcomes = [f"{o} (reconnects: {s.reconnects})" for o, s in zip(outcomes, sessions, strict=True)]
    counts = Counter(outcomes)
    print(f"\n{what}:")
    for outcome, n in counts.most_common():
        print(f"  {n} x {outcome}")
    return counts


def _failures(counts: Counter[str]) -> set[str]:
    return {outcome for outcome in counts if outcome != "OK"}


# --------------------------------------------------------------------------- redis


def test_redis_restarts_on_its_port_empty(tmp_path: Path) -> None:
    with redis_server(tmp_path) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        store = redis.Redis.from_url(server.url, socket_timeout=2)
        try:
            assert store.ping()
            store.set("session:1", "state")
            server.kill()
            assert server.process.returncode == -signal.SIGKILL
            with pytest.raises(redis.ConnectionError):
                store.ping()
            port = server.port
            server.restart()
            assert server.port == port
            assert store.ping()  # the client reconnects on its own
            assert store.get("session:1") is None  # no persistence: a restart loses everything
        finally:
            store.close()
    assert server.process.returncode == 0  # stopped with SIGTERM at exit


# --------------------------------------------------------------------------- nginx


def test_the_tested_config_is_the_deployed_one(tmp_path: Path) -> None:
    """Rendering changes the listen port, the replicas and the paths, and nothing else."""
    conf = NGINX_CONF.read_text(encoding="utf-8")
    rendered = render_nginx_conf(
        conf, port=1234, upstreams=["127.0.0.1:1", "127.0.0.1:2"], directory=tmp_path
    )
    changed = [
        line[1:].split()[0]
        for line in difflib.unified_diff(conf.splitlines(), rendered.splitlines(), lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    paths = {"pid", "error_log", "access_log", "client_body_temp_path", "proxy_temp_path"}
    paths |= {"fastcgi_temp_path", "uwsgi_temp_path", "scgi_temp_path"}
    assert set(changed) == {"listen", "server", *paths}
    assert "        listen 127.0.0.1:1234 http2;" in rendered.splitlines()
    assert "        server 127.0.0.1:2 max_fails=1 fail_timeout=5s;" in rendered.splitlines()
    assert f'pid "{tmp_path / "nginx.pid"}";' in rendered
    with pytest.raises(ValueError, match="exactly one listen line"):
        render_nginx_conf(conf.replace("listen", "#listen"), port=1, upstreams=["a:1"], directory=tmp_path)
    with pytest.raises(ValueError, match="replicas"):
        render_nginx_conf(conf.replace("# replicas: end", ""), port=1, upstreams=["a:1"], directory=tmp_path)


def test_ensure_installed_finds_the_binaries() -> None:
    paths = ensure_installed("redis", "nginx")
    assert set(paths) == {"redis", "nginx"}
    assert all(Path(path).is_file() for path in paths.values())
    with pytest.raises(ValueError, match="unknown services"):
        ensure_installed("postgres")


@pytest.mark.slow
def test_a_predict_through_the_balancer_is_a_direct_one(shared: Cluster) -> None:
    with contextlib.ExitStack() as stack:
        balanced = stack.enter_context(NextWordClient(shared.balancer.target, timeout=10))
        direct = [stack.enter_context(NextWordClient(r.target, timeout=10)) for r in shared.replicas]
        for text in TEXTS:
            got = balanced.predict(text, k=5)
            assert got.suggestions, text
            for client in direct:
                _assert_same(got, client.predict(text, k=5), text)


@pytest.mark.slow
def test_sixteen_sessions_share_one_client_connection(shared: Cluster) -> None:
    """16 session streams on one client channel (one HTTP/2 connection to nginx), spread over both
    replicas by least_conn; each answers as a direct Predict of its text does."""
    before = shared.sessions_per_replica()
    with NextWordClient(shared.balancer.target, timeout=10) as client:
        direct = NextWordClient(shared.replicas[0].target, timeout=10)
        sessions = [client.session(k=3) for _ in range(16)]  # all open at once
        try:
            for i, session in enumerate(sessions):
                text = ""
                for piece in (TEXTS[i % len(TEXTS)], "and then ", "the "):
                    text += piece
                    _assert_same(session.send(piece), direct.predict(text, k=3), f"session {i}: {text!r}")
                assert session.reconnects == 0
        finally:
            for session in sessions:
                session.close()
            direct.close()
    deadline = time.monotonic() + 5
    while sum((shared.sessions_per_replica() - before).values()) < 16 and time.monotonic() < deadline:
        time.sleep(0.05)  # nginx logs a stream when it has ended
    spread = shared.sessions_per_replica() - before
    assert sorted(spread) == sorted(r.target for r in shared.replicas), spread
    assert sorted(spread.values()) == [8, 8], f"least_conn: 16 concurrent sessions split evenly: {spread}"


@pytest.mark.slow
def test_a_replica_killed_mid_session(tmp_path: Path) -> None:
    """SIGKILL one of two replicas: new calls go to the other one; the streams it held fail, with
    INTERNAL (RST_STREAM) if they had a reply, UNAVAILABLE if not (see the module docstring)."""
    with cluster(tmp_path) as running, NextWordClient(running.balancer.target, timeout=10) as client:
        # Opened in turn, so least_conn puts every other one of each group on each replica.
        answered = [client.session(k=3, reconnect=NO_RETRY) for _ in range(8)]
        for i, session in enumerate(answered):
            session.send(TEXTS[i % len(TEXTS)])
        unanswered = [client.session(k=3, reconnect=NO_RETRY) for _ in range(8)]
        library = [client.session(k=3) for _ in range(8)]  # the library's default: reconnects
        for i, session in enumerate(library):
            session.send(TEXTS[i % len(TEXTS)])
        time.sleep(0.2)  # every stream has reached its replica

        dead, alive = running.replicas
        dead.process.kill()
        dead.process.wait()
        time.sleep(0.3)  # nginx sees the connections close

        # New calls: the dead replica refuses connections, nginx passes them to the other one.
        with NextWordClient(alive.target, timeout=10) as direct:
            for text in TEXTS:
                _assert_same(client.predict(text), direct.predict(text), f"after the kill: {text!r}")
        for text in TEXTS:
            with client.session(k=3, reconnect=NO_RETRY) as fresh:
                assert fresh.send(text).suggestions

        # Existing streams: half of each group was on the dead replica.
        had_reply = _report("streams with a reply, replica SIGKILLed", answered, "the ")
        no_reply = _report("streams with no reply yet, replica SIGKILLed", unanswered, "the ")
        by_library = _report(
            "library sessions (default Reconnect), replica SIGKILLed", library, "the ", reconnects=True
        )
        assert had_reply["OK"] == 4, had_reply
        assert no_reply["OK"] == 4, no_reply
        # The finding: a stream that had a reply is reset by nginx (RST_STREAM INTERNAL_ERROR),
        # which grpc reports as INTERNAL, not UNAVAILABLE.
        for failure in _failures(had_reply):
            assert failure.startswith("INTERNAL: ") and RESET.search(failure), failure
        # One with no reply yet gets nginx's 502, which the config's error_page turns into UNAVAILABLE.
        assert _failures(no_reply) == {f"UNAVAILABLE: {BALANCER_UNAVAILABLE} (down or restarting)"}
        # Those on the live replica at least (the others too if the library reconnects on a reset).
        assert sum(n for outcome, n in by_library.items() if outcome.startswith("OK")) >= 4, by_library
        for session in answered + unanswered + library:
            session.close()


@pytest.mark.slow
def test_a_replica_drained_mid_session(tmp_path: Path) -> None:
    """SIGTERM one of two replicas: its streams end with its UNAVAILABLE 'resume' status through
    nginx, and the library's sessions resume on the other replica with the same answers."""
    with cluster(tmp_path) as running, NextWordClient(running.balancer.target, timeout=10) as client:
        answered = [client.session(k=3, reconnect=NO_RETRY) for _ in range(8)]
        library = [client.session(k=3) for _ in range(8)]
        texts = [TEXTS[i % len(TEXTS)] for i in range(8)]
        for session, text in zip(answered + library, texts + texts, strict=True):
            session.send(text)

        draining, alive = running.replicas
        draining.process.send_signal(signal.SIGTERM)
        # At once, while it drains: the library's sessions reconnect through nginx.
        with NextWordClient(alive.target, timeout=10) as direct:
            for i, session in enumerate(library):
                _assert_same(session.send("and "), direct.predict(texts[i] + "and "), f"library session {i}")
        # Those on the draining replica reconnected (more than once if least_conn sent a new stream
        # to it while it still refused new calls: it has the fewest connections then).
        assert sorted(min(s.reconnects, 1) for s in library) == [0] * 4 + [1] * 4
        assert draining.process.wait(timeout=GRACE_S + 10) == 0

        drained = _report("streams with a reply, replica SIGTERMed", answered, "and ")
        assert drained["OK"] == 4, drained
        for failure in _failures(drained):
            assert failure.startswith(f"UNAVAILABLE: {DRAINED}"), failure
        assert client.predict("the ").suggestions  # new calls: the other replica
        for session in answered + library:
            session.close()
