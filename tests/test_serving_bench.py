"""The serving benchmark (``benchmarks/serving/``) and its reference servers (``benchmarks/floors.py``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from benchmarks import floors
from benchmarks.serving.goals import raw_call_s
from benchmarks.serving.ort import worker_raw
from benchmarks.serving.report import write_section
from nextword.server.app import start_server
from nextword.server.config import ServerConfig
from nextword.v1 import nextword_pb2 as pb
from nextword.v1 import nextword_pb2_grpc as pb_grpc

# One event loop for the module's servers and channels: grpc.aio objects belong to one loop.
on_session_loop = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4


# --------------------------------------------------------------------------- the reference servers


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def echo() -> AsyncIterator[pb_grpc.NextWordStub]:
    server, port = await floors.start(floors.EchoServicer(), "127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.NextWordStub(channel)
    await server.stop(None)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stubs(tiny_bundle: Path) -> AsyncIterator[tuple[pb_grpc.NextWordStub, pb_grpc.NextWordStub]]:
    """(nextword, naive) on the same bundle, both in this process."""
    real = await start_server(
        ServerConfig(model=tiny_bundle, port=0, metrics_port=0, device="cpu", threads=1)
    )
    naive, port = await floors.start(floors.NaiveServicer(tiny_bundle, threads=1), "127.0.0.1", 0)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{real.port}") as a,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as b,
    ):
        yield pb_grpc.NextWordStub(a), pb_grpc.NextWordStub(b)
    await naive.stop(None)
    await real.stop(None)


async def _session(stub: pb_grpc.NextWordStub, requests: list[pb.SessionRequest]) -> list[pb.SessionReply]:
    """Send ``requests`` on one stream, one at a time, and collect the reply to each."""
    call: Any = stub.Session()
    replies = []
    for request in requests:
        await call.write(request)
        replies.append(await call.read())
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK
    return replies


@on_session_loop
async def test_echo_answers_every_request_with_a_reply_shaped_like_nextwords(
    echo: pb_grpc.NextWordStub,
) -> None:
    texts = ["it is a truth ", "universally ", "ackn"]
    replies = await _session(echo, [pb.SessionRequest(text=t, k=3) for t in texts])
    assert [r.seq for r in replies] == [1, 2, 3]
    assert len({r.session_id for r in replies}) == 1 and len(replies[0].session_id) == 32
    for reply in replies:
        assert len(reply.prediction.suggestions) == 3
        assert all(s.word.isalpha() and 0 < s.prob <= 1 for s in reply.prediction.suggestions)
    # Mid-word, nextword also sends completions: so does the echo, so the sizes stay alike.
    assert not replies[0].prediction.completions and len(replies[2].prediction.completions) == 3
    # Another stream is another session.
    other = await _session(echo, [pb.SessionRequest(text="a ")])
    assert other[0].session_id != replies[0].session_id and other[0].seq == 1


def _assert_same(naive: pb.Prediction, real: pb.Prediction) -> None:
    assert [s.word for s in naive.suggestions] == [s.word for s in real.suggestions]
    assert [s.word for s in naive.completions] == [s.word for s in real.completions]
    for a, b in zip(
        [*naive.suggestions, *naive.completions], [*real.suggestions, *real.completions], strict=True
    ):
        assert a.prob == pytest.approx(b.prob, abs=TOL)
    assert naive.partial == real.partial
    assert naive.context_tokens == real.context_tokens


@on_session_loop
@pytest.mark.parametrize(
    "pieces",
    [
        ["the old man sat by the river. "],
        ["Emma ", "looked at ", "the dark sea, and"],  # ends mid-word: completions
        ["my little ", "gar"],
        ["It was 12 o'clock! ", "her qui"],
        ["", "zzzz unknown words "],  # an empty first request, out-of-vocabulary words
    ],
)
async def test_naive_replies_equal_the_real_servers_predict(
    stubs: tuple[pb_grpc.NextWordStub, pb_grpc.NextWordStub], pieces: list[str]
) -> None:
    real, naive = stubs
    replies = await _session(
        naive, [pb.SessionRequest(text=p, k=5 if i == 0 else 0) for i, p in enumerate(pieces)]
    )
    assert [r.seq for r in replies] == list(range(1, len(pieces) + 1))
    # Each reply is for the whole text so far, as a one-shot Predict of that text.
    for i, reply in enumerate(replies):
        expected = await real.Predict(pb.PredictRequest(text="".join(pieces[: i + 1]), k=5))
        _assert_same(reply.prediction, expected.prediction)


@on_session_loop
async def test_naive_reset_starts_the_context_again(
    stubs: tuple[pb_grpc.NextWordStub, pb_grpc.NextWordStub],
) -> None:
    real, naive = stubs
    replies = await _session(
        naive,
        [pb.SessionRequest(text="the king sat on "), pb.SessionRequest(text="a little ", reset=True)],
    )
    expected = await real.Predict(pb.PredictRequest(text="a little ", k=3))
    _assert_same(replies[1].prediction, expected.prediction)


# --------------------------------------------------------------------------- the harness


def test_write_section_replaces_only_the_serving_section(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\n## Before\n\nkeep\n\n## Serving\n\nold\n\n## After\n\nkeep too\n")
    write_section(results, "new table\n")
    assert results.read_text() == (
        "# Results\n\n## Before\n\nkeep\n\n## Serving\n\nnew table\n\n## After\n\nkeep too\n"
    )
    fresh = tmp_path / "OTHER.md"
    fresh.write_text("# Results\n\n## Before\n\nkeep\n")
    write_section(fresh, "table\n")
    write_section(fresh, "table again\n")  # rerunnable: replaced, not appended twice
    assert fresh.read_text() == "# Results\n\n## Before\n\nkeep\n\n## Serving\n\ntable again\n"


def test_raw_throughput_is_interpolated_per_call() -> None:
    measured = {"1": {"call_ms": 1.0}, "64": {"call_ms": 8.0}, "256": {"call_ms": 32.0}}
    assert raw_call_s(measured, 64) == pytest.approx(8e-3)
    assert raw_call_s(measured, 160) == pytest.approx(20e-3)
    assert raw_call_s(measured, 1000) == pytest.approx(32e-3)  # clamped to the largest size


def test_raw_worker_times_the_servers_call_made_apart_only_when_asked(tiny_bundle: Path) -> None:
    back_to_back = worker_raw(tiny_bundle, 1, 0.01, 20)
    assert "step_ranked_gap_b1" not in back_to_back
    apart = worker_raw(tiny_bundle, 1, 0.01, 20, gap_s=2e-3)["step_ranked_gap_b1"]
    assert apart["calls"] == 20 and apart["gap_ms"] == pytest.approx(2.0)
    assert 0 < apart["p50_ms"] < 2.0  # the call alone is timed, not the gap before it


@pytest.mark.slow
def test_quick_run_prints_every_goal_with_finite_numbers(tiny_bundle: Path, tmp_path: Path) -> None:
    out, results = tmp_path / "serving.json", tmp_path / "RESULTS.md"
    cmd = [sys.executable, "-m", "benchmarks.serving", "--bundle", str(tiny_bundle), "--quick"]
    cmd += ["--procs", "1", "--json", str(out), "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]

    table = [line for line in proc.stdout.splitlines() if line.startswith("| P")]
    assert {line.split("|")[1].strip() for line in table} == {f"P{i}" for i in range(1, 8)}
    assert "not measured: no int8 bundle" in proc.stdout  # the tiny bundle has no int8 twin
    assert "## Serving" in results.read_text() and table[0] in results.read_text()

    report = json.loads(out.read_text())
    assert not any(run["error"] for run in report["runs"]), report["runs"]
    derived = report["derived"]
    for key, value in derived.items():
        assert math.isfinite(value), key
        # RSS moves in pages and pool chunks: a thousand tiny sessions may show any small delta.
        if not key.startswith("p4_"):
            assert value > 0, key
    assert derived["p4_state_bytes"] > 0
    for run in report["runs"]:
        assert run["result"]["words"] > 0 and run["result"]["p50_ms"] > 0, run
    assert report["raw"]["fp32"]["step_b1"]["p50_ms"] > 0
    assert all(r["words_per_s"] > 0 for r in report["raw"]["fp32"]["throughput"].values())


def test_gpu_report_judges_worker_scaling_against_n_times_one_worker() -> None:
    from benchmarks.gpu import render

    def run(label: str, words: float) -> dict[str, Any]:
        return {
            "label": label,
            "streams": 128,
            "words_per_s": words,
            "p50_ms": 1.0,
            "p99_ms": 2.0,
            "mean_batch": 10.0,
            "error": "",
        }

    found: dict[str, Any] = {
        "machine": {"revision": "r", "cpu": "cpu", "nproc": 16, "onnxruntime": "1"},
        "gpu": "a GPU",
        "provider": "CUDAExecutionProvider",
        "raw": [],
        "fp16": {},
        "runs": [run("S7 cpu 1 workers", 1000), run("S7 cpu 2 workers", 1500), run("S7 cpu 4 workers", 2900)],
    }
    rows = {
        line.split("|")[1].strip(): line
        for line in render(found, "cmd").splitlines()
        if "S7" not in line and line.startswith("| ") and line.split("|")[1].strip().isdigit()
    }
    assert "**0.75**" in rows["2"] and rows["2"].rstrip(" |").endswith("pass")
    assert "**0.72**" in rows["4"] and "pass" in rows["4"]
    found["runs"][2] = run("S7 cpu 4 workers", 2700)  # 0.675 of 4 x one worker's
    assert "FAIL" in render(found, "cmd")
