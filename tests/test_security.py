"""Running on an open network: TLS, mutual TLS, bearer tokens, session ownership, limits, bad input.

Real servers on loopback ports, real TLS with certificates made for each run
(trustme), real gRPC; clients through the library, the CLI and raw channels.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextword.bundle import BundleError, load_bundle, sha256
from nextword.cli import main as cli_main
from nextword.clients.channel import Credentials, CredentialsError, aio_channel
from nextword.clients.client import AsyncNextWordClient
from nextword.clients.loadtest import LoadSpec, load_words, run_load
from nextword.server.app import RunningServer, StartupError, start_server
from nextword.server.config import ServerConfig
from nextword.server.security import PRIVATE_MANIFEST_KEYS, token_digest
from nextword.server.tokens import append_token
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


@dataclass(frozen=True)
class Pki:
    """PEM files of a server CA, a server certificate for 127.0.0.1, and a client CA with two clients."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    stranger_ca: Path  # signed certificates the server must not trust
    dir: Path

    def client(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.pem", self.dir / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, stranger_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server_ca.cert_pem.write_to_path(str(d / "ca.pem"))
    client_ca.cert_pem.write_to_path(str(d / "client-ca.pem"))
    stranger_ca.cert_pem.write_to_path(str(d / "stranger-ca.pem"))
    leaf = server_ca.issue_cert("127.0.0.1", "localhost")
    leaf.private_key_pem.write_to_path(str(d / "server.key"))
    (d / "server.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    for name, ca in (("alice", client_ca), ("bob", client_ca), ("mallory", stranger_ca)):
        cert = ca.issue_cert(f"{name}.clients.nextword.test", common_name=name)
        cert.private_key_pem.write_to_path(str(d / f"{name}.key"))
        cert.cert_chain_pems[0].write_to_path(str(d / f"{name}.pem"))
    return Pki(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "client-ca.pem", d / "stranger-ca.pem", d
    )


def _config(bundle: Path, **overrides: Any) -> ServerConfig:
    base: dict[str, Any] = {"port": 0, "metrics_port": 0, "device": "cpu", "threads": 1, "max_batch": 4}
    return ServerConfig(model=bundle, **{**base, **overrides})


@asynccontextmanager
async def serving(bundle: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    running = await start_server(_config(bundle, **overrides))
    try:
        yield running
    finally:
        await running.stop(None)


def sample(running: RunningServer, name: str, **labels: str) -> float:
    return running.metrics.registry.get_sample_value(name, labels) or 0.0


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


@dataclass(frozen=True)
class Tokens:
    file: Path
    alice: str
    bob: str


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Tokens:
    file = tmp_path_factory.mktemp("tokens") / "tokens"
    file.write_text("# nextword bearer tokens\n", encoding="utf-8")
    return Tokens(file, append_token(file, "alice"), append_token(file, "bob"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tls_server(tiny_bundle: Path, pki: Pki, tokens: Tokens) -> AsyncIterator[RunningServer]:
    """TLS and bearer tokens: what a server on an open network runs."""
    async with serving(
        tiny_bundle, tls_cert=pki.server_cert, tls_key=pki.server_key, tokens_file=tokens.file
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mtls_server(tiny_bundle: Path, pki: Pki) -> AsyncIterator[RunningServer]:
    async with serving(
        tiny_bundle, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.client_ca
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plain_server(tiny_bundle: Path) -> AsyncIterator[RunningServer]:
    """Plaintext on loopback, as ``nextword serve`` starts by default; short idle-stream timeout."""
    async with serving(tiny_bundle, idle_stream_timeout=0.5, expose_manifest=True) as running:
        yield running


def target(running: RunningServer) -> str:
    return f"127.0.0.1:{running.port}"


def tls_stub(running: RunningServer, pki: Pki, token: str | None = None, client: str = "") -> Any:
    cert, key = pki.client(client) if client else (None, None)
    creds = Credentials.from_files(ca=pki.ca, cert=cert, key=key, token=token)
    return pb_grpc.NextWordStub(aio_channel(target(running), creds))


async def first_reply(call: Any, request: Any) -> Any:
    await call.write(request)
    return await call.read()


async def open_session(stub: Any, text: str, session_id: str = "") -> tuple[Any, pb.SessionReply]:
    call = stub.Session()
    return call, await first_reply(call, pb.SessionRequest(text=text, session_id=session_id))


# ---------------------------------------------------------------------------- TLS and tokens


async def test_tls_refuses_a_plaintext_client(tls_server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(target(tls_server)) as channel:
        stub = pb_grpc.NextWordStub(channel)
        err = await rpc_error(stub.Predict(pb.PredictRequest(text="the "), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_no_or_wrong_token_is_unauthenticated(tls_server: RunningServer, pki: Pki) -> None:
    refused = sample(tls_server, "nextword_refused_total", reason="unauthenticated")
    wrong = "nwt_" + "x" * 43
    for token, expected in ((None, "authorization: Bearer"), (wrong, "not valid")):
        stub = tls_stub(tls_server, pki, token)
        err = await rpc_error(stub.Predict(pb.PredictRequest(text="the "), timeout=TIMEOUT))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert expected in (err.details() or "") and wrong not in (err.details() or "")
        # A stream is refused before its first request reaches the model.
        # The server may end the stream before the write: either step fails the same way.
        assert (await rpc_error(open_session(stub, "the "))).code() == grpc.StatusCode.UNAUTHENTICATED
    assert sample(tls_server, "nextword_refused_total", reason="unauthenticated") == refused + 4


async def test_the_library_client_sends_its_token_over_tls(
    tls_server: RunningServer, pki: Pki, tokens: Tokens
) -> None:
    creds = Credentials.from_files(ca=pki.ca, token=tokens.alice)
    async with AsyncNextWordClient(target(tls_server), timeout=TIMEOUT, credentials=creds) as client:
        assert (await client.predict("the ")).context_tokens == 1
        async with client.session() as session:
            await session.send("the cat ")
            assert (await session.send("sat ")).context_tokens == 3
    assert tokens.alice not in repr(creds)


async def test_a_token_file_edit_takes_effect_while_running(
    tls_server: RunningServer, pki: Pki, tokens: Tokens
) -> None:
    carol = append_token(tokens.file, "carol")
    stub = tls_stub(tls_server, pki, carol)
    assert await _eventually_ok(stub)  # within about a second: the file is stat'ed once a second
    # Revoke: remove carol's line.
    digest = token_digest(carol)
    lines = tokens.file.read_text().splitlines(keepends=True)
    tokens.file.write_text("".join(line for line in lines if not line.startswith(digest)))
    assert not await _eventually_ok(stub, want=False)
    err = await rpc_error(stub.Predict(pb.PredictRequest(text="the "), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


async def _eventually_ok(stub: Any, *, want: bool = True, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while True:
        try:
            await stub.Predict(pb.PredictRequest(text="the "), timeout=TIMEOUT)
            ok = True
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = False
        if ok == want or time.monotonic() > deadline:
            return ok
        await asyncio.sleep(0.1)


async def test_health_and_reflection_need_no_credential(tls_server: RunningServer, pki: Pki) -> None:
    channel = aio_channel(target(tls_server), Credentials.from_files(ca=pki.ca))
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="nextword.v1.NextWord"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    listed = await health.List(health_pb2.HealthListRequest())
    assert listed.statuses["nextword.v1.NextWord"].status == health_pb2.HealthCheckResponse.SERVING
    await channel.close(None)


# ---------------------------------------------------------------------------- session ownership


async def test_a_session_belongs_to_its_principal(
    tls_server: RunningServer, pki: Pki, tokens: Tokens
) -> None:
    alice, bob = tls_stub(tls_server, pki, tokens.alice), tls_stub(tls_server, pki, tokens.bob)
    call, reply = await open_session(alice, "the cat ")
    await call.done_writing()
    sid = reply.session_id

    # Bob, holding Alice's id, is told exactly what an unknown id (same 16 first characters) is told.
    stolen = await rpc_error(open_session(bob, "sat ", sid))
    unknown = await rpc_error(open_session(bob, "sat ", sid[:-1] + ("0" if sid[-1] != "0" else "1")))
    assert stolen.code() == unknown.code() == grpc.StatusCode.NOT_FOUND
    assert stolen.details() == unknown.details()
    assert sid not in (stolen.details() or "") and sid[:16] + "…" in (stolen.details() or "")

    # Alice resumes it, context intact.
    call, reply = await open_session(alice, "sat ", sid)
    assert (reply.session_id, reply.prediction.context_tokens) == (sid, 3)
    await call.done_writing()


async def test_mutual_tls_requires_a_certificate_the_server_trusts(
    mtls_server: RunningServer, pki: Pki
) -> None:
    for client in ("", "mallory"):  # none, and one signed by a CA the server does not trust
        stub = tls_stub(mtls_server, pki, client=client)
        err = await rpc_error(stub.Predict(pb.PredictRequest(text="the "), timeout=TIMEOUT))
        assert err.code() == grpc.StatusCode.UNAVAILABLE, client
    reply = await tls_stub(mtls_server, pki, client="alice").Predict(pb.PredictRequest(text="the "))
    assert reply.prediction.context_tokens == 1


async def test_the_certificate_name_owns_the_session(mtls_server: RunningServer, pki: Pki) -> None:
    alice, bob = tls_stub(mtls_server, pki, client="alice"), tls_stub(mtls_server, pki, client="bob")
    call, reply = await open_session(alice, "the dog ")
    await call.done_writing()
    err = await rpc_error(open_session(bob, "ran ", reply.session_id))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    call, again = await open_session(alice, "ran ", reply.session_id)
    assert again.prediction.context_tokens == 3
    await call.done_writing()


# ---------------------------------------------------------------------------- model info


def _keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


async def test_model_info_hides_local_paths_unless_asked(
    tls_server: RunningServer, plain_server: RunningServer, pki: Pki, tokens: Tokens, tiny_bundle: Path
) -> None:
    info = await tls_stub(tls_server, pki, tokens.alice).GetModelInfo(pb.ModelInfoRequest())
    shown = json.loads(info.manifest_json)
    assert not _keys(shown) & PRIVATE_MANIFEST_KEYS
    assert str(tiny_bundle.parent.parent) not in info.manifest_json  # the test's tmp dirs
    assert shown["name"] == info.name and shown["vocab_size"] == info.vocab_size

    async with grpc.aio.insecure_channel(target(plain_server)) as channel:  # --expose-manifest
        full = await pb_grpc.NextWordStub(channel).GetModelInfo(pb.ModelInfoRequest())
    assert json.loads(full.manifest_json) == json.loads((tiny_bundle / "manifest.json").read_text())


# ---------------------------------------------------------------------------- streams and bad input


async def test_an_idle_stream_is_ended_and_its_session_resumable(plain_server: RunningServer) -> None:
    idle = sample(plain_server, "nextword_refused_total", reason="idle_stream")
    async with grpc.aio.insecure_channel(target(plain_server)) as channel:
        stub = pb_grpc.NextWordStub(channel)
        call, reply = await open_session(stub, "the cat ")
        assert sample(plain_server, "nextword_open_streams") == 1
        start = time.monotonic()
        err = await rpc_error(call.read())  # nothing sent: ended after --idle-stream-timeout 0.5
        assert 0.4 < time.monotonic() - start < 5
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert "--idle-stream-timeout" in (err.details() or "") and "session_id" in (err.details() or "")
        call, again = await open_session(stub, "sat ", reply.session_id)
        assert again.prediction.context_tokens == 3
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    assert sample(plain_server, "nextword_refused_total", reason="idle_stream") == idle + 1
    assert sample(plain_server, "nextword_open_streams") == 0


async def test_malformed_bytes_are_invalid_argument_without_a_traceback(
    plain_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    request = pb.SessionRequest(text="the cat sat ").SerializeToString()
    async with grpc.aio.insecure_channel(target(plain_server)) as channel:
        raw: dict[str, Any] = {"request_serializer": lambda b: b}
        predict = channel.unary_unary("/nextword.v1.NextWord/Predict", **raw)
        for junk in (b"\xff\xff\xff", b"\x0a\x02\xc3\x28"):  # no field; a string that is not UTF-8
            err = await rpc_error(predict(junk, timeout=TIMEOUT))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "nextword.v1.PredictRequest" in (err.details() or "")
        session_rpc: Any = channel.stream_stream("/nextword.v1.NextWord/Session", **raw)
        session = session_rpc()  # a grpc.aio stream call to write to (the stubs are typed for sync)
        err = await rpc_error(first_reply(session, request[:5]))  # cut inside the text field
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "nextword.v1.SessionRequest" in (err.details() or "")
        # Health and reflection decode as safely (they are open to anyone).
        for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List"):
            err = await rpc_error(channel.unary_unary(method, **raw)(b"\xff", timeout=TIMEOUT))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        watch: Any = channel.unary_stream("/grpc.health.v1.Health/Watch", **raw)
        assert (await rpc_error(watch(b"\xff").read())).code() == grpc.StatusCode.INVALID_ARGUMENT
        reflection = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        info_rpc: Any = channel.stream_stream(reflection, **raw)
        err = await rpc_error(first_reply(info_rpc(), b"\xff"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The server carries on.
        assert (await pb_grpc.NextWordStub(channel).Predict(pb.PredictRequest(text="the "))).prediction
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 1, lines  # rate-limited: one line for them all


async def test_an_oversized_message_is_resource_exhausted_by_the_server(plain_server: RunningServer) -> None:
    # Past max_message_bytes (64 KiB) but under gRPC core's own limit: refused by nextword's guard,
    # compressed or not, with a message that says what to do.
    big = pb.PredictRequest(text="a " * 40_000).SerializeToString()
    for compression in (None, grpc.Compression.Gzip):
        async with grpc.aio.insecure_channel(target(plain_server), compression=compression) as channel:
            raw: dict[str, Any] = {"request_serializer": lambda b: b}
            predict = channel.unary_unary("/nextword.v1.NextWord/Predict", **raw)
            err = await rpc_error(predict(big, timeout=TIMEOUT))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, compression
            assert "several requests" in (err.details() or "")


async def test_grpc_traceback_for_a_call_core_ended_is_one_warning_line() -> None:
    from nextword.server.guard import CoreEndedCall

    record = logging.LogRecord(
        "grpc._cython.cygrpc",
        logging.ERROR,
        __file__,
        1,
        "ExecuteBatchError raised in core by servicer method [%s]",
        ("/nextword.v1.NextWord/Session",),
        (ValueError, ValueError("x"), None),
    )
    assert CoreEndedCall().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage().startswith("ExecuteBatchError raised in core by servicer method [/nextword")
    other = logging.LogRecord("grpc._cython.cygrpc", logging.ERROR, __file__, 1, "other", (), None)
    assert CoreEndedCall().filter(other) and other.levelno == logging.ERROR


async def test_calls_past_max_concurrent_rpcs_are_refused(tiny_bundle: Path) -> None:
    async with (
        serving(tiny_bundle, max_concurrent_rpcs=1) as running,
        grpc.aio.insecure_channel(target(running)) as channel,
    ):
        stub = pb_grpc.NextWordStub(channel)
        call, _ = await open_session(stub, "the ")  # holds the one slot while open
        err = await rpc_error(stub.Predict(pb.PredictRequest(text="the "), timeout=TIMEOUT))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        assert (await stub.Predict(pb.PredictRequest(text="the "))).prediction.context_tokens == 1


async def test_plaintext_on_all_interfaces_warns_once(
    tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="nextword.server")
    async with serving(tiny_bundle, host="0.0.0.0"):
        pass
    async with serving(tiny_bundle):  # loopback: the default, quiet
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "plaintext" in warnings[0] and "--tls-cert" in warnings[0]


# ---------------------------------------------------------------------------- tokens without TLS


async def test_a_token_goes_in_plaintext_only_to_this_machine(tiny_bundle: Path, tokens: Tokens) -> None:
    async with serving(tiny_bundle, tokens_file=tokens.file) as running:
        creds = Credentials(token=tokens.alice)
        async with AsyncNextWordClient(target(running), timeout=TIMEOUT, credentials=creds) as client:
            assert (await client.predict("the ")).context_tokens == 1
        async with AsyncNextWordClient(target(running), timeout=TIMEOUT) as client:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.predict("the ")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(CredentialsError, match="only over TLS"):
        AsyncNextWordClient("192.0.2.1:50051", credentials=creds)


# ---------------------------------------------------------------------------- commands


async def test_client_commands_take_tls_and_a_token(
    tls_server: RunningServer, pki: Pki, tokens: Tokens, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(tokens.alice + "\n")
    args = ["predict", "the ", "--json", "--target", target(tls_server), "--tls-ca", str(pki.ca)]
    assert await asyncio.to_thread(cli_main, [*args, "--token-file", str(token_file)]) == 0
    assert json.loads(capsys.readouterr().out)["suggestions"]
    assert await asyncio.to_thread(cli_main, args) == 1
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and err[-1] == "\n" and err.count("\n") == 1
    assert await asyncio.to_thread(cli_main, [*args, "--token-file", str(tmp_path / "none")]) == 2
    assert "--token-file" in capsys.readouterr().err
    plaintext = ["predict", "the ", "--target", target(tls_server), "--timeout", "5"]
    assert await asyncio.to_thread(cli_main, plaintext) == 1
    err = capsys.readouterr().err
    assert "cannot reach" in err and err.count("\n") == 1
    assert "add --tls or --tls-ca" in err  # grpc says only "Socket closed" to a plaintext client of TLS

    spec = LoadSpec(
        target(tls_server),
        streams=2,
        words=20,
        text=load_words("the cat sat on the mat and the dog ran to the house"),
        credentials=Credentials.from_files(ca=pki.ca, token=tokens.bob),
    )
    report = await run_load(spec)
    assert report.words == 20 and not report.errors


async def test_nextword_token_appends_a_digest_and_prints_the_token_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "tokens"
    file.write_text("# no newline at the end")
    assert cli_main(["token", "dave@example.org", "--tokens-file", str(file)]) == 0
    token = capsys.readouterr().out.strip()
    lines = file.read_text().splitlines()
    assert lines == ["# no newline at the end", f"{token_digest(token)} dave@example.org"]
    assert token not in file.read_text()
    assert cli_main(["token", "two words", "--tokens-file", str(file)]) == 2
    assert "principal" in capsys.readouterr().err


# ---------------------------------------------------------------------------- refused at startup


async def test_bad_security_settings_are_refused_at_startup(
    tiny_bundle: Path, pki: Pki, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="--tls-cert and --tls-key"):
        _config(tiny_bundle, tls_cert=pki.server_cert)
    with pytest.raises(ValueError, match="--idle-stream-timeout"):
        _config(tiny_bundle, idle_stream_timeout=0)
    _, bob_key = pki.client("bob")
    cases = [
        ({"tls_cert": pki.server_cert, "tls_key": bob_key}, "--tls-cert"),  # a key of another cert
        ({"tls_cert": pki.server_cert, "tls_key": tmp_path / "missing.key"}, "--tls-key"),
        ({"tokens_file": tmp_path / "missing"}, "--tokens-file"),
    ]
    (tmp_path / "bad-tokens").write_text("not-a-digest alice\n")
    cases.append(({"tokens_file": tmp_path / "bad-tokens"}, "line 1"))
    for overrides, fragment in cases:
        with pytest.raises(StartupError, match=fragment):
            await start_server(_config(tiny_bundle, **overrides))


def _with_vocab(bundle: Path, out: Path, vocab: str) -> Path:
    """A copy of ``bundle`` with another vocab.txt, checksums updated: only the vocabulary is wrong."""
    shutil.copytree(bundle, out)
    (out / "vocab.txt").write_text(vocab, encoding="utf-8")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["vocab.txt"] = sha256(out / "vocab.txt")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


async def test_a_bundle_with_a_bad_vocabulary_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    words = (tiny_bundle / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    no_specials = _with_vocab(tiny_bundle, tmp_path / "no-specials", "".join(w + "\n" for w in words[3:]))
    with pytest.raises(BundleError, match=r"vocab\.txt"):
        load_bundle(no_specials)

    empty = _with_vocab(tiny_bundle, tmp_path / "empty", "")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "nextword.cli", "serve", "--model", str(empty), "--port", "0"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=60)
    message = stderr.decode()
    assert proc.returncode == 2
    assert message.startswith("nextword serve: error: ") and message.count("\n") == 1
    assert "vocab.txt" in message and "Traceback" not in message
