"""A model repository served for real: ``nextword serve --model-repository DIR`` loads the versions
under DIR/NAME/VERSION/ as they appear, sessions keep the version they began on, a corrupt
version is refused while the old one serves, and KServe's repository calls index, load and unload."""

from __future__ import annotations

import queue
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from nextword.bundle import MANIFEST, load_bundle
from nextword.server.tokens import append_token
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc
from tests.conftest import nextword_process, train_tiny
from tests.servers import SERVING

TEXT = ["it was the best ", "of times, it was the ", "worst of ti"]
WAIT_S = 60.0


@pytest.fixture(scope="module")
def other_bundle(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different model under the same name: the repository's next version."""
    from nextword.export.onnx_export import export_bundle

    run = train_tiny(tiny_corpus, tmp_path_factory.mktemp("run2") / "lstm", epochs=1, size=16, num_layers=1)
    out = tmp_path_factory.mktemp("bundle2") / "tiny"
    export_bundle(run, out, name="tiny", command="pytest second version")
    return out


def _drop_in(bundle: Path, repo: Path, version: int) -> Path:
    """Copy ``bundle`` in as ``tiny/VERSION`` the way an operator should: whole, then renamed."""
    staging = repo / "tiny" / f".incoming-{version}"
    shutil.copytree(bundle, staging)
    return staging.rename(repo / "tiny" / str(version))


class Stream:
    """One ``Session`` stream, a request at a time."""

    def __init__(self, stub: pb_grpc.NextWordStub, first: pb.SessionRequest) -> None:
        self._requests: queue.Queue[pb.SessionRequest | None] = queue.Queue()
        self._replies = stub.Session(iter(self._requests.get, None))
        self.first = first

    def send(self, text: str) -> pb.SessionReply:
        request = self.first if self.first is not None else pb.SessionRequest()
        self.first = None  # type: ignore[assignment]
        request.text = text
        self._requests.put(request)
        reply: pb.SessionReply = next(self._replies)
        return reply

    def close(self) -> None:
        self._requests.put(None)


def _words(p: pb.Prediction) -> list[tuple[str, float]]:
    return [(s.word, round(s.prob, 5)) for s in [*p.suggestions, *p.completions]]


def _until(what: Callable[[], Any], message: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while not (found := what()):
        assert time.monotonic() < deadline, message
        time.sleep(0.1)
    return found


@pytest.fixture
def repo(tmp_path: Path, tiny_bundle: Path) -> Path:
    root = tmp_path / "models"
    (root / "tiny").mkdir(parents=True)
    _drop_in(tiny_bundle, root, 1)
    return root


@pytest.fixture
def serve_repo(repo: Path) -> Callable[..., Any]:
    def serve(*args: str) -> Any:
        cmd = ["serve", "--model-repository", str(repo), "--port", "0", "--metrics-port", "0"]
        return nextword_process([*cmd, "--threads", "1", "--repository-poll", "0.2", *args], SERVING)

    return serve


@pytest.fixture
def channel() -> Iterator[Callable[[str], grpc.Channel]]:
    opened: list[grpc.Channel] = []

    def open_channel(target: str) -> grpc.Channel:
        opened.append(grpc.insecure_channel(target))
        return opened[-1]

    yield open_channel
    for c in opened:
        c.close()


def test_a_new_version_serves_without_a_restart_and_open_sessions_keep_theirs(
    repo: Path, serve_repo: Callable[..., Any], other_bundle: Path, channel: Callable[[str], grpc.Channel]
) -> None:
    with serve_repo() as match:
        stub = pb_grpc.NextWordStub(channel(f"127.0.0.1:{match.group(1)}"))
        whole = "".join(TEXT)
        v1_answer = stub.Predict(pb.PredictRequest(text=whole))
        assert v1_answer.model_version == "1"
        before = Stream(stub, pb.SessionRequest())
        first = before.send(TEXT[0])
        assert first.model_version == "1"

        _drop_in(other_bundle, repo, 2)
        _until(
            lambda: stub.Predict(pb.PredictRequest(text=whole)).model_version == "2",
            "version 2 was never served",
        )
        v2_answer = stub.Predict(pb.PredictRequest(text=whole))
        assert _words(v2_answer.prediction) != _words(v1_answer.prediction)  # another model answers
        info = stub.GetModelInfo(pb.ModelInfoRequest())
        assert (info.name, info.version) == ("tiny", "2")
        # A new session gets version 2; the one opened before the swap stays on 1 to its end,
        # and answers exactly as version 1 answered the whole text.
        after = Stream(stub, pb.SessionRequest())
        assert after.send(TEXT[0]).model_version == "2"
        for piece in TEXT[1:]:
            reply = before.send(piece)
            assert reply.model_version == "1"
        assert _words(reply.prediction) == _words(v1_answer.prediction)
        # Resumed on a new stream, it is still on version 1; naming another version is refused.
        before.close()
        resumed = Stream(stub, pb.SessionRequest(session_id=first.session_id))
        assert resumed.send("").model_version == "1"
        with pytest.raises(grpc.RpcError) as refused:
            Stream(stub, pb.SessionRequest(session_id=first.session_id, model_version="2")).send("")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "runs on model 'tiny' version '1'" in (refused.value.details() or "")
        resumed.close()
        after.close()


def test_a_corrupt_version_is_refused_and_the_one_serving_goes_on(
    repo: Path, serve_repo: Callable[..., Any], other_bundle: Path, channel: Callable[[str], grpc.Channel]
) -> None:
    with serve_repo() as match:
        target = f"127.0.0.1:{match.group(1)}"
        stub = pb_grpc.NextWordStub(channel(target))
        session = Stream(stub, pb.SessionRequest())
        assert session.send(TEXT[0]).model_version == "1"
        bad = other_bundle.parent / "corrupt"
        shutil.copytree(other_bundle, bad)
        step = bad / load_bundle(bad).manifest.step.file
        data = bytearray(step.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one byte: its checksum no longer matches
        step.write_bytes(bytes(data))
        _drop_in(bad, repo, 2)

        kserve = triton.InferenceServerClient(target)
        try:

            def version_2() -> dict[str, str] | None:
                rows = kserve.get_model_repository_index(as_json=True)["models"]
                found = [m for m in rows if m["version"] == "2" and "sha256" in m.get("reason", "")]
                return found[0] if found else None

            refused = _until(version_2, "version 2 was never refused")
            assert refused["state"] == "UNAVAILABLE"
            assert "does not match its sha256 in the manifest" in refused["reason"]
            assert str(repo) not in refused["reason"] and refused["reason"].startswith("tiny/2: ")
            assert kserve.is_model_ready("tiny", "1") and not kserve.is_model_ready("tiny", "2")
        finally:
            kserve.close()
        assert stub.Predict(pb.PredictRequest(text="the ")).model_version == "1"
        assert session.send(TEXT[1]).model_version == "1"
        # Fixed in place (the operator copies good files over it): tried again, and served.
        shutil.rmtree(repo / "tiny" / "2")
        _drop_in(other_bundle, repo, 2)
        _until(
            lambda: stub.Predict(pb.PredictRequest(text="the ")).model_version == "2",
            "the fixed version 2 was never served",
        )
        session.close()


def test_kserve_repository_calls_load_and_unload_with_explicit_control(
    serve_repo: Callable[..., Any], channel: Callable[[str], grpc.Channel]
) -> None:
    with serve_repo("--model-control", "explicit") as match:
        target = f"127.0.0.1:{match.group(1)}"
        stub = pb_grpc.NextWordStub(channel(target))
        kserve = triton.InferenceServerClient(target)
        try:
            assert kserve.is_model_ready("tiny")
            session = Stream(stub, pb.SessionRequest())
            session.send(TEXT[0])
            kserve.unload_model("tiny")
            assert not kserve.is_model_ready("tiny")
            with pytest.raises(grpc.RpcError) as gone:
                stub.Predict(pb.PredictRequest(text="the "))
            assert gone.value.code() == grpc.StatusCode.NOT_FOUND
            (row,) = kserve.get_model_repository_index(as_json=True)["models"]
            assert row["state"] == "UNLOADING"  # the open session finishes on it
            assert session.send(TEXT[1]).model_version == "1"
            kserve.load_model("tiny")
            assert kserve.is_model_ready("tiny", "1")
            assert stub.Predict(pb.PredictRequest(text="the ")).model_version == "1"
            with pytest.raises(InferenceServerException, match="nothing loaded"):
                kserve.load_model("nosuch")
            session.close()
        finally:
            kserve.close()


def test_only_the_named_principals_load_and_unload_where_callers_are_authenticated(
    serve_repo: Callable[..., Any], tmp_path: Path
) -> None:
    """With tokens, explicit control is for --control-principals alone (by default for nobody): an
    unload reaches every caller's sessions, so whoever may predict may not do it."""
    tokens = tmp_path / "tokens"
    alice, bob = append_token(tokens, "alice"), append_token(tokens, "bob")
    as_alice, as_bob = ({"authorization": f"Bearer {t}"} for t in (alice, bob))
    control = ("--model-control", "explicit", "--tokens-file", str(tokens))
    for extra, allowed in (((), set()), (("--control-principals", "ops, alice"), {"alice"})):
        with serve_repo(*control, *extra) as match:
            kserve = triton.InferenceServerClient(f"127.0.0.1:{match.group(1)}")
            try:
                for who, headers in (("bob", as_bob), ("alice", as_alice)):
                    if who in allowed:
                        kserve.unload_model("tiny", headers=headers)
                        assert not kserve.is_model_ready("tiny", headers=headers)
                        kserve.load_model("tiny", headers=headers)
                        continue
                    for call in (kserve.unload_model, kserve.load_model):
                        with pytest.raises(InferenceServerException, match="--control-principals") as no:
                            call("tiny", headers=headers)
                        assert no.value.status() == "StatusCode.PERMISSION_DENIED"
                        assert f"{who} may not" in no.value.message()
                    assert kserve.is_model_ready("tiny", headers=headers)
            finally:
                kserve.close()


def test_polling_refuses_explicit_loads_and_names_the_flag(
    serve_repo: Callable[..., Any],
) -> None:
    with serve_repo() as match:
        kserve = triton.InferenceServerClient(f"127.0.0.1:{match.group(1)}")
        try:
            with pytest.raises(InferenceServerException, match="--model-control explicit"):
                kserve.unload_model("tiny")
            assert kserve.is_model_ready("tiny")
        finally:
            kserve.close()


def test_metrics_carry_the_model_and_version(
    serve_repo: Callable[..., Any], channel: Callable[[str], grpc.Channel], repo: Path
) -> None:
    import urllib.request

    with serve_repo("--metrics-port", "-1") as match:
        stub = pb_grpc.NextWordStub(channel(f"127.0.0.1:{match.group(1)}"))
        stub.Predict(pb.PredictRequest(text="it was the best of "))
        with urllib.request.urlopen(f"http://127.0.0.1:{match.group(2)}/metrics", timeout=5) as r:
            text = r.read().decode()
    assert "nextword_model_info{" in text and 'model="tiny"' in text and 'version="1"' in text
    (words,) = [line for line in text.splitlines() if line.startswith("nextword_words_total{")]
    assert 'model="tiny",version="1"' in words and float(words.rpartition(" ")[2]) > 0
    assert (repo / "tiny" / "1" / MANIFEST).exists()


def test_an_empty_repository_is_refused_at_startup(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "tiny" / "1").mkdir(parents=True)
    done = subprocess.run(
        [sys.executable, "-m", "nextword.cli", "serve", "--model-repository", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "no model version could be loaded" in done.stderr and "NAME/VERSION/" in done.stderr
