"""The HTTP/JSON front on a real server: every method's JSON round trip, each error status, Server-Sent Events
and their cancellation, the Type WebSocket, tokens and users on every route, CORS, and the routes the .proto
declares."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import aiohttp
import grpc
import pytest

from service.api.http_front import routes
from service.pb.nextword.v1 import nextword_pb2 as pb
from tests.e2e.test_server import start

TOKEN = "token-for-ann-0123456789"
OTHER = "token-for-nobody-0123456789"


@pytest.fixture(scope="module")
def served(tiny_char_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("http")
    server, port, _ = start(
        tiny_char_model,
        http_port=0,
        history_db=str(folder / "h.sqlite"),
        cors_origin=("https://app.example",),
        session_idle_timeout=1.0,
    )
    yield server, f"http://127.0.0.1:{server.http_port}", port
    server.stop(0)


def call(url: str, method: str = "POST", body=None, headers=None, raw: bytes | None = None):
    """(status, headers, parsed JSON or text) of one HTTP call."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, head, text = response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        status, head, text = error.code, dict(error.headers), error.read().decode()
    try:
        return status, head, json.loads(text)
    except ValueError:
        return status, head, text


def test_the_routes_are_the_ones_the_proto_declares():
    declared = routes()
    assert set(declared) == set(pb.DESCRIPTOR.services_by_name["NextWord"].methods_by_name)
    assert declared["Suggest"] == ("POST", "/v1/suggest") and declared["Type"] == ("GET", "/v1/type")


def test_unary_methods_round_trip_as_grpc_answers(served):
    server, base, port = served
    status, head, body = call(f"{base}/v1/suggest", body={"text": "we ", "numSuggestions": 2})
    assert status == 200 and len(body["suggestions"]) == 2 and head["x-request-id"]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc

    grpc_answer = pb_grpc.NextWordStub(channel).Suggest(pb.SuggestRequest(text="we ", num_suggestions=2))
    assert [s["text"] for s in body["suggestions"]] == [s.text for s in grpc_answer.suggestions]
    status, _, info = call(f"{base}/v1/model-info", method="GET")
    assert status == 200 and info["vocabSize"] > 0 and info["name"] in info["models"]
    status, _, info = call(f"{base}/v1/model-info?model=nothing", method="GET")
    assert status == 404 and info["code"] == "NOT_FOUND"
    status, _, converted = call(f"{base}/v1/convert", body={"pinyin": "nihao"})
    assert status == 400 and converted["code"] == "FAILED_PRECONDITION"  # an English model converts no pinyin
    channel.close()


def test_history_methods_round_trip(served):
    _, base, _ = served
    ann = {"x-nextword-user": "ann"}
    status, _, learned = call(f"{base}/v1/history:learn", body={"text": "we met zelda"}, headers=ann)
    assert status == 200 and learned["ngrams"] > 0
    status, head, text = call(f"{base}/v1/history", method="GET", headers=ann)
    lines = [json.loads(line) for line in text.splitlines()] if isinstance(text, str) else [text]
    assert status == 200 and head["Content-Type"].startswith("application/x-ndjson")
    history = "".join(chunk["lines"] for chunk in lines)
    assert '"zelda"' in history
    chunks = "\n".join(json.dumps({"lines": line + "\n"}) for line in history.splitlines())
    status, _, imported = call(f"{base}/v1/history:import", raw=chunks.encode(), headers={"x-nextword-user": "bo"})
    assert status == 200 and int(imported["ngrams"]) == len(history.splitlines())
    status, _, forgot = call(f"{base}/v1/history:forget", body={"word": "zelda"}, headers=ann)
    assert status == 200 and int(forgot["removed"]) > 0
    status, _, refused = call(f"{base}/v1/history:forget", body={"word": " "}, headers=ann)
    assert status == 400 and "everything" in refused["message"]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "code"),
    [
        ("/v1/suggest", {"body": {"text": ""}}, 400, "INVALID_ARGUMENT"),
        ("/v1/suggest", {"raw": b"{not json"}, 400, "INVALID_ARGUMENT"),
        ("/v1/suggest", {"body": {"text": "we", "bogus": 1}}, 400, "INVALID_ARGUMENT"),
        ("/v1/suggest", {"body": ["we"]}, 400, "INVALID_ARGUMENT"),
        ("/v1/suggest", {"body": {"text": 3}}, 400, "INVALID_ARGUMENT"),
        ("/v1/suggest", {"raw": b"text=we", "headers": {"Content-Type": "text/plain"}}, 415, "INVALID_ARGUMENT"),
        ("/v1/suggest", {"raw": b'{"text": "' + b"x" * (2 << 20) + b'"}'}, 413, "RESOURCE_EXHAUSTED"),
        ("/v1/suggest", {"method": "GET"}, 405, "UNIMPLEMENTED"),
        ("/v1/nothing", {}, 404, "NOT_FOUND"),
        ("/v1/history:learn", {"body": {"text": "hi"}}, 400, "INVALID_ARGUMENT"),  # no user named
        ("/v1/suggest", {"body": {"text": "we"}, "headers": {"x-timeout-ms": "-5"}}, 400, "INVALID_ARGUMENT"),
        (
            "/v1/suggest",
            {"body": {"text": "we"}, "headers": {"x-nextword-user": "not a user!"}},
            400,
            "INVALID_ARGUMENT",
        ),
    ],
)
def test_each_error_has_its_status_and_a_json_body(served, path, kwargs, status, code):
    _, base, _ = served
    got, head, body = call(f"{base}{path}", **kwargs)
    assert got == status, body
    assert body["code"] == code and body["message"] and "Traceback" not in body["message"]
    assert head["Content-Type"].startswith("application/json")


def test_sse_streams_generate_and_a_client_that_goes_away_stops_it(served):
    server, base, _ = served
    request = urllib.request.Request(
        f"{base}/v1/generate", data=json.dumps({"prompt": "we", "maxTokens": 5, "temperature": 0}).encode()
    )
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1]["finished"]["reason"] == "FINISH_REASON_LENGTH" and events[-1]["finished"]["generatedTokens"] == 5
    assert all("text" in event for event in events[:-1])

    async def go_away() -> int:
        async with aiohttp.ClientSession() as session:
            body = {"prompt": "we", "maxTokens": 2000}
            async with session.post(f"{base}/v1/generate", json=body) as answer:
                await answer.content.readline()  # the first event: it is running
                return server.servicer.active_generations

    assert asyncio.run(go_away()) == 1
    deadline = time.monotonic() + 10
    while server.servicer.active_generations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.servicer.active_generations == 0  # stopped long before its 2,000 tokens


def test_the_type_websocket_answers_each_edit_and_refuses_a_bad_one(served):
    _, base, _ = served

    async def session() -> list:
        async with aiohttp.ClientSession() as client, client.ws_connect(f"{base}/v1/type?user=ann") as socket:
            answers = []
            for edit in ({"append": "we "}, {"delete": 1}, {"append": " l"}):
                await socket.send_str(json.dumps(edit))
                answers.append(json.loads((await socket.receive()).data))
            await socket.send_str('{"delete": "many"}')
            answers.append(json.loads((await socket.receive()).data))
            answers.append((await socket.receive()).type)
            return answers

    first, second, third, refused, closed = asyncio.run(session())
    assert [a["editIndex"] for a in (first, second, third)] == ["1", "2", "3"]
    assert first["suggestions"]["suggestions"] and third["suggestions"]["completesWord"]
    assert refused["error"]["code"] == "INVALID_ARGUMENT" and "edit 4" in refused["error"]["message"]
    assert closed == aiohttp.WSMsgType.CLOSE


def test_an_idle_typing_websocket_is_closed_with_deadline_exceeded(served):
    _, base, _ = served

    async def idle() -> dict:
        async with aiohttp.ClientSession() as client, client.ws_connect(f"{base}/v1/type") as socket:
            await socket.send_str(json.dumps({"append": "we"}))
            await socket.receive()
            return json.loads((await socket.receive(timeout=10)).data)

    assert asyncio.run(idle())["error"]["code"] == "DEADLINE_EXCEEDED"


def test_cors_is_closed_by_default_and_open_to_the_origins_named(served):
    _, base, _ = served
    _, head, _ = call(f"{base}/v1/suggest", body={"text": "we "}, headers={"Origin": "https://app.example"})
    assert head["Access-Control-Allow-Origin"] == "https://app.example"
    _, head, _ = call(f"{base}/v1/suggest", body={"text": "we "}, headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in head
    status, head, _ = call(f"{base}/v1/suggest", method="OPTIONS", headers={"Origin": "https://app.example"})
    assert status == 204 and "x-nextword-user" in head["Access-Control-Allow-Headers"]
    status, _, _ = call(f"{base}/v1/suggest", method="OPTIONS", headers={"Origin": "https://evil.example"})
    assert status == 403


def test_the_page_is_one_self_contained_file(served):
    _, base, _ = served
    status, head, page = call(f"{base}/", method="GET")
    assert status == 200 and head["Content-Type"].startswith("text/html")
    assert "/v1/type" in page and "<script src" not in page and "http://" not in page.split("<script>")[1]


@pytest.fixture(scope="module")
def secured(tiny_char_model, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"{TOKEN} ann\n{OTHER}\n")
    server, _, _ = start(tiny_char_model, http_port=0, auth_token_file=str(tokens))
    yield f"http://127.0.0.1:{server.http_port}"
    server.stop(0)


ROUTE_BODIES = {
    "Suggest": {"text": "we "},
    "Generate": {"prompt": "we", "maxTokens": 2},
    "Convert": {"pinyin": "ni"},
    "GetModelInfo": None,
    "Learn": {"text": "hello there"},
    "Forget": {"word": "hello"},
    "ExportHistory": None,
    "ImportHistory": {"lines": '{"ngram": ["hi"], "count": 1, "last_used": 1}\n'},
}


@pytest.mark.parametrize("method", sorted(ROUTE_BODIES))
def test_tokens_and_users_hold_on_every_route(secured, method):
    verb, path = routes()[method]
    body = ROUTE_BODIES[method]

    def status(**headers) -> int:
        return call(f"{secured}{path}", method=verb, body=body, headers=headers)[0]

    assert status() == 401
    assert status(authorization="Bearer wrong-token-0123456789") == 401
    assert status(authorization=f"Bearer {TOKEN}", **{"x-nextword-user": "bob"}) == 403
    assert status(authorization=f"Bearer {OTHER}", **{"x-nextword-user": "ann"}) == 403
    assert status(authorization=f"Bearer {TOKEN}", **{"x-nextword-user": "ann"}) not in (401, 403, 500)


def test_the_type_websocket_needs_the_token_too(secured):
    async def typed(query: str) -> dict:
        async with aiohttp.ClientSession() as client, client.ws_connect(f"{secured}/v1/type{query}") as socket:
            await socket.send_str(json.dumps({"append": "we"}))
            return json.loads((await socket.receive()).data)

    assert asyncio.run(typed(""))["error"]["code"] == "UNAUTHENTICATED"
    assert asyncio.run(typed(f"?access_token={TOKEN}&user=bob"))["error"]["code"] == "PERMISSION_DENIED"
    assert "suggestions" in asyncio.run(typed(f"?access_token={TOKEN}&user=ann"))


def test_capacity_refusals_are_429_and_a_deadline_is_504(tiny_char_model):
    server, _, _ = start(tiny_char_model, http_port=0, max_concurrent_rpcs=1)
    base = f"http://127.0.0.1:{server.http_port}"

    async def held() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as client, client.ws_connect(f"{base}/v1/type") as socket:
            await socket.send_str(json.dumps({"append": "we"}))
            await socket.receive()  # the session holds the one place
            async with client.post(f"{base}/v1/suggest", json={"text": "we "}) as refused:
                return refused.status, await refused.json()

    try:
        status, body = asyncio.run(held())
        assert status == 429 and body["code"] == "RESOURCE_EXHAUSTED" and "max_concurrent_rpcs" in body["message"]
        deadline = time.monotonic() + 10
        while server.guard.active and time.monotonic() < deadline:  # the session's place is free again
            time.sleep(0.02)
        body = {"prompt": "we", "maxTokens": 500}
        status, _, answer = call(f"{base}/v1/generate", body=body, headers={"x-timeout-ms": "1"})
        if status == 200:  # the stream began before the deadline passed: it ends with the error event
            assert "event: error" in answer and "DEADLINE_EXCEEDED" in answer
        else:
            assert status == 504 and answer["code"] == "DEADLINE_EXCEEDED"
    finally:
        server.stop(0)
