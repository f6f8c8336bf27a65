"""The HTTP/JSON front: every RPC at the route its ``google.api.http`` option declares in the .proto, over
the same servicer and through the same guard (tokens, users, limits, request ids, metrics, logs) as gRPC.

aiohttp serves HTTP, Server-Sent Events and WebSockets in one asyncio loop, on a thread of its own; each
call runs on a thread of a pool as a gRPC call does (the servicer is plain blocking code), and its answer
comes back to the loop. Bodies are the proto3 JSON mapping of the messages (protobuf's json_format):

    unary            POST (or GET with query parameters) -> one JSON object
    Generate         POST -> text/event-stream: "data: {GenerateResponse}" per message
    ExportHistory    GET -> application/x-ndjson: one HistoryChunk per line
    ImportHistory    POST one HistoryChunk, or newline-delimited ones
    Type             GET upgraded to a WebSocket: one JSON TypeRequest per message, one TypeResponse back

An error is the HTTP status google.rpc maps its code to, with ``{"code", "message", "request_id"}``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import queue
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
from aiohttp import WSMsgType, web
from google.api import annotations_pb2

from service.api.app_thread import AppThread
from service.api.config import ServerConfig
from service.api.http_calls import (
    HTTP_STATUS,
    HttpAbort,
    HttpContext,
    JsonReader,
    error_body,
    metadata_of,
    timeout_of,
    to_json,
)
from service.api.interceptors import CallGuard
from service.pb.nextword.v1 import nextword_pb2 as pb
from service.pb.nextword.v1 import nextword_pb2_grpc as pb_grpc

log = logging.getLogger("nextword")
PAGE = Path(__file__).with_name("web") / "index.html"
SERVICE = pb.DESCRIPTOR.services_by_name["NextWord"]
END = object()  # the end of a stream, between threads
ALLOWED_HEADERS = "authorization, content-type, x-nextword-user, x-request-id, x-timeout-ms"


def routes() -> dict[str, tuple[str, str]]:
    """Each method's (HTTP verb, path), from its google.api.http option."""
    found = {}
    for method in SERVICE.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        verb = rule.WhichOneof("pattern")
        found[method.name] = (verb.upper(), getattr(rule, verb))
    return found


def method_handlers(servicer) -> dict[str, grpc.RpcMethodHandler]:
    """The servicer's method handlers as gRPC registers them, with JSON in place of protobuf bytes."""
    captured = SimpleNamespace(handlers=None)

    class Capture:
        def add_generic_rpc_handlers(self, handlers) -> None:
            captured.handlers = handlers[0]

        def add_registered_method_handlers(self, name, handlers) -> None:
            pass

    pb_grpc.add_NextWordServicer_to_server(servicer, Capture())
    handlers = {}
    for method in SERVICE.methods:
        details = SimpleNamespace(method=f"/{SERVICE.full_name}/{method.name}")
        handler = captured.handlers.service(details)
        handlers[method.name] = handler._replace(request_deserializer=JsonReader(getattr(pb, method.input_type.name)))
    return handlers


def json_error(code: grpc.StatusCode, message: str, request_id: str = "") -> web.Response:
    return web.json_response(error_body(code, message, request_id), status=HTTP_STATUS.get(code, 500))


class HttpFront:
    """HTTP/JSON beside the gRPC port of one server process (``start``, ``stop``)."""

    def __init__(
        self, servicer, guard: CallGuard, config: ServerConfig, threads: int, initializer: Callable[[], None]
    ) -> None:
        """``threads``: the pool the calls run on (as many as the gRPC server's); ``initializer`` sets each up."""
        self.config = config
        self.routes = routes()
        self._calls = {
            name: guard.wrap_method(f"/{SERVICE.full_name}/{name}", handler, protocol="http")
            for name, handler in method_handlers(servicer).items()
        }
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="http", initializer=initializer)
        self._origins = set(config.cors_origin)
        self._app = AppThread("http-loop")
        self._loop = self._app.loop
        self._sockets: set[web.WebSocketResponse] = set()  # open typing sessions, closed at stop
        self.port = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Listen; returns the port (0 picks a free one)."""
        app = web.Application(client_max_size=self.config.max_message_bytes, middlewares=[self._cors, self._errors])
        app.router.add_get("/", self._page)
        for name, (verb, path) in self.routes.items():
            app.router.add_route(verb, path, self._handler(name))
            app.router.add_route("OPTIONS", path, self._preflight)
        self.port = self._app.start(app, host, port, reuse_port, shutdown_timeout=self.config.grace)
        return self.port

    def stop(self, grace: float) -> None:
        """Stop accepting, let calls in flight finish within ``grace`` seconds, then close."""
        try:
            self._app.stop(grace + 5, self._close_sockets)
        except concurrent.futures.TimeoutError:
            log.warning("HTTP calls still running after the grace period were cut off")
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _close_sockets(self) -> None:
        """Open typing sessions end ("going away", as a gRPC stream ends at stop), before the rest drain."""
        for socket in list(self._sockets):
            await socket.close(code=1001, message=b"the server is stopping")

    def _handler(self, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """The aiohttp handler of a method, by its kind: unary, a stream either way, or both (a WebSocket)."""
        method = SERVICE.methods_by_name[name]
        if method.client_streaming and method.server_streaming:
            kind = self._websocket
        elif method.server_streaming:
            kind = self._server_stream
        elif method.client_streaming:
            kind = self._client_stream
        else:
            kind = self._unary

        async def handle(request: web.Request) -> web.StreamResponse:
            return await kind(request, name)

        return handle

    # ------------------------------------------------------------------ the page, errors and CORS

    async def _page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(PAGE, headers={"Content-Type": "text/html; charset=utf-8"})

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Every refusal as JSON with its status (a wrong route, method, size, type), never a traceback."""
        try:
            return await handler(request)
        except web.HTTPException as error:
            if error.status < 400:
                raise
            code = {
                404: grpc.StatusCode.NOT_FOUND,
                405: grpc.StatusCode.UNIMPLEMENTED,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                415: grpc.StatusCode.INVALID_ARGUMENT,
            }.get(error.status, grpc.StatusCode.INVALID_ARGUMENT)
            message = {
                404: f"no route {request.path}; the routes are {', '.join(sorted(p for _, p in self.routes.values()))}",
                405: f"{request.method} is not allowed on {request.path}",
                413: f"the body has more than {self.config.max_message_bytes} bytes (server setting max_message_bytes)",
            }.get(error.status, error.text or error.reason)
            response = web.json_response(error_body(code, message, ""), status=error.status)
            if error.status == 405:
                response.headers["Allow"] = error.headers.get("Allow", "")
            return response
        except Exception:
            log.exception("internal error in the HTTP front")
            return json_error(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")

    @web.middleware
    async def _cors(self, request: web.Request, handler) -> web.StreamResponse:
        response = await handler(request)
        origin = request.headers.get("Origin")
        if origin and origin in self._origins and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "x-request-id"
            response.headers["Vary"] = "Origin"
        return response

    async def _preflight(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        if origin not in self._origins:
            return json_error(
                grpc.StatusCode.PERMISSION_DENIED, f"origin {origin[:100]!r} is not allowed (--cors-origin)"
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": "600",
            },
        )

    # ------------------------------------------------------------------ calls

    def _context(self, request: web.Request, query: bool = False) -> HttpContext:
        try:
            timeout = timeout_of(request.headers)
        except ValueError as error:
            raise web.HTTPBadRequest(text=str(error)) from None
        return HttpContext(metadata_of(request.headers, request.query if query else None), timeout)

    async def _body(self, request: web.Request) -> Any:
        """The request's JSON text, or its query parameters as an object for a GET."""
        if request.method == "GET":
            return {name: value for name, value in request.query.items()}
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(
                text=f"the body must be JSON (Content-Type: application/json), not {request.content_type or 'none'}"
            )
        return await request.read()

    def _answer(self, response, context: HttpContext) -> web.Response:
        return web.json_response(to_json(response), headers={"x-request-id": context.request_id})

    def _refusal(self, error: HttpAbort, context: HttpContext) -> web.Response:
        response = json_error(error.code, error.details, context.request_id)
        response.headers["x-request-id"] = context.request_id
        return response

    async def _unary(self, request: web.Request, name: str) -> web.StreamResponse:
        context = self._context(request)
        body = await self._body(request)
        try:
            answer = await self._loop.run_in_executor(self._pool, self._calls[name].unary_unary, body, context)
        except HttpAbort as error:
            return self._refusal(error, context)
        finally:
            context.end()
        return self._answer(answer, context)

    async def _client_stream(self, request: web.Request, name: str) -> web.StreamResponse:
        context = self._context(request)
        text = (await self._body(request)).decode("utf-8", errors="replace")
        pieces = [line for line in text.splitlines() if line.strip()] or [text]
        try:
            answer = await self._loop.run_in_executor(self._pool, self._calls[name].stream_unary, iter(pieces), context)
        except HttpAbort as error:
            return self._refusal(error, context)
        finally:
            context.end()
        return self._answer(answer, context)

    def _pump(self, messages: Iterator, into: asyncio.Queue, context: HttpContext) -> None:
        """On a pool thread: the handler's messages into the loop's queue, then END or the refusal."""
        put = lambda item: self._loop.call_soon_threadsafe(into.put_nowait, item)  # noqa: E731
        try:
            for message in messages:
                put(message)
                if not context.active:
                    break
            put(END)
        except HttpAbort as error:
            put(error)
        except Exception:
            log.exception("internal error streaming an HTTP answer")
            put(HttpAbort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details"))
        finally:
            close = getattr(messages, "close", None)
            if close is not None:
                close()

    async def _server_stream(self, request: web.Request, name: str) -> web.StreamResponse:
        context = self._context(request)
        body = await self._body(request)
        sse = name == "Generate"
        messages: asyncio.Queue = asyncio.Queue()
        pumped = self._loop.run_in_executor(
            self._pool, self._pump, self._calls[name].unary_stream(body, context), messages, context
        )
        first = await messages.get()
        if first is END and context.time_remaining() == 0:
            first = HttpAbort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline (x-timeout-ms) passed")
        if isinstance(first, HttpAbort):  # refused before any message: a plain error answer
            await pumped
            context.end()
            return self._refusal(first, context)
        kind = "text/event-stream" if sse else "application/x-ndjson"
        response = web.StreamResponse(headers={"Content-Type": kind, "Cache-Control": "no-cache"})
        response.headers["x-request-id"] = context.request_id
        await response.prepare(request)
        try:
            item = first
            while item is not END:
                if isinstance(item, HttpAbort):
                    error = json.dumps(error_body(item.code, item.details, context.request_id))
                    await response.write((f"event: error\ndata: {error}\n\n" if sse else error + "\n").encode())
                    break
                line = json.dumps(to_json(item), ensure_ascii=False)
                await response.write((f"data: {line}\n\n" if sse else line + "\n").encode())
                finished = isinstance(item, pb.GenerateResponse) and item.HasField("finished")
                item = await messages.get()
                if item is END and not finished and context.time_remaining() == 0:  # cut short by its deadline
                    item = HttpAbort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline (x-timeout-ms) passed")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            context.active = False  # the client went away: the generation stops at its next token
            raise
        finally:
            context.active = False
            await asyncio.shield(pumped)
            context.end()
        return response

    async def _websocket(self, request: web.Request, name: str) -> web.StreamResponse:
        context = self._context(request, query=True)
        socket = web.WebSocketResponse(max_msg_size=self.config.max_message_bytes)
        await socket.prepare(request)
        self._sockets.add(socket)
        edits: queue.Queue = queue.Queue(maxsize=64)
        answers: asyncio.Queue = asyncio.Queue()

        def incoming() -> Iterator:
            while (item := edits.get()) is not END:
                yield item

        pumped = self._loop.run_in_executor(
            self._pool, self._pump, self._calls[name].stream_stream(incoming(), context), answers, context
        )
        reader = asyncio.ensure_future(self._read_socket(socket, edits))
        try:
            while (item := await answers.get()) is not END:
                if isinstance(item, HttpAbort):
                    await socket.send_json({"error": error_body(item.code, item.details, context.request_id)})
                    await socket.close(code=1008 if HTTP_STATUS.get(item.code, 500) < 500 else 1011)
                    break
                await socket.send_str(json.dumps(to_json(item), ensure_ascii=False))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            context.active = False
            reader.cancel()
            await asyncio.get_running_loop().run_in_executor(None, edits.put, END)
            await asyncio.shield(pumped)
            context.end()
            await socket.close()
            self._sockets.discard(socket)
        return socket

    async def _read_socket(self, socket: web.WebSocketResponse, edits: queue.Queue) -> None:
        """The socket's messages into the session's edits (a binary message becomes a malformed edit)."""
        loop = asyncio.get_running_loop()
        try:
            async for message in socket:
                if message.type == WSMsgType.TEXT:
                    item: Any = message.data
                elif message.type == WSMsgType.BINARY:
                    item = ValueError("a binary message: each edit is a JSON text message")
                else:
                    break
                try:
                    edits.put_nowait(item)  # no hop to another thread while the session keeps up
                except queue.Full:
                    await loop.run_in_executor(None, edits.put, item)
        finally:
            await loop.run_in_executor(None, edits.put, END)
