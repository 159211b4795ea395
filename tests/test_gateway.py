"""The browser's door: the gateway in front of a real server, and its demo page in a real browser.

The server serves the committed demo model; the gateway is ``nextword gateway`` as a process;
the page runs in Debian's chromium (installed by scripts/install-services.sh), driven by
Playwright.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from nextword.clients.client import NextWordClient
from nextword.v1 import nextword_pb2 as pb
from tests.conftest import nextword_process, serve_process
from tests.services import ensure_installed

DEMO = Path(__file__).resolve().parent.parent / "models" / "demo"
LISTENING = re.compile(r"nextword gateway on (http://[\d.]+:\d+)/")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve_process(DEMO) as target:
        yield target


@pytest.fixture(scope="module")
def gateway(server: str) -> Iterator[str]:
    with running_gateway(server) as url:
        yield url


@contextlib.contextmanager
def running_gateway(server: str) -> Iterator[str]:
    """``nextword gateway --port 0`` in front of ``server``; its base URL."""
    with nextword_process(["gateway", "--target", server, "--port", "0"], LISTENING) as match:
        yield match.group(1)


def _post(url: str, body: bytes, token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_predict_over_http_answers_as_the_grpc_api(gateway: str, server: str) -> None:
    status, body = _post(f"{gateway}/v1/predict", json.dumps({"text": "it is a truth univ", "k": 3}).encode())
    assert status == 200
    with NextWordClient(server) as client:
        expected = client.predict("it is a truth univ", 3).to_json_dict()
    assert body == expected | {"completions": expected["completions"]}
    assert body["partial"] == "univ" and body["completions"][0]["word"].startswith("univ")


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"not json", 400, "INVALID_ARGUMENT"),
        (b'{"text": 5}', 400, "INVALID_ARGUMENT"),
        (b'{"text": "a ", "k": 100000}', 400, "INVALID_ARGUMENT"),  # the server's --max-k
        (json.dumps({"text": "x" * 20000}).encode(), 413, "INVALID_ARGUMENT"),  # the gateway's bound
    ],
)
def test_bad_requests_get_a_status_and_a_message(gateway: str, body: bytes, status: int, code: str) -> None:
    before = _answers(gateway, code)
    got, reply = _post(f"{gateway}/v1/predict", body)
    assert (got, reply["error"]["code"]) == (status, code)
    assert reply["error"]["message"]
    assert _answers(gateway, code) == before + 1  # counted in the gateway's /metrics


def _answers(gateway: str, code: str) -> float:
    with urllib.request.urlopen(f"{gateway}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nextword_gateway_requests_total" and sample.labels == {
                "route": "predict",
                "code": code,
            }:
                return float(sample.value)
    return 0.0


async def test_a_request_may_name_its_model(gateway: str) -> None:
    """``model`` goes on to the server: the model it serves answers, another is NOT_FOUND in the
    server's words, over HTTP and on a socket (named by its first message)."""

    def ask(**body: Any) -> tuple[int, dict[str, Any]]:
        return _post(f"{gateway}/v1/predict", json.dumps({"text": "it is a "} | body).encode())

    named, plain = ask(model="mixed"), ask()
    assert named == plain and named[0] == 200
    status, body = ask(model="nosuch")
    assert (status, body["error"]["code"]) == (404, "NOT_FOUND") and "nosuch" in body["error"]["message"]
    status, body = ask(model=3)
    assert (status, body["error"]["code"]) == (400, "INVALID_ARGUMENT")
    assert '"model"' in body["error"]["message"]
    async with aiohttp.ClientSession() as http:
        for model, code in (("mixed", None), ("nosuch", "NOT_FOUND")):
            async with http.ws_connect(f"{gateway.replace('http', 'ws')}/v1/session") as ws:
                await ws.send_json({"text": "it is a ", "model": model})
                reply = await ws.receive_json(timeout=10)
                assert reply.get("error", {}).get("code") == code
                if code is None:
                    assert reply["suggestions"] == plain[1]["suggestions"]


async def test_a_websocket_is_one_session_answering_as_a_grpc_session(gateway: str, server: str) -> None:
    pieces = ["it is a truth ", "univ", "ersally ", "acknowledged"]
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{gateway.replace('http', 'ws')}/v1/session") as ws,
    ):
        replies = []
        for piece in pieces:
            await ws.send_json({"text": piece, "k": 3})
            replies.append(await ws.receive_json(timeout=10))
        await ws.send_json({"text": 7})  # a bad message gets an error, and the session goes on
        assert (await ws.receive_json(timeout=10))["error"]["code"] == "INVALID_ARGUMENT"
        await ws.send_json({"text": " it", "k": 3})
        last = await ws.receive_json(timeout=10)
    assert [r["seq"] for r in replies] == [1, 2, 3, 4] and last["seq"] == 5
    assert len({r["session_id"] for r in [*replies, last]}) == 1
    with NextWordClient(server) as client, client.session(k=3) as session:
        expected = [session.send(piece).to_json_dict() for piece in pieces]
    for got, want in zip(replies, expected, strict=True):
        assert {k: got[k] for k in ("suggestions", "partial")} == {
            k: want[k] for k in ("suggestions", "partial")
        }


async def test_a_websocket_may_ask_for_a_session_that_learns(gateway: str, server: str) -> None:
    pieces = ["the horse and the dog and the ", "horse ran and the ", "h"]
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{gateway.replace('http', 'ws')}/v1/session") as ws,
    ):
        replies = []
        for i, piece in enumerate(pieces):
            await ws.send_json({"text": piece, "k": 3} | ({"learn": True} if i == 0 else {}))
            replies.append(await ws.receive_json(timeout=10))
    with NextWordClient(server) as client:
        with client.session(k=3, strip=pb.Strip(learn=True)) as learning:
            expected = [learning.send(piece).to_json_dict() for piece in pieces]
        with client.session(k=3) as plain:
            unlearned = [plain.send(piece).to_json_dict() for piece in pieces]

    def shown(reply: dict[str, Any]) -> dict[str, Any]:
        return {k: reply.get(k) or None for k in ("suggestions", "completions", "partial")}

    assert [shown(r) for r in replies] == [shown(e) for e in expected]
    assert replies[-1]["completions"] != unlearned[-1].get("completions")  # the cache moved them


def test_the_demo_page_completes_with_tab_and_takes_a_next_word_with_a_digit(gateway: str) -> None:
    from playwright.sync_api import sync_playwright

    chromium = ensure_installed("chromium")["chromium"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(gateway + "/")
            box = page.locator("#text")
            box.click()
            page.keyboard.type("it is a truth univ", delay=20)
            first = page.locator("#strip button").first
            first.wait_for()
            page.wait_for_function("document.querySelector('#strip button').dataset.word.startsWith('univ')")
            completion = first.get_attribute("data-word")
            page.keyboard.press("Tab")
            assert box.input_value() == f"it is a truth {completion} "
            # The strip now offers next words: 1 takes the first of them.
            page.wait_for_function(
                "document.querySelector('#strip button') && "
                "!document.querySelector('#strip button').getAttribute('aria-label').startsWith('complete')"
            )
            word = page.locator("#strip button").first.get_attribute("data-word")
            page.keyboard.press("1")
            assert box.input_value() == f"it is a truth {completion} {word} "
            assert page.locator("#status").inner_text() == ""
        finally:
            browser.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_page_session_outlives_a_server_restart() -> None:
    """The server goes away and comes back (no session store: it forgot the session); the socket
    stays open and the gateway's session rebuilds itself from the text it sent, so the answers are
    those of a session that never stopped."""
    port = _free_port()
    target = f"127.0.0.1:{port}"
    pieces = ["it is a truth ", "universally ", "acknowledged, that ", "a single ", "man"]
    replies: list[dict[str, Any]] = []
    with running_gateway(target) as url, contextlib.ExitStack() as first, contextlib.ExitStack() as second:
        first.enter_context(serve_process(DEMO, "--port", str(port)))
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"{url.replace('http', 'ws')}/v1/session") as ws,
        ):
            for i, piece in enumerate(pieces):
                if i == 2:
                    first.close()  # SIGTERM: the server drains and exits
                    second.enter_context(serve_process(DEMO, "--port", str(port)))
                await ws.send_json({"text": piece, "k": 3})
                replies.append(await ws.receive_json(timeout=30))
        with NextWordClient(target) as client, client.session(k=3) as session:
            expected = [session.send(piece).to_json_dict() for piece in pieces]
    assert all("error" not in r for r in replies), replies
    for got, want in zip(replies, expected, strict=True):
        assert (got["suggestions"], got["partial"]) == (want["suggestions"], want["partial"])


async def test_callers_tokens_go_on_to_the_server_and_are_judged_there(tmp_path: Path) -> None:
    from nextword.server.tokens import append_token

    tokens = tmp_path / "tokens"
    alice = append_token(tokens, "alice")
    body = json.dumps({"text": "it is a truth ", "k": 3}).encode()
    with serve_process(DEMO, "--tokens-file", str(tokens)) as target, running_gateway(target) as url:
        status, reply = await asyncio.to_thread(_post, f"{url}/v1/predict", body)
        assert (status, reply["error"]["code"]) == (401, "UNAUTHENTICATED")
        status, reply = await asyncio.to_thread(_post, f"{url}/v1/predict", body, alice)
        assert status == 200 and len(reply["suggestions"]) == 3
        status, reply = await asyncio.to_thread(_post, f"{url}/v1/predict", body, alice + "x")
        assert (status, reply["error"]["code"]) == (401, "UNAUTHENTICATED")
        async with aiohttp.ClientSession() as http:
            for token, code in ((None, "UNAUTHENTICATED"), (alice, None)):
                async with http.ws_connect(f"{url.replace('http', 'ws')}/v1/session") as ws:
                    await ws.send_json(
                        {"text": "it is a truth ", "k": 3} | ({"token": token} if token else {})
                    )
                    got = await ws.receive_json(timeout=10)
                    assert got.get("error", {}).get("code") == code, got
    # A gateway that signs in as itself passes no caller's token on, and says so.
    gateway_token = tmp_path / "gateway-token"
    gateway_token.write_text(append_token(tokens, "gateway"))
    with serve_process(DEMO, "--tokens-file", str(tokens)) as target:
        cmd = ["gateway", "--target", target, "--port", "0", "--token-file", str(gateway_token)]
        with nextword_process(cmd, LISTENING) as match:
            url = match.group(1)
            status, reply = await asyncio.to_thread(_post, f"{url}/v1/predict", body)
            assert status == 200  # as the gateway's principal
            status, reply = await asyncio.to_thread(_post, f"{url}/v1/predict", body, alice)
            assert (status, reply["error"]["code"]) == (400, "INVALID_ARGUMENT")
            assert "its own principal" in reply["error"]["message"]
